"""Exact tiled decoding: any fastdec decoder, split into row slabs, with the same pixels as the untiled decode.

One decomposition, two executors. The decoder module runs unchanged; its latents are wrapped in a ``SlabTensor``
(the global shape, and the slab parts: row ranges of the height axis), and a ``TorchDispatchMode`` runs every op
the module issues slab by slab with the rule that keeps it exact:

* convolutions (any kernel, stride, dilation, 2-D or 3-D): a slab takes the rows it needs from its neighbours (a
  halo) instead of zero padding, and zero rows only at the true image border;
* ``fastdec.group_norm_act`` and GroupNorm: statistics over all slabs in two passes (partial sums, then the sum of
  squared deviations from the global mean), then each slab is normalised;
* pixel shuffles (``phase_offset`` 0 or 1), nearest upsampling and zero padding: local, with a halo where needed;
* elementwise ops, per-pixel reductions over other axes (channel norms), views that keep the height axis, per-channel
  eval-mode BatchNorm, cat/stack/slice/select on other axes: local;
* anything else (attention over all positions, token reshapes): the slabs are gathered into one tensor and the op
  runs whole. Decoders do this only at latent resolution (the mid-block attention, ViT tokens), where the image is
  small; a later spatial op (conv, norm, shuffle, patch_unembed) splits a whole tensor back into slabs.

The executors differ only in where slabs live and how halos and statistics travel:

* ``HostTiles`` (one device, ``tiled_decode``): all slabs are kept in host memory; each step moves one slab (plus
  halo) to the device, computes, and moves the result back, so device memory is bounded by the slab size;
* ``fastdec.parallel.RankSlabs`` (torch.distributed): rank r holds slab r; halos go to neighbours by send/recv,
  statistics are all-reduced, gathers are all_gathers.

Both check the same rule: a slab's halo must come from its immediate neighbours (a slab smaller than a halo is an
error that names the op and the smallest tile that works). Families plug in without code here: the rules are per op.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Iterator
from itertools import pairwise

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from fastdec import ops  # noqa: F401  (registers torch.ops.fastdec.*, which the rules below name)
from fastdec.kernels.group_norm_act import _compute_dtype
from fastdec.validate import check_latents, weights_device_and_dtype

logger = logging.getLogger("fastdec")
aten = torch.ops.aten

Bounds = tuple[int, ...]  # slab boundaries along the height axis: 0 = b_0 < b_1 < ... < b_n = rows


class TileError(ValueError):
    """A tiling that cannot be exact: slabs smaller than an op's halo, or a bad tile size / world size."""


def even_bounds(rows: int, tiles: int) -> Bounds:
    """``tiles`` slabs of ``rows`` rows, as equal as possible (sizes differ by at most one)."""
    if not 1 <= tiles <= rows:
        raise TileError(f"cannot split {rows} latent rows into {tiles} slabs: need 1 <= slabs <= rows")
    return tuple(i * rows // tiles for i in range(tiles + 1))


# --- the slab tensor -----------------------------------------------------------------------------------------------


class SlabTensor(Tensor):
    """A tensor split into row slabs along axis ``hdim``: ``parts[t]`` holds rows ``bounds[t]:bounds[t+1]`` (only
    the slabs this executor holds). Reports the global shape, dtype and the compute device; its ops run only inside
    a ``TiledRun``."""

    parts: dict[int, Tensor]
    bounds: Bounds
    hdim: int

    @staticmethod
    def __new__(cls, parts: dict[int, Tensor], bounds: Bounds, hdim: int, shape, dtype, device):
        self = Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device, requires_grad=False)
        self.parts, self.bounds, self.hdim = parts, tuple(bounds), hdim
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __repr__(self) -> str:
        return f"SlabTensor(shape={tuple(self.shape)}, bounds={self.bounds}, hdim={self.hdim})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(
            f"{func} on a SlabTensor outside its tiling run: slab tensors exist only inside tiled_decode / "
            "fastdec.parallel.decode, which return plain tensors"
        )


def _is_slab(x) -> bool:
    return isinstance(x, SlabTensor)


# --- executors -----------------------------------------------------------------------------------------------------


class Executor:
    """Where slabs live and how they meet: the part of tiling that differs between one device and many ranks."""

    device: torch.device

    def local(self, tiles: int) -> list[int]:
        """The slab indices held here."""
        raise NotImplementedError

    def load(self, part: Tensor) -> Tensor:
        """A held slab, on the compute device."""
        return part

    def keep(self, tensor: Tensor) -> Tensor:
        """A computed slab, to where slabs are held."""
        return tensor

    def rows(self, x: SlabTensor, needs: list[tuple[int, int]]) -> Iterator[tuple[int, Tensor]]:
        """For each held slab t, rows ``needs[t]`` of x on the compute device (zeros outside the image)."""
        raise NotImplementedError

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """Sum over executors (one device: the tensor itself)."""
        return tensor

    def gather(self, x: SlabTensor) -> Tensor:
        """The whole tensor on the compute device."""
        raise NotImplementedError


