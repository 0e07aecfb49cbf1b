"""Rules for group normalisation: statistics over all slabs (partial sums, all-reduced), then each slab
normalised with the global statistics."""

from __future__ import annotations

import torch
from torch import Tensor

from fastdec import ops  # noqa: F401  (registers torch.ops.fastdec.*, which the rules below name)
from fastdec.kernels.group_norm_act import group_moments, group_norm_act_given_stats
from fastdec.tiling.local_rules import per_slab
from fastdec.tiling.slab import SlabTensor, is_slab

aten = torch.ops.aten

def _group_stats(run, x: SlabTensor, groups: int) -> tuple[Tensor, Tensor]:
    """Per (sample, group) mean and variance over every slab, in one pass over the data: each slab's chunks' (count,
    mean, M2) from the op's own statistics pass (fp32), combined across chunks and slabs in fp64 with Chan's formula
    (all-reduced twice: the global mean, then sum_i M2_i + n_i (mean_i - mean)^2), so offset data does not cancel
    the way E[x^2] - E[x]^2 does."""
    executor, batch = run.executor, x.shape[0]
    moments = [[m.double() for m in group_moments(executor.load(x.parts[t]), groups)] for t in x.parts]
    count = x.numel() // (batch * groups)
    zeros = torch.zeros(batch, groups, dtype=torch.float64, device=executor.device)
    mean = executor.all_reduce(sum(((n * m).sum(-1) for n, m, _ in moments), zeros.clone())) / count
    m2 = executor.all_reduce(sum(
        ((m2 + n * (m - mean[..., None]).square()).sum(-1) for n, m, m2 in moments), zeros.clone()))
    return mean, m2 / count


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
