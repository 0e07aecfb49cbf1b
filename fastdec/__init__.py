"""fastdec: diffusion latents to pixels, as fast as the hardware allows."""

from fastdec import ops

__version__ = "0.1.0"
__all__ = ["ops"]
