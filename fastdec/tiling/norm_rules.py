"""Rules for group normalisation: statistics over all slabs (partial sums, all-reduced), then each slab
normalised with the global statistics."""

from __future__ import annotations

import torch
from torch import Tensor

from fastdec import ops  # noqa: F401  (registers torch.ops.fastdec.*, which the rules below name)
from fastdec.kernels.group_norm_act import group_moments, group_norm_act_given_stats, merge_group_moments
from fastdec.tiling.local_rules import per_slab
from fastdec.tiling.slab import SlabTensor, is_slab

aten = torch.ops.aten

def _group_stats(run, x: SlabTensor, groups: int) -> tuple[Tensor, Tensor]:
    """Per (sample, group) mean and variance over every slab, in one pass over the data: each slab's chunks'
    moments from the op's own statistics pass (fp32), merged across chunks, slabs and ranks."""
    executor = run.executor
    moments = [group_moments(executor.load(x.parts[t]), groups) for t in x.parts]
    count = x.numel() // (x.shape[0] * groups)
    return merge_group_moments(moments, count, x.shape[0], groups, executor.device, executor.all_reduce)


def _normalise(run, x: SlabTensor, groups: int, weight, bias, eps: float, act: str, mean: Tensor, var: Tensor
               ) -> SlabTensor:
    """act(group norm) of each slab with the global statistics: the op's fused normalize pass."""
    def norm(part, rows):
        return group_norm_act_given_stats(part, groups, weight, bias, eps, act, mean, var)
    return per_slab(run, x, x.hdim, x.shape, x.dtype, norm, compute=True)


def _group_norm_act_rule(run, func, args, kwargs):
    x, groups, weight, bias = args[:4]
    eps = args[4] if len(args) > 4 else kwargs.get("eps", 1e-6)
    act = args[5] if len(args) > 5 else kwargs.get("act", "none")
    x = run.as_slab(x, x.dim() - 2) if x.dim() in (4, 5) else x
    if not is_slab(x) or x.hdim != x.dim() - 2:
        return run.gathered(func, args, kwargs) if is_slab(x) else func(*args, **kwargs)
    mean, var = _group_stats(run, x, groups)
    return _normalise(run, x, groups, weight, bias, eps, act, mean, var)


def _native_group_norm_rule(run, func, args, kwargs):
    x, weight, bias, n, c, hw, groups, eps = args
    x = run.as_slab(x, x.dim() - 2) if x.dim() in (4, 5) else x
    if not is_slab(x) or x.hdim != x.dim() - 2:
        return run.gathered(func, args, kwargs) if is_slab(x) else func(*args, **kwargs)
    mean, var = _group_stats(run, x, groups)
    out = _normalise(run, x, groups, weight, bias, eps, "none", mean, var)
    return out, mean.to(x.dtype), torch.rsqrt(var + eps).to(x.dtype)


NORM_RULES: dict = {
    torch.ops.fastdec.group_norm_act.default: _group_norm_act_rule,
    aten.native_group_norm.default: _native_group_norm_rule,
}