def _zeros_rows(like: Tensor, hdim: int, count: int) -> Tensor:
    shape = list(like.shape)
    shape[hdim] = count
    return like.new_zeros(shape)


def assemble_rows(pieces: dict[int, Tensor], bounds: Bounds, hdim: int, start: int, stop: int,
                  fetch: Callable[[Tensor], Tensor]) -> Tensor:
    """Rows [start, stop) of a slabbed tensor from the slabs in ``pieces`` (each moved by ``fetch``); rows outside
    [0, total) are zeros (the zero padding of the true image border)."""
    total, chunks = bounds[-1], []
    any_piece = next(iter(pieces.values()))
    if start < 0:
        chunks.append(_zeros_rows(fetch(any_piece.narrow(hdim, 0, 0)), hdim, -start))
    for t, part in pieces.items():
        lo, hi = max(start, bounds[t]), min(stop, bounds[t + 1])
        if lo < hi:
            chunks.append(fetch(part.narrow(hdim, lo - bounds[t], hi - lo)))
    if stop > total:
        chunks.append(_zeros_rows(fetch(any_piece.narrow(hdim, 0, 0)), hdim, stop - total))
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, hdim)


class HostTiles(Executor):
    """One device: every slab is held in ``storage`` memory (host RAM by default) and moved to ``device`` only
    while it is computed on, so device memory holds one slab (plus halo) at a time."""

    def __init__(self, device: torch.device, storage: torch.device | str = "cpu"):
        self.device, self.storage = torch.device(device), torch.device(storage)
        self.peak_slab_bytes = 0  # largest slab input + output moved to the device at once (bench accounting)

    def local(self, tiles: int) -> list[int]:
        return list(range(tiles))

    def load(self, part: Tensor) -> Tensor:
        return part.to(self.device)

    def keep(self, tensor: Tensor) -> Tensor:
        if tensor.device == self.storage:
            return tensor
        return tensor.to(self.storage)

    def rows(self, x: SlabTensor, needs: list[tuple[int, int]]) -> Iterator[tuple[int, Tensor]]:
        for t, (start, stop) in enumerate(needs):
            yield t, assemble_rows(x.parts, x.bounds, x.hdim, start, stop, self.load)

    def gather(self, x: SlabTensor) -> Tensor:
        return torch.cat([self.load(x.parts[t]) for t in range(len(x.bounds) - 1)], x.hdim)

    def note(self, *tensors: Tensor) -> None:
        self.peak_slab_bytes = max(self.peak_slab_bytes, sum(t.numel() * t.element_size() for t in tensors))


# --- the run: dispatch every op to its rule ------------------------------------------------------------------------

_ACTIVE: list[TiledRun] = []


def tiling_active() -> bool:
    """True inside a tiled or parallel decode (so a Decoder does not tile again)."""
    return bool(_ACTIVE)


