"""fastdec: diffusion latents to pixels, as fast as the hardware allows."""

from fastdec import ops
from fastdec.api import decode, load
from fastdec.encoders import encode
from fastdec.video import save_video

__version__ = "0.1.0"
__all__ = ["decode", "encode", "load", "ops", "save_video"]
