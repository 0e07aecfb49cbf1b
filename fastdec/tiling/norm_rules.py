"""Rules for group normalisation: statistics over all slabs (partial sums, all-reduced), then each slab
normalised with the global statistics."""

from __future__ import annotations

import torch

from fastdec import ops  # noqa: F401  (registers torch.ops.fastdec.*, which the rules below name)
from fastdec.kernels.group_norm_act import group_moments, group_norm_act_given_stats, merge_group_moments
from fastdec.tiling.local_rules import per_slab
from fastdec.tiling.slab import is_slab

aten = torch.ops.aten

def _group_norm_rule(run, func, args, kwargs):
    """fastdec.group_norm_act and aten.native_group_norm (which also returns the mean and rstd). The statistics
    are each slab's chunks' moments (the op's own fp32 statistics pass) merged across chunks, slabs and ranks in
    one pass over the data; each slab is then normalised by the op's fused normalize pass."""
    native = func == aten.native_group_norm.default
    if native:
        x, weight, bias, _, _, _, groups, eps = args
        act = "none"
    else:
        x, groups, weight, bias = args[:4]
        eps = args[4] if len(args) > 4 else kwargs.get("eps", 1e-6)
        act = args[5] if len(args) > 5 else kwargs.get("act", "none")
    x = run.as_slab(x, x.dim() - 2) if x.dim() in (4, 5) else x
    if not is_slab(x) or x.hdim != x.dim() - 2:
        return run.gathered(func, args, kwargs) if is_slab(x) else func(*args, **kwargs)
    executor = run.executor
    moments = [group_moments(executor.load(x.parts[t]), groups) for t in x.parts]
    count = x.numel() // (x.shape[0] * groups)
    mean, var = merge_group_moments(moments, count, x.shape[0], groups, executor.device, executor.all_reduce)

    def norm(part, rows):
        return group_norm_act_given_stats(part, groups, weight, bias, eps, act, mean, var)
    out = per_slab(run, x, x.hdim, x.shape, x.dtype, norm, compute=True)
    return (out, mean.to(x.dtype), torch.rsqrt(var + eps).to(x.dtype)) if native else out


NORM_RULES: dict = {
    torch.ops.fastdec.group_norm_act.default: _group_norm_rule,
    aten.native_group_norm.default: _group_norm_rule,
}