class TiledRun(TorchDispatchMode):
    """Runs a module's ops on slabs (see the module docstring). ``latent_bounds`` is the slab split at latent
    resolution; whole tensors whose height is a multiple or divisor of the latent height are split the same way."""

    def __init__(self, executor: Executor, latent_rows: int, latent_bounds: Bounds):
        super().__init__()
        self.executor, self.latent_rows, self.latent_bounds = executor, latent_rows, tuple(latent_bounds)
        self.gathers: list[tuple[str, tuple[int, ...]]] = []  # (op, shape) of every gathered tensor

    def __enter__(self):
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = RULES.get(func)
        if rule is not None:
            return rule(self, func, args, kwargs)
        flat, _ = tree_flatten((args, kwargs))
        if not any(_is_slab(a) for a in flat):
            return func(*args, **kwargs)
        if torch.Tag.pointwise in func.tags or func in LOCAL_OPS:
            return local_op(self, func, args, kwargs)
        return self.gathered(func, args, kwargs)

    # -- building blocks used by the rules --

    def slab(self, parts: dict[int, Tensor], bounds: Bounds, hdim: int, shape, dtype) -> SlabTensor:
        return SlabTensor(parts, bounds, hdim, shape, dtype, self.executor.device)

    def gather(self, x: SlabTensor, why: str) -> Tensor:
        self.gathers.append((why, tuple(x.shape)))
        logger.debug("tiling: gathering %s for %s", tuple(x.shape), why)
        return self.executor.gather(x)

    def gathered(self, func, args, kwargs):
        """Fallback: run ``func`` on whole tensors."""
        args, kwargs = tree_map(lambda a: self.gather(a, str(func)) if _is_slab(a) else a, (args, kwargs))
        return func(*args, **kwargs)

    def scatter(self, whole: Tensor, bounds: Bounds, hdim: int) -> SlabTensor:
        """A whole tensor (the same on every executor) split into slabs."""
        parts = {t: self.executor.keep(whole.narrow(hdim, bounds[t], bounds[t + 1] - bounds[t]).clone())
                 for t in self.executor.local(len(bounds) - 1)}
        return self.slab(parts, bounds, hdim, whole.shape, whole.dtype)

    def bounds_for(self, rows: int, align: int = 1) -> Bounds | None:
        """The latent split scaled to a tensor of ``rows`` rows (boundaries on multiples of ``align``), or None."""
        h = self.latent_rows
        if rows % h and h % rows:
            return None
        bounds = tuple(round(b * rows / h / align) * align for b in self.latent_bounds)
        bounds = bounds[:-1] + (rows,)
        if any(lo >= hi for lo, hi in pairwise(bounds)):
            return None
        return bounds

    def as_slab(self, x, hdim: int, align: int = 1):
        """x itself if it is a slab; a whole tensor split like the latents when its height allows, else None."""
        if _is_slab(x):
            return x
        if isinstance(x, Tensor) and x.dim() > hdim:
            bounds = self.bounds_for(x.shape[hdim], align)
            if bounds is not None:
                return self.scatter(x, bounds, hdim)
        return None

    def check_halo(self, x: SlabTensor, needs: list[tuple[int, int]], what: str) -> None:
        """Every slab's needed rows (clipped to the image) must lie in itself and its two neighbours."""
        bounds, total = x.bounds, x.bounds[-1]
        tiles = len(bounds) - 1
        for t, (start, stop) in enumerate(needs):
            lo, hi = max(start, 0), min(stop, total)
            first, last = bounds[max(t - 1, 0)], bounds[min(t + 2, tiles)]
            if lo < first or hi > last:
                smallest = min(b - a for a, b in pairwise(bounds))
                raise TileError(
                    f"tiles too small for {what}: slab {t} of its input (rows {bounds[t]}:{bounds[t + 1]} of "
                    f"{total}, the smallest slab has {smallest} rows) needs rows {start}:{stop}, beyond its "
                    "neighbouring slabs: use a larger tile_size (or fewer ranks) so that every slab is at least as "
                    "tall as the op's halo"
                )

    def stencil(self, x: SlabTensor, out_bounds: Bounds, needs: list[tuple[int, int]], compute, shape, dtype,
                what: str) -> SlabTensor:
        """Slab t of the output = compute(rows needs[t] of x, t)."""
        if any(lo >= hi for lo, hi in pairwise(out_bounds)):
            raise TileError(
                f"tiles too small for {what}: an output slab would be empty (slab bounds {out_bounds}); use a "
                "larger tile_size or fewer ranks"
            )
        self.check_halo(x, needs, what)
        parts = {}
        for t, rows in self.executor.rows(x, needs):
            out = compute(rows, t)
            if isinstance(self.executor, HostTiles):
                self.executor.note(rows, out)
            parts[t] = self.executor.keep(out)
        return self.slab(parts, out_bounds, x.hdim, shape, dtype)


def _meta(x):
    if isinstance(x, Tensor):
        return torch.empty(x.shape, dtype=x.dtype, device="meta")
    return x


def _meta_run(func, args, kwargs):
    return func(*tree_map(_meta, args), **tree_map(_meta, kwargs))


# --- local ops: elementwise, per-pixel reductions, views that keep the height axis ---------------------------------

LOCAL_OPS = {
    aten.clone.default, aten._to_copy.default, aten.copy_.default, aten.detach.default, aten.alias.default,
    aten.cat.default, aten.stack.default, aten.select.int, aten.unbind.int, aten.slice.Tensor,
    aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.index_select.default,
    aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default, aten.linalg_vector_norm.default,
    aten.clamp_min.default, aten.clamp_max.default, aten.native_batch_norm.default,
    aten._native_batch_norm_legit_no_training.default, aten.masked_fill.Scalar, aten.where.self,
    torch.ops.fastdec.rms_norm_act.default,  # RMS over the channels of each pixel (Wan, DC-AE)
}


def _probe(x: Tensor, hdim: int, rows: int):
    shape = list(x.shape)
    shape[hdim] = rows
    return torch.empty(shape, dtype=x.dtype, device="meta")


