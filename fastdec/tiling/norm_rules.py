"""Rules for group normalisation: statistics over all slabs (partial sums, all-reduced), then each slab
normalised with the global statistics."""

from __future__ import annotations

import torch
from torch import Tensor

from fastdec import ops  # noqa: F401  (registers torch.ops.fastdec.*, which the rules below name)
from fastdec.kernels.group_norm_act import compute_dtype
from fastdec.tiling.local_rules import per_slab
from fastdec.tiling.slab import SlabTensor, is_slab

aten = torch.ops.aten

def _group_stats(run, x: SlabTensor, groups: int) -> tuple[Tensor, Tensor]:
    """Per (sample, group) mean and variance over every slab, in one pass over the data: each slab's (mean, M2) in
    fp32 (torch.var_mean), combined across slabs in fp64 with Chan's formula (all-reduced twice: the global mean,
    then sum_t M2_t + n_t (mean_t - mean)^2), so offset data does not cancel the way E[x^2] - E[x]^2 does."""
    executor, batch = run.executor, x.shape[0]
    stats = {}
    for t in x.parts:
        g = executor.load(x.parts[t]).reshape(batch, groups, -1)
        var, mean = torch.var_mean(g.to(compute_dtype(g)), dim=-1, correction=0)
        stats[t] = (g.shape[-1], mean.double(), var.double() * g.shape[-1])
    count = x.numel() // (batch * groups)
    zeros = torch.zeros(batch, groups, dtype=torch.float64, device=executor.device)
    mean = executor.all_reduce(sum((n * m for n, m, _ in stats.values()), zeros.clone())) / count
    m2 = executor.all_reduce(sum((m2 + n * (m - mean).square() for n, m, m2 in stats.values()), zeros.clone()))
    return mean, m2 / count


def _normalise(run, x: SlabTensor, groups: int, weight, bias, eps: float, act: str, mean: Tensor, var: Tensor
               ) -> SlabTensor:
    """act(group norm) of each slab with the global statistics: one eval-mode batch_norm pass (per-channel mean and
    variance = its group's; the batch folded into the channels), then the activation in place."""
    batch, channels = x.shape[:2]
    per_channel = channels // groups

    def norm(part, rows):
        compute = compute_dtype(part)
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
