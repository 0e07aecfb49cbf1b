"""Drop-in VAE decoding for diffusers pipelines: ``swap_vae(pipe, decoder)`` and the pipeline runs unchanged.

``pipe.vae`` stays the pipeline's own diffusers VAE, of its class and with its config and weights; only its
``decode`` is computed by fastdec (``FastdecVAE``, fastdec.diffusers.adapter). Saving writes the original VAE, the
VAE's tiling and slicing switches select fastdec's exact slabs and per-sample decoding, ``.to()`` and accelerate's
offloading move fastdec's weights with the VAE's, and an exact decoder shares the VAE's decoder weights instead of
holding a second copy (fastdec.diffusers.swap). ``unswap_vae(pipe)`` undoes the swap.
"""

from fastdec.diffusers.adapter import FastdecVAE
from fastdec.diffusers.swap import SharedWeights, swap_vae, swapped, unswap_vae, weight_bytes

__all__ = ["FastdecVAE", "SharedWeights", "swap_vae", "swapped", "unswap_vae", "weight_bytes"]