def local_op(run: TiledRun, func, args, kwargs):
    """An op that works row by row: run it on each slab. Which output axis is the height axis is found by running
    the op on meta tensors with one extra row: a row-local op grows exactly that axis by one. An op that does not
    (a reduction or slice along the height) is gathered instead."""
    if func in (aten.native_batch_norm.default,) and args[5]:
        return run.gathered(func, args, kwargs)  # batch statistics in training mode
    flat, spec = tree_flatten((args, kwargs))
    slabs = [a for a in flat if _is_slab(a)]
    ref = slabs[0]
    tail = ref.dim() - ref.hdim  # the height axis counted from the right: broadcasting aligns from the right
    total = ref.bounds[-1]
    for i, a in enumerate(flat):
        if _is_slab(a) and (a.bounds != ref.bounds or a.dim() - a.hdim != tail):
            flat[i] = run.scatter(run.gather(a, f"{func} (slab layout mismatch)"), ref.bounds, a.dim() - tail)

    def spans(a) -> bool:  # a whole tensor that has the height axis (to be cut into rows)
        return (isinstance(a, Tensor) and not _is_slab(a) and a.dim() >= tail and a.shape[a.dim() - tail] == total
                and total > 1)

    def probe(rows: int):
        return tree_unflatten([
            _probe(a, a.dim() - tail, rows) if _is_slab(a) or spans(a) else _meta(a) for a in flat], spec)

    base_args, base_kwargs = probe(total)
    grown_args, grown_kwargs = probe(total + 1)
    base, grown = func(*base_args, **base_kwargs), func(*grown_args, **grown_kwargs)
    base_flat, out_spec = tree_flatten(base)
    grown_flat, _ = tree_flatten(grown)
    out_hdims = []
    for b, g in zip(base_flat, grown_flat, strict=True):
        hdim = None
        if isinstance(b, Tensor):
            changed = [d for d in range(b.dim()) if b.shape[d] != g.shape[d]]
            if len(changed) == 1 and b.shape[changed[0]] == total and g.shape[changed[0]] == total + 1:
                hdim = changed[0]
            elif changed:
                return run.gathered(func, args, kwargs)
        out_hdims.append(hdim)
    if not any(h is not None for h in out_hdims):
        return run.gathered(func, args, kwargs)

    mutated = func._schema.is_mutable
    results: dict[int, list] = {}
    executor = run.executor
    for t in executor.local(len(ref.bounds) - 1):
        lo, hi = ref.bounds[t], ref.bounds[t + 1]
        tile_flat = [executor.load(a.parts[t]) if _is_slab(a)
                     else a.narrow(a.dim() - tail, lo, hi - lo) if spans(a) else a for a in flat]
        tile_args, tile_kwargs = tree_unflatten(tile_flat, spec)
        out = func(*tile_args, **tile_kwargs)
        if mutated:  # in-place on a slab: write the result back where the slab is held
            for a, tile in zip(flat, tile_flat, strict=True):
                if _is_slab(a) and tile is not a.parts[t]:
                    a.parts[t].copy_(tile)
        results[t] = tree_flatten(out)[0]
    if mutated and _is_slab(args[0]):
        return args[0]
    outputs = []
    for i, (b, hdim) in enumerate(zip(base_flat, out_hdims, strict=True)):
        if hdim is None:
            outputs.append(next(iter(results.values()))[i])  # the same on every slab (e.g. BatchNorm's empties)
        else:
            parts = {t: executor.keep(r[i]) for t, r in results.items()}
            outputs.append(run.slab(parts, ref.bounds, hdim, b.shape, b.dtype))
    return tree_unflatten(outputs, out_spec)


def _per_slab(run: TiledRun, x: SlabTensor, hdim: int, shape, dtype, op: Callable[[Tensor, int], Tensor],
              compute: bool = False):
    """op(part, rows of the part) on each slab: where the slab is held (views), or on the compute device."""
    executor, parts = run.executor, {}
    for t, part in x.parts.items():
        rows = x.bounds[t + 1] - x.bounds[t]
        parts[t] = executor.keep(op(executor.load(part), rows)) if compute else op(part, rows)
    return run.slab(parts, x.bounds, hdim, shape, dtype)


def _view_rule(run, func, args, kwargs):
    x = args[0]
    if not _is_slab(x):
        return func(*args, **kwargs)
    out_shape = list(_meta_run(func, args, kwargs).shape)
    in_shape, k = list(x.shape), x.hdim
    for j, n in enumerate(out_shape):
        if (n == in_shape[k] and math.prod(out_shape[:j]) == math.prod(in_shape[:k])
                and math.prod(out_shape[j + 1:]) == math.prod(in_shape[k + 1:])):
            def op(part, rows, j=j):
                return part.reshape(out_shape[:j] + [rows] + out_shape[j + 1:])
            return _per_slab(run, x, j, out_shape, x.dtype, op)
    return run.gathered(func, args, kwargs)


def _expand_rule(run, func, args, kwargs):
    x, size = args[0], list(args[1])
    if not _is_slab(x):
        return func(*args, **kwargs)
    hdim = x.hdim + len(size) - x.dim()
    if size[hdim] not in (-1, x.shape[x.hdim]):
        return run.gathered(func, args, kwargs)
    out_shape = _meta_run(func, args, kwargs).shape

    def op(part, rows):
        return part.expand(size[:hdim] + [rows] + size[hdim + 1:])
    return _per_slab(run, x, hdim, out_shape, x.dtype, op)


