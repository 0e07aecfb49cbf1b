"""The entry points: ``decode`` (tiled when asked or needed), ``tiled_decode`` and ``run_decode``."""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor, nn

from fastdec import wording
from fastdec.tiling.dispatch import TiledRun, untiled
from fastdec.tiling.executors import HostTiles
from fastdec.tiling.planning import auto_tile_size, latent_tile_rows, spatial_factor
from fastdec.tiling.slab import SlabTensor, even_bounds, is_slab
from fastdec.validate import check_latents, weights_device_and_dtype

logger = logging.getLogger("fastdec")


def run_decode(decoder: nn.Module, latents: Tensor, run: TiledRun) -> SlabTensor | Tensor:
    """decoder.decode on slabbed latents inside ``run`` (the latents are checked by the caller)."""
    hdim = latents.dim() - 2
    with torch.no_grad(), run:
        slab = run.scatter(latents, run.latent_bounds, hdim)
        return decoder.decode(slab, check_finite=False)


def tiled_decode(decoder: nn.Module, latents: Tensor, tile_size: int, check_finite: bool | None = None) -> Tensor:
    """``decoder.decode(latents)`` computed in horizontal slabs of at most ``tile_size`` pixel rows, equal to the
    untiled decode up to float reduction order (see the fastdec.tiling docstring).

    Slabs not being computed are held in host memory, so device memory is bounded by one slab; the image is
    returned on the decoder's device, like ``decode``. Works for every fastdec decoder (4-D image and 5-D video
    latents: the slabs split the height; a video decoder's own frame chunking runs inside)."""
    check_latents(latents, decoder, check_finite)
    rows = latent_tile_rows(decoder, latents, tile_size)
    h = latents.shape[-2]
    bounds = even_bounds(h, math.ceil(h / rows))
    device, _ = weights_device_and_dtype(decoder)
    run = TiledRun(HostTiles(device), h, bounds)
    out = run_decode(decoder, latents, run)
    return run.executor.gather(out) if is_slab(out) else out


def decode(decoder: nn.Module, latents: Tensor, tile_size: int | None = None,
           check_finite: bool | None = None) -> Tensor:
    """``decoder.decode(latents)``, tiled when asked or needed.

    ``tile_size``: pixel rows per slab (a multiple of the decoder's latent-to-pixel factor); 0 never tiles; None
    uses the decoder's own ``tile_size`` attribute if set, else tiles automatically when the estimated untiled
    peak would not fit in the free memory of the decoder's device (GPU memory, or on the CPU the host memory this
    process may take; a log line says so), and refuses up front, with the numbers, what fits in no slab size. On
    CUDA an out-of-memory error of an automatic untiled decode is retried in slabs of half the height, then a
    quarter, ... (a log line each); ``tile_size=0`` never tiles and never retries."""
    automatic = tile_size is None and not getattr(decoder, "tile_size", None)
    if tile_size is None:
        tile_size = getattr(decoder, "tile_size", None) or auto_tile_size(decoder, check_latents(latents, decoder,
                                                                                                  check_finite))
        check_finite = False  # checked just now
    if not tile_size:
        try:
            with untiled():
                return decoder.decode(latents, check_finite)
        except torch.OutOfMemoryError:
            if not automatic:
                raise
        return _retry_in_slabs(decoder, latents)
    return tiled_decode(decoder, latents, tile_size, check_finite)


def _retry_in_slabs(decoder: nn.Module, latents: Tensor) -> Tensor:
    """After an out-of-memory error: slabs of half the latent rows, then a quarter, ... down to one."""
    factor = spatial_factor(decoder, latents)
    rows = latents.shape[-2]
    while rows > 1:
        rows = (rows + 1) // 2
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        logger.warning("fastdec: out of memory decoding latents %s untiled or in larger slabs: retrying exactly in "
                       "slabs of %d pixel rows (%s=...)", tuple(latents.shape), rows * factor,
                       wording.tile_size_option())
        try:
            return tiled_decode(decoder, latents, rows * factor, check_finite=False)
        except torch.OutOfMemoryError:
            if rows == 1:
                raise
    raise torch.OutOfMemoryError(f"out of memory decoding latents {tuple(latents.shape)}, whose height is one row")


