"""Exact tiled decoding: any fastdec decoder, split into row slabs, with the same pixels as the untiled decode.

One decomposition, two executors. The decoder module runs unchanged; its latents are wrapped in a ``SlabTensor``
(the global shape, and the slab parts: row ranges of the height axis), and a ``TorchDispatchMode`` runs every op
the module issues slab by slab with the rule that keeps it exact:

* convolutions (any kernel, stride, dilation, 2-D or 3-D): a slab takes the rows it needs from its neighbours (a
  halo) instead of zero padding, and zero rows only at the true image border;
* ``fastdec.group_norm_act`` and GroupNorm: statistics over all slabs (each slab's per-chunk moments from the op's
  own statistics kernel, merged with Chan's formula), then each slab is normalised by the op's fused normalize pass;
* pixel shuffles (``phase_offset`` 0 or 1), nearest upsampling and zero padding: local, with a halo where needed;
* elementwise ops, per-pixel reductions over other axes (channel norms), views that keep the height axis, per-channel
  eval-mode BatchNorm, cat/stack/slice/select on other axes: local;
* anything else (attention over all positions, token reshapes): the slabs are gathered into one tensor and the op
  runs whole. Decoders do this only at latent resolution (the mid-block attention, ViT tokens), where the image is
  small; a later spatial op (conv, norm, shuffle, patch_unembed) splits a whole tensor back into slabs.

The executors differ only in where slabs live and how halos and statistics travel:

* ``HostTiles`` (one device, ``tiled_decode``): all slabs are kept in host memory (pinned, with non-blocking copies,
  from a GPU); each step moves one slab (plus halo) to the device, computes, and moves the result back, so device
  memory is bounded by the slab size;
* ``fastdec.parallel.RankSlabs`` (torch.distributed): rank r holds slab r; halos go to neighbours by send/recv,
  statistics are all-reduced, gathers are all_gathers.

Both check the same rule: a slab's halo must come from its immediate neighbours (a slab smaller than a halo is an
error that names the op and the smallest tile that works). Families plug in without code here: the rules are per op.

The package, one module per concern: ``slab`` (the slab tensor), ``executors`` (where slabs live), ``dispatch``
(the TiledRun mode), ``local_rules``, ``spatial_rules`` and ``norm_rules`` (one rule per op), ``planning`` (meta
probing, the memory estimate, the automatic tile size) and ``decoding`` (the entry points).
"""

from fastdec.tiling.decoding import decode, run_decode, tiled_decode
from fastdec.tiling.dispatch import TiledRun, tiling_active
from fastdec.tiling.executors import Executor, HostTiles, assemble_rows
from fastdec.tiling.planning import (
    auto_tile_size,
    estimate_decode_bytes,
    free_device_bytes,
    latent_tile_rows,
    spatial_factor,
)
from fastdec.tiling.slab import Bounds, SlabTensor, TileError, even_bounds, zeros_rows

__all__ = [
    "Bounds", "Executor", "HostTiles", "SlabTensor", "TileError", "TiledRun", "assemble_rows", "auto_tile_size",
    "decode", "estimate_decode_bytes", "even_bounds", "free_device_bytes", "latent_tile_rows", "run_decode",
    "spatial_factor", "tiled_decode", "tiling_active", "zeros_rows",
]