def _axes_rule(new_hdim: Callable):
    """permute / transpose / unsqueeze / squeeze: the same op on each slab, the height axis moved."""
    def rule(run, func, args, kwargs):
        x = args[0]
        if not _is_slab(x):
            return func(*args, **kwargs)
        out_shape = _meta_run(func, args, kwargs).shape
        hdim = new_hdim(x, *args[1:])
        if hdim is None:
            return run.gathered(func, args, kwargs)
        return _per_slab(run, x, hdim, out_shape, x.dtype, lambda part, rows: func(part, *args[1:], **kwargs))
    return rule


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _permute_hdim(x, dims):
    return [_norm_dim(d, x.dim()) for d in dims].index(x.hdim)


def _transpose_hdim(x, a, b):
    a, b = _norm_dim(a, x.dim()), _norm_dim(b, x.dim())
    return b if x.hdim == a else a if x.hdim == b else x.hdim


def _unsqueeze_hdim(x, d):
    return x.hdim + (_norm_dim(d, x.dim() + 1) <= x.hdim)


def _squeeze_hdim(x, dims):
    dims = [_norm_dim(d, x.dim()) for d in ([dims] if isinstance(dims, int) else dims)]
    dropped = [d for d in dims if x.shape[d] == 1]
    return None if x.hdim in dropped else x.hdim - sum(d < x.hdim for d in dropped)


# --- spatial ops ---------------------------------------------------------------------------------------------------


def _spatial_index(x: Tensor, hdim: int) -> int:
    """Index of the height axis among the spatial axes of a (N, C, *spatial) tensor."""
    return hdim - 2


