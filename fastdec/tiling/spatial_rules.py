"""Rules for spatial ops: convolutions, shuffles, upsampling, padding, patch unembedding and new tensors. A slab
takes the rows it needs from its neighbours (a halo), and zero rows only at the true image border."""

from __future__ import annotations

from itertools import pairwise

import torch

from fastdec import ops  # noqa: F401  (registers torch.ops.fastdec.*, which the rules below name)
from fastdec.tiling.slab import Bounds, is_slab, meta_run

aten = torch.ops.aten

def _conv_bounds(bounds: Bounds, k: int, stride: int, pad: int, out_rows: int) -> Bounds:
    """Output slab boundaries of a conv: the output row whose window centre is nearest each input boundary
    (ties down), so same-size convs keep the boundaries and strided ones divide them."""
    inner = [-((-(2 * b + 2 * pad - k + 1 - stride)) // (2 * stride)) for b in bounds[1:-1]]
    return (0, *(min(max(b, 0), out_rows) for b in inner), out_rows)


def _conv_rule(run, func, args, kwargs):
    x, weight, bias, stride, padding, dilation, transposed, output_padding, groups = args
    x = run.as_slab(x, x.dim() - 2) if x.dim() in (4, 5) and not transposed else x
    if not is_slab(x) or transposed or x.hdim != x.dim() - 2:
        return run.gathered(func, (x, *args[1:]), kwargs) if is_slab(x) else func(*args, **kwargs)
    i = x.hdim - 2  # the height among the spatial axes of (N, C, *spatial)
    k = dilation[i] * (weight.shape[2 + i] - 1) + 1
    s, p = stride[i], padding[i]
    out_shape = meta_run(func, (x, *args[1:]), kwargs).shape
    out_rows = out_shape[x.hdim]
    out_bounds = _conv_bounds(x.bounds, k, s, p, out_rows)
    needs = [(o0 * s - p, (o1 - 1) * s - p + k) for o0, o1 in pairwise(out_bounds)]
    no_pad = list(padding)
    no_pad[i] = 0

    def compute(rows, t):
        return func(rows, weight, bias, stride, no_pad, dilation, transposed, output_padding, groups)
    return run.stencil(x, out_bounds, needs, compute, out_shape, x.dtype,
                       f"a {weight.shape[2 + i]}-tap convolution")


def _shuffle_rule(run, func, args, kwargs):
    x, factor = args[0], args[1]
    offset = args[2] if len(args) > 2 else kwargs.get("phase_offset", 0)
    x = run.as_slab(x, x.dim() - 2) if x.dim() == 4 else x
    if not is_slab(x) or x.hdim != x.dim() - 2:
        return run.gathered(func, args, kwargs) if is_slab(x) else func(*args, **kwargs)
    out_shape = meta_run(func, (x, *args[1:]), kwargs).shape
    out_bounds = tuple(min(b * factor, out_shape[x.hdim]) for b in x.bounds[:-1]) + (out_shape[x.hdim],)
    shrink = offset * (factor - 1)
    needs = [(o0 // factor, o1 // factor + shrink) for o0, o1 in pairwise(out_bounds)]
    return run.stencil(x, out_bounds, needs, lambda rows, t: func(rows, *args[1:], **kwargs), out_shape, x.dtype,
                       "a pixel shuffle")


def _upsample_rule(run, func, args, kwargs):
    """Nearest (and nearest-exact) upsampling by an integer factor along the height: local."""
    x = args[0]
    x = run.as_slab(x, x.dim() - 2) if x.dim() in (4, 5) else x
    if not is_slab(x):
        return func(*args, **kwargs)
    out_shape = meta_run(func, (x, *args[1:]), kwargs).shape
    rows_in, rows_out = x.shape[x.hdim], out_shape[x.hdim]
    if x.hdim != x.dim() - 2 or rows_out % rows_in:
        return run.gathered(func, (x, *args[1:]), kwargs)
    factor = rows_out // rows_in
    out_bounds = tuple(b * factor for b in x.bounds)
    needs = [(o0 // factor, o1 // factor) for o0, o1 in pairwise(out_bounds)]
    spatial = list(out_shape[2:])

    def compute(rows, t):
        size = spatial.copy()
        size[x.hdim - 2] = out_bounds[t + 1] - out_bounds[t]
        return func(rows, size, *args[2:], **kwargs)
    return run.stencil(x, out_bounds, needs, compute, out_shape, x.dtype, "an upsampling")


def _pad_rule(run, func, args, kwargs):
    """Constant padding (F.pad): the padded rows belong to the first and last slabs."""
    x, pad = args[0], list(args[1])
    value = args[2] if len(args) > 2 else kwargs.get("value", 0)
    x = run.as_slab(x, x.dim() - 2) if x.dim() in (4, 5) else x
    if not is_slab(x):
        return func(*args, **kwargs)
    slot = 2 * (x.dim() - 1 - x.hdim)
    top, bottom = (pad[slot], pad[slot + 1]) if slot + 1 < len(pad) else (0, 0)
    if top < 0 or bottom < 0:
        return run.gathered(func, (x, *args[1:]), kwargs)
    out_shape = meta_run(func, (x, *args[1:]), kwargs).shape
    total, out_rows = x.bounds[-1], out_shape[x.hdim]
    out_bounds = (0, *(b + top for b in x.bounds[1:-1]), out_rows)
    needs = [(max(o0 - top, 0), min(o1 - top, total)) for o0, o1 in pairwise(out_bounds)]

    def compute(rows, t):
        tile_pad = pad.copy()
        tile_pad[slot] = max(top - out_bounds[t], 0)
        tile_pad[slot + 1] = max(out_bounds[t + 1] - top - total, 0)
        return func(rows, tile_pad, value)
    return run.stencil(x, out_bounds, needs, compute, out_shape, x.dtype, "a padding")


def _patch_unembed_rule(run, func, args, kwargs):
    """ViT tokens (whole, at patch resolution) -> image slabs: each slab unembeds its rows of the patch grid."""
    tokens, patch, grid_h, grid_w = args[:4]
    if is_slab(tokens):
        tokens = run.gather(tokens, str(func))
    bounds = run.bounds_for(grid_h * patch, patch)
    if bounds is None:
        return func(tokens, *args[1:], **kwargs)
    out = meta_run(func, (tokens, *args[1:]), kwargs)
    parts = {}
    for t in run.executor.local(len(bounds) - 1):
        g0, g1 = bounds[t] // patch, bounds[t + 1] // patch
        rows = tokens[:, g0 * grid_w:g1 * grid_w]
        parts[t] = run.executor.keep(func(rows, patch, g1 - g0, grid_w, *args[4:], **kwargs))
    return run.slab(parts, bounds, 2, out.shape, out.dtype)


def _new_tensor_rule(run, func, args, kwargs):
    """x.new_zeros(size) and friends: x only lends dtype and device. A result with a known slab height is made
    directly as slabs (e.g. a video decoder's zero cache frame), never whole."""
    x = args[0]
    if not is_slab(x):
        return func(*args, **kwargs)
    out = func(torch.empty(0, dtype=x.dtype, device=run.executor.device), *args[1:], **kwargs)
    bounds = run.bounds_for(out.shape[-2]) if out.dim() >= 4 else None
    return out if bounds is None else run.scatter(out, bounds, out.dim() - 2)


def _bilinear_rule(run, func, args, kwargs):
    """Bilinear upsampling (align_corners=False) by an integer factor: output row y reads input rows around
    (y + 0.5) / f - 0.5, so a slab takes one halo row from each neighbour (none at the image border, where the
    op clamps) and keeps its own output rows."""
    x = args[0]
    x = run.as_slab(x, x.dim() - 2) if x.dim() == 4 else x
    align_corners = args[2] if len(args) > 2 else kwargs.get("align_corners", False)
    if not is_slab(x):
        return func(*args, **kwargs)
    out_shape = meta_run(func, (x, *args[1:]), kwargs).shape
    rows_in, rows_out = x.shape[x.hdim], out_shape[x.hdim]
    factor = rows_out // rows_in
    scales = [a for a in args[3:] if a is not None] if func == aten.upsample_bilinear2d.default else []
    if align_corners or x.hdim != 2 or rows_out % rows_in or any(scale != factor for scale in scales[:1]):
        return run.gathered(func, (x, *args[1:]), kwargs)
    out_bounds = tuple(b * factor for b in x.bounds)
    needs = [(max(o0 // factor - 1, 0), min(o1 // factor + 1, rows_in)) for o0, o1 in pairwise(out_bounds)]

    def compute(rows, t):
        start = needs[t][0] * factor
        full = torch.nn.functional.interpolate(rows, size=(rows.shape[2] * factor, out_shape[3]), mode="bilinear",
                                               align_corners=False)
        return full[:, :, out_bounds[t] - start:out_bounds[t + 1] - start]
    return run.stencil(x, out_bounds, needs, compute, out_shape, x.dtype, "a bilinear upsampling")


SPATIAL_RULES: dict = {
    aten.convolution.default: _conv_rule,
    aten.pixel_shuffle.default: _shuffle_rule,
    torch.ops.fastdec.pixel_shuffle.default: _shuffle_rule,
    torch.ops.fastdec.patch_unembed.default: _patch_unembed_rule,
    aten.upsample_nearest2d.default: _upsample_rule,
    aten.upsample_nearest3d.default: _upsample_rule,
    aten._upsample_nearest_exact2d.default: _upsample_rule,
    aten._upsample_nearest_exact3d.default: _upsample_rule,
    aten.constant_pad_nd.default: _pad_rule,
    aten.upsample_bilinear2d.default: _bilinear_rule,
    aten.upsample_bilinear2d.vec: _bilinear_rule,
    aten.new_zeros.default: _new_tensor_rule,
    aten.new_empty.default: _new_tensor_rule,
    aten.new_ones.default: _new_tensor_rule,
    aten.new_full.default: _new_tensor_rule,
}
