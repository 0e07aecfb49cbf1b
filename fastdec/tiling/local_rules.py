"""Rules for ops that keep rows local: elementwise ops, per-pixel reductions over other axes, and views, reshapes
and axis moves that keep the height axis. Each runs slab by slab, with no halo."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from fastdec import ops  # noqa: F401  (registers torch.ops.fastdec.*, which the rules below name)
from fastdec.tiling.slab import SlabTensor, is_slab, meta_like, meta_run, zeros_rows

aten = torch.ops.aten

LOCAL_OPS = {
    aten.clone.default, aten._to_copy.default, aten.copy_.default, aten.detach.default, aten.alias.default,
    aten.cat.default, aten.stack.default, aten.select.int, aten.unbind.int, aten.slice.Tensor,
    aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.index_select.default,
    aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default, aten.linalg_vector_norm.default,
    aten.clamp_min.default, aten.clamp_max.default, aten.native_batch_norm.default,
    aten._native_batch_norm_legit_no_training.default, aten.masked_fill.Scalar, aten.where.self,
    torch.ops.fastdec.rms_norm_act.default,  # RMS over the channels of each pixel (Wan, DC-AE)
}


def local_op(run, func, args, kwargs):
    """An op that works row by row: run it on each slab. Which output axis is the height axis is found by running
    the op on meta tensors with one extra row: a row-local op grows exactly that axis by one. An op that does not
    (a reduction or slice along the height) is gathered instead."""
    if func == aten.native_batch_norm.default and args[5]:
        return run.gathered(func, args, kwargs)  # batch statistics in training mode
    flat, spec = tree_flatten((args, kwargs))
    slabs = [a for a in flat if is_slab(a)]
    ref = slabs[0]
    tail = ref.dim() - ref.hdim  # the height axis counted from the right: broadcasting aligns from the right
    total = ref.bounds[-1]
    for i, a in enumerate(flat):
        if is_slab(a) and (a.bounds != ref.bounds or a.dim() - a.hdim != tail):
            flat[i] = run.scatter(run.gather(a, f"{func} (slab layout mismatch)"), ref.bounds, a.dim() - tail)

    def spans(a) -> bool:  # a whole tensor that has the height axis (to be cut into rows)
        return (isinstance(a, Tensor) and not is_slab(a) and a.dim() >= tail and a.shape[a.dim() - tail] == total
                and total > 1)

    def probe(rows: int):  # the op's output on meta tensors whose height axis has ``rows`` rows
        meta_args, meta_kwargs = tree_unflatten([
            zeros_rows(meta_like(a), a.dim() - tail, rows) if is_slab(a) or spans(a) else meta_like(a)
            for a in flat], spec)
        return func(*meta_args, **meta_kwargs)

    base, grown = probe(total), probe(total + 1)
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
        tile_flat = [executor.load(a.parts[t]) if is_slab(a)
                     else a.narrow(a.dim() - tail, lo, hi - lo) if spans(a) else a for a in flat]
        tile_args, tile_kwargs = tree_unflatten(tile_flat, spec)
        out = func(*tile_args, **tile_kwargs)
        if mutated:  # in-place on a slab: write the result back where the slab is held
            for a, tile in zip(flat, tile_flat, strict=True):
                if is_slab(a) and tile is not a.parts[t]:
                    a.parts[t].copy_(tile)
        results[t] = tree_flatten(out)[0]
    if mutated and is_slab(args[0]):
        return args[0]
    outputs = []
    for i, (b, hdim) in enumerate(zip(base_flat, out_hdims, strict=True)):
        if hdim is None:
            outputs.append(next(iter(results.values()))[i])  # the same on every slab (e.g. BatchNorm's empties)
        else:
            parts = {t: executor.keep(r[i]) for t, r in results.items()}
            outputs.append(run.slab(parts, ref.bounds, hdim, b.shape, b.dtype))
    return tree_unflatten(outputs, out_spec)


def per_slab(run, x: SlabTensor, hdim: int, shape, dtype, op: Callable[[Tensor, int], Tensor],
              compute: bool = False):
    """op(part, rows of the part) on each slab: where the slab is held (views), or on the compute device."""
    executor, parts = run.executor, {}
    for t, part in x.parts.items():
        rows = x.bounds[t + 1] - x.bounds[t]
        parts[t] = executor.keep(op(executor.load(part), rows)) if compute else op(part, rows)
    return run.slab(parts, x.bounds, hdim, shape, dtype)


def _view_rule(run, func, args, kwargs):
    x = args[0]
    if not is_slab(x):
        return func(*args, **kwargs)
    out_shape = list(meta_run(func, args, kwargs).shape)
    in_shape, k = list(x.shape), x.hdim
    for j, n in enumerate(out_shape):
        if (n == in_shape[k] and math.prod(out_shape[:j]) == math.prod(in_shape[:k])
                and math.prod(out_shape[j + 1:]) == math.prod(in_shape[k + 1:])):
            def op(part, rows, j=j):
                shape = out_shape[:j] + [rows] + out_shape[j + 1:]
                try:
                    return part.view(shape)
                except RuntimeError:  # not a view of the held slab: a copy, which reads it on the host
                    run.executor.settle()
                    return part.reshape(shape)
            return per_slab(run, x, j, out_shape, x.dtype, op)
    return run.gathered(func, args, kwargs)


def _expand_rule(run, func, args, kwargs):
    x, size = args[0], list(args[1])
    if not is_slab(x):
        return func(*args, **kwargs)
    hdim = x.hdim + len(size) - x.dim()
    if size[hdim] not in (-1, x.shape[x.hdim]):
        return run.gathered(func, args, kwargs)
    out_shape = meta_run(func, args, kwargs).shape

    def op(part, rows):
        return part.expand(size[:hdim] + [rows] + size[hdim + 1:])
    return per_slab(run, x, hdim, out_shape, x.dtype, op)


def _axes_rule(new_hdim: Callable):
    """permute / transpose / unsqueeze / squeeze: the same op on each slab, the height axis moved."""
    def rule(run, func, args, kwargs):
        x = args[0]
        if not is_slab(x):
            return func(*args, **kwargs)
        out_shape = meta_run(func, args, kwargs).shape
        hdim = new_hdim(x, *args[1:])
        if hdim is None:
            return run.gathered(func, args, kwargs)
        return per_slab(run, x, hdim, out_shape, x.dtype, lambda part, rows: func(part, *args[1:], **kwargs))
    return rule


# The height axis after each op. Axis d of n is d % n: _axes_rule's meta run has already refused one out of range.

def _permute_hdim(x, dims):
    return [d % x.dim() for d in dims].index(x.hdim)


def _transpose_hdim(x, a, b):
    a, b = a % x.dim(), b % x.dim()
    return b if x.hdim == a else a if x.hdim == b else x.hdim


def _unsqueeze_hdim(x, d):
    return x.hdim + (d % (x.dim() + 1) <= x.hdim)


def _squeeze_hdim(x, dims):
    dims = [d % x.dim() for d in ([dims] if isinstance(dims, int) else dims)]
    dropped = [d for d in dims if x.shape[d] == 1]
    return None if x.hdim in dropped else x.hdim - sum(d < x.hdim for d in dropped)


LOCAL_RULES: dict = {
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