def _conv_bounds(bounds: Bounds, k: int, stride: int, pad: int, out_rows: int) -> Bounds:
    """Output slab boundaries of a conv: the output row whose window centre is nearest each input boundary
    (ties down), so same-size convs keep the boundaries and strided ones divide them."""
    inner = [-((-(2 * b + 2 * pad - k + 1 - stride)) // (2 * stride)) for b in bounds[1:-1]]
    return (0, *(min(max(b, 0), out_rows) for b in inner), out_rows)


def _conv_rule(run, func, args, kwargs):
    x, weight, bias, stride, padding, dilation, transposed, output_padding, groups = args
    x = run.as_slab(x, x.dim() - 2) if x.dim() in (4, 5) and not transposed else x
    if not _is_slab(x) or transposed or x.hdim != x.dim() - 2:
        return run.gathered(func, (x, *args[1:]), kwargs) if _is_slab(x) else func(*args, **kwargs)
    i = _spatial_index(x, x.hdim)
    k = dilation[i] * (weight.shape[2 + i] - 1) + 1
    s, p = stride[i], padding[i]
    out_shape = _meta_run(func, (x, *args[1:]), kwargs).shape
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
    if not _is_slab(x) or x.hdim != x.dim() - 2:
        return run.gathered(func, args, kwargs) if _is_slab(x) else func(*args, **kwargs)
    out_shape = _meta_run(func, (x, *args[1:]), kwargs).shape
    out_bounds = tuple(min(b * factor, out_shape[x.hdim]) for b in x.bounds[:-1]) + (out_shape[x.hdim],)
    shrink = offset * (factor - 1)
    needs = [(o0 // factor, o1 // factor + shrink) for o0, o1 in pairwise(out_bounds)]
    return run.stencil(x, out_bounds, needs, lambda rows, t: func(rows, *args[1:], **kwargs), out_shape, x.dtype,
                       "a pixel shuffle")


def _upsample_rule(run, func, args, kwargs):
    """Nearest (and nearest-exact) upsampling by an integer factor along the height: local."""
    x = args[0]
    x = run.as_slab(x, x.dim() - 2) if x.dim() in (4, 5) else x
    if not _is_slab(x):
        return func(*args, **kwargs)
    out_shape = _meta_run(func, (x, *args[1:]), kwargs).shape
    rows_in, rows_out = x.shape[x.hdim], out_shape[x.hdim]
    if x.hdim != x.dim() - 2 or rows_out % rows_in:
        return run.gathered(func, (x, *args[1:]), kwargs)
    factor = rows_out // rows_in
    out_bounds = tuple(b * factor for b in x.bounds)
    needs = [(o0 // factor, o1 // factor) for o0, o1 in pairwise(out_bounds)]
    spatial = list(out_shape[2:])

    def compute(rows, t):
        size = spatial.copy()
        size[_spatial_index(x, x.hdim)] = (out_bounds[t + 1] - out_bounds[t])
        return func(rows, size, *args[2:], **kwargs)
    return run.stencil(x, out_bounds, needs, compute, out_shape, x.dtype, "an upsampling")


def _pad_rule(run, func, args, kwargs):
    """Constant padding (F.pad): the padded rows belong to the first and last slabs."""
    x, pad = args[0], list(args[1])
    value = args[2] if len(args) > 2 else kwargs.get("value", 0)
    x = run.as_slab(x, x.dim() - 2) if x.dim() in (4, 5) else x
    if not _is_slab(x):
        return func(*args, **kwargs)
    slot = 2 * (x.dim() - 1 - x.hdim)
    top, bottom = (pad[slot], pad[slot + 1]) if slot + 1 < len(pad) else (0, 0)
    if top < 0 or bottom < 0:
        return run.gathered(func, (x, *args[1:]), kwargs)
    out_shape = _meta_run(func, (x, *args[1:]), kwargs).shape
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
    if _is_slab(tokens):
        tokens = run.gather(tokens, str(func))
    bounds = run.bounds_for(grid_h * patch, patch)
    if bounds is None:
        return func(tokens, *args[1:], **kwargs)
    out = _meta_run(func, (tokens, *args[1:]), kwargs)
    parts = {}
    for t in run.executor.local(len(bounds) - 1):
        g0, g1 = bounds[t] // patch, bounds[t + 1] // patch
        rows = tokens[:, g0 * grid_w:g1 * grid_w]
        parts[t] = run.executor.keep(func(rows, patch, g1 - g0, grid_w, *args[4:], **kwargs))
    return run.slab(parts, bounds, 2, out.shape, out.dtype)


# --- normalisation: statistics over all slabs ----------------------------------------------------------------------


def _group_stats(run: TiledRun, x: SlabTensor, groups: int) -> tuple[Tensor, Tensor]:
    """Per (sample, group) mean and variance over every slab, in one pass over the data: each slab's (mean, M2) in
    fp32 (torch.var_mean), combined across slabs in fp64 with Chan's formula (all-reduced twice: the global mean,
    then sum_t M2_t + n_t (mean_t - mean)^2), so offset data does not cancel the way E[x^2] - E[x]^2 does."""
    executor, batch = run.executor, x.shape[0]
    stats = {}
    for t in x.parts:
        g = executor.load(x.parts[t]).reshape(batch, groups, -1)
        var, mean = torch.var_mean(g.to(_compute_dtype(g)), dim=-1, correction=0)
        stats[t] = (g.shape[-1], mean.double(), var.double() * g.shape[-1])
    count = x.numel() // (batch * groups)
    zeros = torch.zeros(batch, groups, dtype=torch.float64, device=executor.device)
    mean = executor.all_reduce(sum((n * m for n, m, _ in stats.values()), zeros.clone())) / count
    m2 = executor.all_reduce(sum((m2 + n * (m - mean).square() for n, m, m2 in stats.values()), zeros.clone()))
    return mean, m2 / count


def _normalise(run: TiledRun, x: SlabTensor, groups: int, weight, bias, eps: float, act: str, mean: Tensor,
               var: Tensor) -> SlabTensor:
    """act(group norm) of each slab with the global statistics: one eval-mode batch_norm pass (per-channel mean and
    variance = its group's; the batch folded into the channels), then the activation in place."""
    batch, channels = x.shape[:2]
    per_channel = channels // groups

    def norm(part, rows):
        compute = _compute_dtype(part)
        flat = part.to(compute).reshape(1, batch * channels, -1)
        stat_mean = mean.to(compute).repeat_interleave(per_channel, 1).flatten()
        stat_var = var.to(compute).repeat_interleave(per_channel, 1).flatten()
        w = None if weight is None else weight.to(compute).repeat(batch)
        b = None if bias is None else bias.to(compute).repeat(batch)
        y = torch.nn.functional.batch_norm(flat, stat_mean, stat_var, w, b, training=False, eps=eps)
        y = y.reshape(part.shape)
        if act == "silu":
            torch.nn.functional.silu(y, inplace=True)
        elif act == "relu":
            y.relu_()
        return y.to(part.dtype)
    return _per_slab(run, x, x.hdim, x.shape, x.dtype, norm, compute=True)


def _group_norm_act_rule(run, func, args, kwargs):
    x, groups, weight, bias = args[:4]
    eps = args[4] if len(args) > 4 else kwargs.get("eps", 1e-6)
    act = args[5] if len(args) > 5 else kwargs.get("act", "none")
    x = run.as_slab(x, x.dim() - 2) if x.dim() in (4, 5) else x
    if not _is_slab(x) or x.hdim != x.dim() - 2:
        return run.gathered(func, args, kwargs) if _is_slab(x) else func(*args, **kwargs)
    mean, var = _group_stats(run, x, groups)
    return _normalise(run, x, groups, weight, bias, eps, act, mean, var)


def _native_group_norm_rule(run, func, args, kwargs):
    x, weight, bias, n, c, hw, groups, eps = args
    x = run.as_slab(x, x.dim() - 2) if x.dim() in (4, 5) else x
    if not _is_slab(x) or x.hdim != x.dim() - 2:
        return run.gathered(func, args, kwargs) if _is_slab(x) else func(*args, **kwargs)
    mean, var = _group_stats(run, x, groups)
    out = _normalise(run, x, groups, weight, bias, eps, "none", mean, var)
    return out, mean.to(x.dtype), torch.rsqrt(var + eps).to(x.dtype)


def _new_tensor_rule(run, func, args, kwargs):
    """x.new_zeros(size) and friends: x only lends dtype and device. A result with a known slab height is made
    directly as slabs (e.g. a video decoder's zero cache frame), never whole."""
    x = args[0]
    if not _is_slab(x):
        return func(*args, **kwargs)
    out = func(torch.empty(0, dtype=x.dtype, device=run.executor.device), *args[1:], **kwargs)
    bounds = run.bounds_for(out.shape[-2]) if out.dim() >= 4 else None
    if bounds is None:
        return out
    hdim = out.dim() - 2
    return run.slab({t: run.executor.keep(out.narrow(hdim, bounds[t], bounds[t + 1] - bounds[t]).clone())
                     for t in run.executor.local(len(bounds) - 1)}, bounds, hdim, out.shape, out.dtype)


def _bilinear_rule(run, func, args, kwargs):
    """Bilinear upsampling (align_corners=False) by an integer factor: output row y reads input rows around
    (y + 0.5) / f - 0.5, so a slab takes one halo row from each neighbour (none at the image border, where the
    op clamps) and keeps its own output rows."""
    x = args[0]
    x = run.as_slab(x, x.dim() - 2) if x.dim() == 4 else x
    align_corners = args[2] if len(args) > 2 else kwargs.get("align_corners", False)
    if not _is_slab(x):
        return func(*args, **kwargs)
    out_shape = _meta_run(func, (x, *args[1:]), kwargs).shape
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


RULES: dict = {
    aten.convolution.default: _conv_rule,
    aten.pixel_shuffle.default: _shuffle_rule,
    torch.ops.fastdec.pixel_shuffle.default: _shuffle_rule,
    torch.ops.fastdec.group_norm_act.default: _group_norm_act_rule,
    torch.ops.fastdec.patch_unembed.default: _patch_unembed_rule,
    aten.native_group_norm.default: _native_group_norm_rule,
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
    aten.view.default: _view_rule,
    aten._unsafe_view.default: _view_rule,
    aten.reshape.default: _view_rule,
    aten.expand.default: _expand_rule,
    aten.permute.default: _axes_rule(_permute_hdim),
    aten.transpose.int: _axes_rule(_transpose_hdim),
    aten.unsqueeze.default: _axes_rule(_unsqueeze_hdim),
    aten.squeeze.dim: _axes_rule(_squeeze_hdim),
    aten.squeeze.dims: _axes_rule(_squeeze_hdim),
}


# --- decoding ------------------------------------------------------------------------------------------------------


_FACTORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def spatial_factor(decoder: nn.Module, latents: Tensor) -> int:
    """Pixels per latent row: the decoder run on the meta device at the latents' shape (nothing is computed)."""
    from torch.func import functional_call

    key = (tuple(latents.shape[1:]), latents.dtype)
    cached = _FACTORS.setdefault(decoder, {})
    if key not in cached:
        state = {name: torch.empty_like(v, device="meta") for name, v in decoder.state_dict().items()}
        meta = torch.empty(latents.shape, dtype=latents.dtype, device="meta")
        with torch.no_grad():
            out = functional_call(decoder, state, (meta,))
        rows_in, rows_out = latents.shape[-2], out.shape[-2]
        if rows_out % rows_in:
            raise TileError(f"{type(decoder).__name__} maps {rows_in} latent rows to {rows_out}: not a whole factor")
        cached[key] = rows_out // rows_in
    return cached[key]


def latent_tile_rows(decoder: nn.Module, latents: Tensor, tile_size: int) -> int:
    """Latent rows per slab for a tile of ``tile_size`` pixel rows (a multiple of the decoder's pixel factor)."""
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1:
        raise TileError(f"tile_size must be a positive number of pixel rows, got {tile_size!r}")
    factor = spatial_factor(decoder, latents)
    if tile_size % factor:
        raise TileError(
            f"tile_size {tile_size} is not a multiple of {type(decoder).__name__}'s latent-to-pixel factor {factor}:"
            f" use a multiple of {factor}, e.g. {max(factor, tile_size // factor * factor)}"
        )
    return tile_size // factor


def run_decode(decoder: nn.Module, latents: Tensor, run: TiledRun) -> SlabTensor | Tensor:
    """decoder.decode on slabbed latents inside ``run`` (the latents are checked by the caller)."""
    hdim = latents.dim() - 2
    with torch.no_grad(), run:
        slab = run.scatter(latents, run.latent_bounds, hdim)
        return decoder.decode(slab, check_finite=False)


def tiled_decode(decoder: nn.Module, latents: Tensor, tile_size: int, check_finite: bool | None = None,
                 storage: torch.device | str = "cpu") -> Tensor:
    """``decoder.decode(latents)`` computed in horizontal slabs of at most ``tile_size`` pixel rows, equal to the
    untiled decode up to float reduction order (see the module docstring).

    Slabs not being computed are held on ``storage`` (host memory), so device memory is bounded by one slab;
    the image is returned on the decoder's device, like ``decode``. Works for every fastdec decoder (4-D image and
    5-D video latents: the slabs split the height; a video decoder's own frame chunking runs inside)."""
    check_latents(latents, decoder, check_finite)
    rows = latent_tile_rows(decoder, latents, tile_size)
    h = latents.shape[-2]
    bounds = even_bounds(h, math.ceil(h / rows))
    device, _ = weights_device_and_dtype(decoder)
    run = TiledRun(HostTiles(device, storage), h, bounds)
    out = run_decode(decoder, latents, run)
    return run.executor.gather(out) if _is_slab(out) else out


# --- automatic tiling ----------------------------------------------------------------------------------------------

_PEAK_PER_LATENT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _PeakBytes(TorchDispatchMode):
    """Live bytes of the tensors ops create (meta tensors: nothing is computed), and their peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and not func._schema.is_mutable:
            for t in tree_flatten(out)[0]:
                if isinstance(t, Tensor):
                    nbytes = t.numel() * t.element_size()
                    self.live += nbytes
                    weakref.finalize(t, self._free, nbytes)
            self.peak = max(self.peak, self.live)
        return out


def estimate_decode_bytes(decoder: nn.Module, latents: Tensor) -> int:
    """Estimated peak extra memory of an untiled decode of ``latents``: the decoder is run once on the meta device
    at a small size per latent shape (cached), and the peak of live activations scaled by the latent area."""
    from torch.func import functional_call

    probe_rows = 16
    key = (tuple(latents.shape[1:-2]), latents.dtype)
    cached = _PEAK_PER_LATENT.setdefault(decoder, {})
    if key not in cached:
        state = {name: torch.empty_like(v, device="meta") for name, v in decoder.state_dict().items()}
        meta = torch.empty((1, *latents.shape[1:-2], probe_rows, probe_rows), dtype=latents.dtype, device="meta")
        with torch.no_grad(), _PeakBytes() as counter:
            functional_call(decoder, state, (meta,))
        cached[key] = counter.peak / probe_rows**2
    return int(cached[key] * latents.shape[0] * latents.shape[-2] * latents.shape[-1])


def free_device_bytes(device: torch.device) -> int | None:
    """Free memory on a CUDA device (free + cached by torch's allocator); None elsewhere (on the CPU the host is
    the device: slabs held in host memory would not lower the peak)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def auto_tile_size(decoder: nn.Module, latents: Tensor, free_bytes: int | None = None) -> int | None:
    """A tile size (pixel rows) when the untiled decode would not fit in ``free_bytes`` (default: the free memory
    of the decoder's device), else None. Says so in a log line."""
    device, _ = weights_device_and_dtype(decoder)
    free_bytes = free_device_bytes(device) if free_bytes is None else free_bytes
    if free_bytes is None:
        return None
    need = estimate_decode_bytes(decoder, latents)
    if need <= 0.9 * free_bytes:
        return None
    h = latents.shape[-2]
    rows = max(1, int(h * 0.5 * free_bytes / need))
    factor = spatial_factor(decoder, latents)
    logger.warning(
        "fastdec: an untiled decode of latents %s needs about %.2f GiB, %.2f GiB free on %s: decoding exactly in "
        "slabs of %d pixel rows (tile_size=...) instead", tuple(latents.shape), need / 2**30, free_bytes / 2**30,
        device, rows * factor,
    )
    return rows * factor


def decode(decoder: nn.Module, latents: Tensor, tile_size: int | None = None,
           check_finite: bool | None = None) -> Tensor:
    """``decoder.decode(latents)``, tiled when asked or needed.

    ``tile_size``: pixel rows per slab (a multiple of the decoder's latent-to-pixel factor); 0 never tiles; None
    uses the decoder's own ``tile_size`` attribute if set, else tiles automatically when the untiled decode would
    not fit in the free memory of the decoder's CUDA device (a log line says so; never on CPU, where slabs held in
    host memory would not lower the peak)."""
    if tile_size is None:
        tile_size = getattr(decoder, "tile_size", None) or auto_tile_size(decoder, check_latents(latents, decoder,
                                                                                                  check_finite))
        check_finite = False  # checked just now
    if not tile_size:
        with _untiled():
            return decoder.decode(latents, check_finite)
    return tiled_decode(decoder, latents, tile_size, check_finite)


class _untiled:
    """Inside this block Decoder.decode ignores its ``tile_size`` attribute (an explicit tile_size=0)."""

    def __enter__(self):
        _ACTIVE.append(None)

    def __exit__(self, *exc):
        _ACTIVE.pop()
