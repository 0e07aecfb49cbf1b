"""GroupNorm + activation, act(group_norm(x, num_groups, weight, bias, eps)) with act in {none, silu, relu}:
Triton kernels, the launcher, the eager reference and the backward.

Input: 4-D (N, C, H, W) or 5-D (N, C, T, H, W), any C divisible by num_groups, any spatial size, float16/bfloat16/
float32/float64, contiguous, channels_last / channels_last_3d or strided. 3-D (N, C, L) is rejected (add a unit
dim); the output is ``torch.empty_like(x)``, so the memory layout is kept.

Kernel design (statistics in fp32, fp64 for fp64 input):

* Every tensor is viewed as (N, C, S), S the flattened spatial dims, with one stride per axis: NCHW has
  stride_s = 1, channels_last has stride_c = 1, and both run natively (no layout conversion). Only a view whose
  spatial dims do not flatten to one stride (e.g. a transposed H/W) is copied first.
* Tiles are [BLOCK_G groups, BLOCK_CG channels per group, BLOCK_S positions], about 2048 lanes, long along the
  axis that is contiguous in memory: NCHW tiles cover up to 512 positions of a few channels, channels_last tiles
  cover whole rows of up to 1024 channels (many groups at once) for a few positions. Group sizes that are not a
  power of two (C = 96, 192, 320 with 32 groups) leave padding lanes that are masked.
* Batch 1 gives only N * num_groups = 32 groups for 132 SMs, so each group's positions are split into chunks
  (``plan_launch``: about 4 programs per SM, at least 4096 elements each, whole tiles):
  pass 1 (``_group_norm_stats_kernel``) writes every chunk's (mean, M2) to a small fp32 buffer with plain stores
  (no atomics: deterministic); a tiny pass (``_group_norm_combine_kernel``) merges each group's partials with
  Chan's parallel formula into (mean, rstd); pass 2 (``_group_norm_act_kernel``) normalizes + activates each
  chunk in one read and one write. Traffic: 2 reads + 1 write of x, versus 3 reads + 2 writes for eager
  group_norm followed by the activation. (Merging the partials inside pass 2 instead would make every program
  re-read all partials of its groups: with channels_last chunks of a few positions that outweighs the data.)
* Small problems (one chunk per group) take a single launch: the program computes its groups' statistics and
  then normalizes them; the second read hits cache.
* Inside a program, moments are merged tile by tile: tile mean, tile sum of squared deviations from it, then
  Chan's update, so offset data (mean >> std) does not cancel the way E[x^2] - E[x]^2 does.
* Loads are converted to fp32 at once (bf16 arithmetic is wrong in triton's CPU interpreter, and fp32 is what the
  statistics need anyway); the result is cast to x's dtype on store.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.nn.functional as F

from fastdec.kernels.support.cases import CompileCase, GpuCase, cuda_empty, shape_label
from fastdec.kernels.support.dispatch import cpu_kernel, cuda_kernel, device_kernel, register_backward
from fastdec.kernels.support.group_norm_plan import COMBINE_CHUNKS, COMBINE_GROUPS, plan_launch, program_target
from fastdec.kernels.support.norm import (  # noqa: F401 (ACTIVATIONS: the acts this op takes)
    ACTIVATIONS,
    TILE_ELEMENTS,
    activate,
    activation,
    affine_act_backward,
    check_norm_input,
    check_norm_params,
    compute_dtype,
    flat_views,
)
from fastdec.kernels.support.triton_import import cdiv, tl, triton


def check_group_norm_act(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                         eps: float, act: str) -> None:
    """Raises ValueError naming the first problem with the arguments of group_norm_act."""
    check_norm_input("group_norm_act", x)
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"fastdec.group_norm_act: num_groups must be a positive int, got {num_groups!r}")
    channels = x.shape[1]
    if channels % num_groups:
        raise ValueError(
            f"fastdec.group_norm_act: channels ({channels}) must be divisible by num_groups ({num_groups})"
        )
    check_norm_params("group_norm_act", x, weight, bias, eps, act)


def group_norm_act_reference(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
                              bias: torch.Tensor | None, eps: float, act: str) -> torch.Tensor:
    """Eager reference: F.group_norm in fp32 (fp64 for fp64 x), then act, cast back; keeps x's layout."""
    check_group_norm_act(x, num_groups, weight, bias, eps, act)
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    compute = compute_dtype(x)
    w = weight.to(compute) if weight is not None else None
    b = bias.to(compute) if bias is not None else None
    # contiguous(): torch's CPU channels_last GroupNorm computes E[x^2] - E[x]^2 and cancels for offset data.
    # torch.group_norm (not F.group_norm, which rejects one value per group in "training") is the plain aten op.
    out.copy_(activation(torch.group_norm(x.to(compute).contiguous(), num_groups, w, b, eps), act))
    return out


def group_norm_act_backward(grad_out: torch.Tensor, x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
                            bias: torch.Tensor | None, eps: float, act: str
                            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Exact gradients of act(group_norm(x) * weight + bias), computed in fp32 (fp64 for fp64 x).

    With xhat the normalized input and dy the gradient at the pre-activation output:
    grad_x = rstd * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat)), dxhat = dy * weight,
    where mean_g averages over each (sample, group).
    """
    compute = compute_dtype(x)
    n, channels = x.shape[:2]
    grouped = x.to(compute).reshape(n, num_groups, -1)
    mean = grouped.mean(-1, keepdim=True)
    centered = grouped - mean
    rstd = torch.rsqrt((centered * centered).mean(-1, keepdim=True) + eps)
    xhat = centered * rstd
    grad_y = grad_out.to(compute).reshape(n, channels, -1)
    grad_xhat, grad_weight, grad_bias = affine_act_backward(grad_y, xhat.reshape(n, channels, -1), weight, bias, act)
    grad_xhat = grad_xhat.reshape(n, num_groups, -1)
    grad_grouped = rstd * (
        grad_xhat - grad_xhat.mean(-1, keepdim=True) - xhat * (grad_xhat * xhat).mean(-1, keepdim=True)
    )
    grad_x = torch.empty_like(x)
    grad_x.copy_(grad_grouped.reshape(x.shape))
    return grad_x, grad_weight, grad_bias


# --- Triton kernels --------------------------------------------------------------------------------------------


@triton.jit
def _chunk_moments(
    x_ptr, x_sample, g0, G, Cg, s_begin, s_end, stride_c, stride_s, BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr,
    BLOCK_S: tl.constexpr, COMPUTE: tl.constexpr, INDEX: tl.constexpr,
):
    """(count, mean, M2) of each group's elements at spatial positions [s_begin, s_end), merged tile by tile."""
    groups = g0 + tl.arange(0, BLOCK_G)
    count = tl.zeros([BLOCK_G], dtype=COMPUTE)
    mean = tl.zeros([BLOCK_G], dtype=COMPUTE)
    m2 = tl.zeros([BLOCK_G], dtype=COMPUTE)
    for c0 in range(0, Cg, BLOCK_CG):
        in_group = c0 + tl.arange(0, BLOCK_CG)
        channel_mask = (groups[:, None] < G) & (in_group[None, :] < Cg)
        channel_offset = (groups[:, None] * Cg + in_group[None, :]).to(INDEX) * stride_c
        valid_channels = tl.minimum(Cg - c0, BLOCK_CG)
        for s0 in range(s_begin, s_end, BLOCK_S):
            positions = s0 + tl.arange(0, BLOCK_S)
            mask = channel_mask[:, :, None] & (positions < s_end)[None, None, :]
            offsets = channel_offset[:, :, None] + (positions.to(INDEX) * stride_s)[None, None, :]
            x = tl.load(x_ptr + x_sample + offsets, mask=mask, other=0.0).to(COMPUTE)
            tile_count = (valid_channels * tl.minimum(s_end - s0, BLOCK_S)).to(COMPUTE)
            tile_mean = tl.sum(tl.sum(x, axis=2), axis=1) / tile_count
            deviation = tl.where(mask, x - tile_mean[:, None, None], 0.0)
            tile_m2 = tl.sum(tl.sum(deviation * deviation, axis=2), axis=1)
            merged = count + tile_count
            delta = tile_mean - mean
            mean += delta * (tile_count / merged)
            m2 += tile_m2 + delta * delta * (count * tile_count / merged)
            count = merged
    return count, mean, m2


@triton.jit
def _group_norm_stats_kernel(
    x_ptr, partials_ptr, G, Cg, S, chunk_size, num_chunks, num_group_blocks, stride_xn, stride_xc, stride_xs,
    BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_S: tl.constexpr, COMPUTE: tl.constexpr, INDEX: tl.constexpr,
):
    """Pass 1 of the split path: one program per (sample, block of groups, spatial chunk) writes its
    chunk's (mean, M2) per group to partials[n, g, chunk]; plain stores, no atomics: deterministic."""
    pid = tl.program_id(0)
    chunk = pid % num_chunks
    group_block = (pid // num_chunks) % num_group_blocks
    n = pid // (num_chunks * num_group_blocks)
    g0 = group_block * BLOCK_G
    s_begin = chunk * chunk_size
    s_end = tl.minimum(s_begin + chunk_size, S)
    _, mean, m2 = _chunk_moments(
        x_ptr, n.to(tl.int64) * stride_xn, g0, G, Cg, s_begin, s_end, stride_xc, stride_xs,
        BLOCK_G, BLOCK_CG, BLOCK_S, COMPUTE, INDEX,
    )  # fmt: skip
    groups = g0 + tl.arange(0, BLOCK_G)
    slots = ((n * G + groups).to(tl.int64) * num_chunks + chunk) * 2
    tl.store(partials_ptr + slots, mean, mask=groups < G)
    tl.store(partials_ptr + slots + 1, m2, mask=groups < G)


@triton.jit
def _group_norm_combine_kernel(
    partials_ptr, stats_ptr, G, Cg, S, chunk_size, num_chunks, eps, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    """Split path, between the passes: stats[n, g] = (mean, rstd) from the chunks' (mean, M2) partials: the
    group mean first, then M2 = sum(M2_i + count_i * (mean_i - mean)^2) (Chan). Counts follow from the chunk bounds."""
    n = tl.program_id(0) // tl.cdiv(G, BLOCK_G)
    groups = (tl.program_id(0) % tl.cdiv(G, BLOCK_G)) * BLOCK_G + tl.arange(0, BLOCK_G)
    rows = (n * G + groups).to(tl.int64) * num_chunks * 2
    group_mask = groups < G
    weighted_sum = tl.zeros([BLOCK_G, BLOCK_P], dtype=COMPUTE)
    count_sum = tl.zeros([BLOCK_P], dtype=COMPUTE)
    for p0 in range(0, num_chunks, BLOCK_P):
        chunks = p0 + tl.arange(0, BLOCK_P)
        mask = group_mask[:, None] & (chunks < num_chunks)[None, :]
        counts = (Cg * tl.minimum(tl.maximum(S - chunks * chunk_size, 0), chunk_size)).to(COMPUTE)
        means = tl.load(partials_ptr + rows[:, None] + chunks[None, :] * 2, mask=mask, other=0.0)
        weighted_sum += means * counts[None, :]
        count_sum += counts
    total = tl.sum(count_sum, axis=0)
    mean = tl.sum(weighted_sum, axis=1) / total
    m2 = tl.zeros([BLOCK_G, BLOCK_P], dtype=COMPUTE)
    for p0 in range(0, num_chunks, BLOCK_P):
        chunks = p0 + tl.arange(0, BLOCK_P)
        mask = group_mask[:, None] & (chunks < num_chunks)[None, :]
        counts = (Cg * tl.minimum(tl.maximum(S - chunks * chunk_size, 0), chunk_size)).to(COMPUTE)
        means = tl.load(partials_ptr + rows[:, None] + chunks[None, :] * 2, mask=mask, other=0.0)
        chunk_m2 = tl.load(partials_ptr + rows[:, None] + chunks[None, :] * 2 + 1, mask=mask, other=0.0)
        delta = tl.where(mask, means - mean[:, None], 0.0)
        m2 += chunk_m2 + counts[None, :] * delta * delta
    rstd = 1.0 / tl.sqrt(tl.sum(m2, axis=1) / total + eps)
    slots = (n * G + groups).to(tl.int64) * 2
    tl.store(stats_ptr + slots, mean, mask=group_mask)
    tl.store(stats_ptr + slots + 1, rstd, mask=group_mask)


@triton.jit
def _group_norm_act_kernel(
    x_ptr, out_ptr, weight_ptr, bias_ptr, stats_ptr, G, Cg, S, chunk_size, num_chunks, num_group_blocks, eps,
    stride_xn, stride_xc, stride_xs, stride_on, stride_oc, stride_os, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, SINGLE_CHUNK: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_CG: tl.constexpr, BLOCK_S: tl.constexpr, COMPUTE: tl.constexpr, INDEX: tl.constexpr,
):
    """Normalize + affine + activation of one (sample, block of groups, spatial chunk). With SINGLE_CHUNK the
    program owns whole groups and computes their statistics itself (a second read of data it just touched);
    otherwise it reads the (mean, rstd) that the combine pass wrote."""
    pid = tl.program_id(0)
    chunk = pid % num_chunks
    group_block = (pid // num_chunks) % num_group_blocks
    n = pid // (num_chunks * num_group_blocks)
    g0 = group_block * BLOCK_G
    x_sample = n.to(tl.int64) * stride_xn
    out_sample = n.to(tl.int64) * stride_on
    if SINGLE_CHUNK:
        count, mean, m2 = _chunk_moments(
            x_ptr, x_sample, g0, G, Cg, 0, S, stride_xc, stride_xs, BLOCK_G, BLOCK_CG, BLOCK_S, COMPUTE, INDEX
        )
        rstd = 1.0 / tl.sqrt(m2 / count + eps)
    else:
        slots = (n * G + g0 + tl.arange(0, BLOCK_G)).to(tl.int64) * 2
        in_range = g0 + tl.arange(0, BLOCK_G) < G
        mean = tl.load(stats_ptr + slots, mask=in_range, other=0.0)
        rstd = tl.load(stats_ptr + slots + 1, mask=in_range, other=0.0)
    s_begin = chunk * chunk_size
    s_end = tl.minimum(s_begin + chunk_size, S)
    groups = g0 + tl.arange(0, BLOCK_G)
    for c0 in range(0, Cg, BLOCK_CG):
        in_group = c0 + tl.arange(0, BLOCK_CG)
        channel_mask = (groups[:, None] < G) & (in_group[None, :] < Cg)
        channel = (groups[:, None] * Cg + in_group[None, :]).to(INDEX)
        # y = (x - mean) * scale + bias, scale = rstd * weight. Not x * scale + (bias - mean * scale): that
        # cancels when |mean| * rstd is large (offset data, or eps-sized variance).
        scale = tl.zeros([BLOCK_G, BLOCK_CG], dtype=COMPUTE) + rstd[:, None]
        if HAS_WEIGHT:
            scale *= tl.load(weight_ptr + channel, mask=channel_mask, other=0.0).to(COMPUTE)
        shift = tl.zeros([BLOCK_G, BLOCK_CG], dtype=COMPUTE)
        if HAS_BIAS:
            shift += tl.load(bias_ptr + channel, mask=channel_mask, other=0.0).to(COMPUTE)
        for s0 in range(s_begin, s_end, BLOCK_S):
            positions = s0 + tl.arange(0, BLOCK_S).to(INDEX)
            mask = channel_mask[:, :, None] & (positions < s_end)[None, None, :]
            x_offsets = (channel * stride_xc)[:, :, None] + (positions * stride_xs)[None, None, :]
            x = tl.load(x_ptr + x_sample + x_offsets, mask=mask, other=0.0).to(COMPUTE)
            y = activate((x - mean[:, None, None]) * scale[:, :, None] + shift[:, :, None], ACT)
            out_offsets = (channel * stride_oc)[:, :, None] + (positions * stride_os)[None, None, :]
            tl.store(out_ptr + out_sample + out_offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


# --- launcher --------------------------------------------------------------------------------------------------

def _launch_plan(x: torch.Tensor, num_groups: int, x_strides, index, chunk_size: int | None = None):
    """(plan, the kernels' size arguments, grid, constexprs) of one call: what every pass launches with."""
    batch, channels = x.shape[:2]
    spatial, group_channels = math.prod(x.shape[2:]), channels // num_groups
    plan = plan_launch(
        batch, num_groups, group_channels, spatial, x_strides[1] == 1, program_target(x.device), chunk_size
    )
    meta = {"BLOCK_G": plan.block_g, "BLOCK_CG": plan.block_cg, "BLOCK_S": plan.block_s,
            "COMPUTE": tl.float64 if compute_dtype(x) == torch.float64 else tl.float32, "INDEX": index, "num_warps": 4}
    sizes = (num_groups, group_channels, spatial, plan.chunk_size, plan.num_chunks, plan.num_group_blocks)
    return plan, sizes, (batch * plan.num_group_blocks * plan.num_chunks,), meta


def _chunk_partials(x: torch.Tensor, source, x_strides, plan, sizes, grid, meta) -> torch.Tensor:
    """Pass 1 of the split path: (mean, M2) of every (sample, group, chunk), shape (N, G, chunks, 2)."""
    partials = torch.empty((x.shape[0], sizes[0], plan.num_chunks, 2), dtype=compute_dtype(x), device=x.device)
    _group_norm_stats_kernel[grid](source, partials, *sizes, *x_strides, **meta)
    return partials


def group_norm_act_triton(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                          eps: float, act: str, *, chunk_size: int | None = None,
                          stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Triton launcher (its passes: the module docstring). `chunk_size` (spatial positions per program) overrides
    the automatic split. `stats`: (mean, var) per (sample, group) gathered elsewhere (a tiled decode's slabs): the
    normalize pass alone."""
    check_group_norm_act(x, num_groups, weight, bias, eps, act)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"fastdec.group_norm_act: chunk_size must be a positive int, got {chunk_size!r}")
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    source, target, x_strides, out_strides, index = flat_views(x, out)
    batch, channels = x.shape[:2]
    plan, sizes, grid, meta = _launch_plan(x, num_groups, x_strides, index, chunk_size)
    compute = compute_dtype(x)
    given = stats is not None
    if given:
        mean, var = stats
        stats = torch.stack((mean, torch.rsqrt(var + eps)), -1).to(compute)
    else:
        stats = torch.empty((batch, num_groups, 2), dtype=compute, device=x.device)  # (mean, rstd) per group
    if plan.num_chunks > 1 and not given:
        partials = _chunk_partials(x, source, x_strides, plan, sizes, grid, meta)
        _group_norm_combine_kernel[(batch * cdiv(num_groups, COMBINE_GROUPS),)](
            partials, stats, *sizes[:5], float(eps), BLOCK_G=COMBINE_GROUPS, BLOCK_P=COMBINE_CHUNKS,
            COMPUTE=meta["COMPUTE"], num_warps=4,
        )  # fmt: skip
    _group_norm_act_kernel[grid](
        source, target,
        weight.contiguous() if weight is not None else source,  # unused pointer when there is no weight
        bias.contiguous() if bias is not None else source,
        stats, *sizes, float(eps), *x_strides, *out_strides,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACT=act,
        SINGLE_CHUNK=plan.num_chunks == 1 and not given,
        # channels_last tiles at 4 warps took 150-168 registers (ptxas, sm_90: 3 blocks per SM); 8 warps halve each
        # thread's share: 102-123 registers, 16 warps per SM instead of 12 (bench/results/*compile-check*)
        **{**meta, "num_warps": 8 if x_strides[1] == 1 and channels > 1 else 4},
    )
    if target is not out:
        out.copy_(target)
    return out


# --- tiled decoding (fastdec/tiling/norm_rules.py): statistics over every slab, then each slab normalized ---------


def group_moments_triton(x: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, mean, M2) of each (sample, group, spatial chunk) of x, from the split path's pass 1: counts (K,),
    means and M2 (N, G, K); the caller merges the chunks (and slabs) with Chan's formula."""
    source, _, x_strides, _, index = flat_views(x, x)
    plan, sizes, grid, meta = _launch_plan(x, num_groups, x_strides, index)
    partials = _chunk_partials(x, source, x_strides, plan, sizes, grid, meta)
    _, group_channels, spatial = sizes[:3]
    starts = torch.arange(plan.num_chunks, device=x.device, dtype=partials.dtype) * plan.chunk_size  # no host copy
    counts = (spatial - starts).clamp(max=plan.chunk_size) * group_channels
    return counts, partials[..., 0], partials[..., 1]


def group_moments_reference(x: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """group_moments_triton's result with one chunk: torch.var_mean in fp32 (fp64 for fp64 x)."""
    grouped = x.reshape(x.shape[0], num_groups, -1)
    var, mean = torch.var_mean(grouped.to(compute_dtype(x)), dim=-1, correction=0, keepdim=True)
    return torch.full((1,), grouped.shape[-1], dtype=mean.dtype, device=x.device), mean, var * grouped.shape[-1]


def group_norm_act_given_stats_reference(x, num_groups, weight, bias, eps, act, *, stats) -> torch.Tensor:
    """group_norm_act_triton(..., stats=(mean, var)) eagerly, in one temporary as large as x (fp32; fp64 for fp64
    x): (x - mean) * rstd * weight + bias per channel, then act in place."""
    (batch, channels), (mean, var), compute = x.shape[:2], stats, compute_dtype(x)
    per_channel = (batch, channels) + (1,) * (x.dim() - 2)
    scale = torch.rsqrt(var.to(compute) + eps).repeat_interleave(channels // num_groups, 1).view(per_channel)
    y = torch.sub(x, mean.to(compute).repeat_interleave(channels // num_groups, 1).view(per_channel))
    y.mul_(scale if weight is None else scale * weight.to(compute).view(1, *per_channel[1:]))
    if bias is not None:
        y.add_(bias.to(compute).view(1, *per_channel[1:]))
    return activation(y, act, inplace=True).to(x.dtype)


def group_moments(x: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return device_kernel(x, group_moments_triton, group_moments_reference)(x, num_groups)


def merge_group_moments(moments, count: int, batch: int, num_groups: int, device: torch.device,
                        all_reduce=lambda total: total) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, var) per (sample, group) from ``group_moments`` of one tensor or of its parts (a tiled decode's slabs;
    ``all_reduce`` sums over ranks), ``count`` elements per group in all. Chan's formula in fp64, the global mean
    first, then sum_i M2_i + n_i (mean_i - mean)^2: offset data does not cancel as in E[x^2] - E[x]^2."""
    moments = [[m.double() for m in part] for part in moments]
    zeros = torch.zeros(batch, num_groups, dtype=torch.float64, device=device)  # the sum of no parts (a rank's)
    mean = all_reduce(sum(((n * m).sum(-1) for n, m, _ in moments), zeros.clone())) / count
    m2 = all_reduce(sum(((m2 + n * (m - mean[..., None]).square()).sum(-1) for n, m, m2 in moments), zeros.clone()))
    return mean, m2 / count


def group_norm_act_given_stats(x, num_groups, weight, bias, eps, act, mean, var) -> torch.Tensor:
    """act(group norm of x with the given per (sample, group) mean and var): the fused normalize pass."""
    kernel = device_kernel(x, group_norm_act_triton, group_norm_act_given_stats_reference)
    return kernel(x, num_groups, weight, bias, eps, act, stats=(mean, var))


# --- registration: torch.ops.fastdec.group_norm_act -------------------------------------------------------------

FUSED = "triton"  # what runs the fused path; fastdec.ops.backends() says where it runs, and why not


@torch.library.custom_op("fastdec::group_norm_act", mutates_args=(), device_types="cpu")
def group_norm_act(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float = 1e-6, act: str = "none") -> torch.Tensor:
    """act(group_norm(x)) for 4-D (N,C,H,W) or 5-D (N,C,T,H,W) x; act in {"none", "silu", "relu"}."""
    return cpu_kernel(group_norm_act_triton, group_norm_act_reference)(x, num_groups, weight, bias, eps, act)


@group_norm_act.register_kernel("cuda")
def _(x, num_groups, weight, bias, eps=1e-6, act="none"):
    return cuda_kernel(group_norm_act_triton, group_norm_act_reference)(x, num_groups, weight, bias, eps, act)


@group_norm_act.register_fake
def _(x, num_groups, weight, bias, eps=1e-6, act="none"):
    check_group_norm_act(x, num_groups, weight, bias, eps, act)
    return torch.empty_like(x)


register_backward("group_norm_act", group_norm_act_backward)


# --- the calls its checks and benchmarks make -----------------------------------------------------------------

GROUPS = 32  # SD-VAE's ResNet-block norm (with eps 1e-6 and silu)
# SD-VAE decoder sizes: mid/up blocks at 512 and 1024 px, one sample and eight (gpu_check, bench/).
BENCH_SHAPES = ((1, 512, 64, 64), (1, 512, 128, 128), (1, 128, 512, 512), (8, 128, 512, 512))
# compile_check, one sample at 512 px: the first two take the split path (stats, combine, normalize), the last the
# single-program path.
COMPILE_SHAPES = ((1, 512, 64, 64), (1, 128, 512, 512), (1, 192, 32, 32))
# Slabs of a tiled 4096 px SD-VAE decode (512-row tiles): the last up block's and the mid block's.
TILED_SHAPES = ((1, 128, 512, 4096), (1, 512, 64, 512))
GPU_DTYPE = torch.float16  # the dtype its speed goal is stated in


def check_call(r) -> tuple:
    return r(1, 96, 17, 9), 32, r(96), r(96), 1e-6, "silu"


def compile_cases(quick: bool) -> list[CompileCase]:
    cases = itertools.product(("bf16", "fp16", "fp32"), (False, True), COMPILE_SHAPES, ("silu", "none"), [False])
    tiled = itertools.product(("bf16", "fp16", "fp32"), (False, True), TILED_SHAPES, ("silu",), [True])
    if quick:
        cases = (("bf16", True, (1, 512, 64, 64), "silu", False), ("fp32", False, (1, 192, 32, 32), "silu", False))
        tiled = (("bf16", True, TILED_SHAPES[0], "silu", True),)

    def run(dtype, channels_last, shape, act, slab):
        x = cuda_empty(shape, dtype, torch.channels_last if channels_last else torch.contiguous_format)
        weight, bias, stats = cuda_empty(shape[1:2], dtype), cuda_empty(shape[1:2], dtype), None
        if slab:  # a tiled decode's slab: its moments, then the normalize pass with statistics merged over slabs
            _, mean, m2 = group_moments_triton(x, GROUPS)
            stats = (mean[..., 0], m2[..., 0])
        group_norm_act_triton(x, GROUPS, weight, bias, 1e-6, act, stats=stats)

    return [CompileCase(f"{dtype} {'channels_last' if cl else 'NCHW'} {shape_label(shape)} {act}{' slab' * slab}",
                        functools.partial(run, dtype, cl, shape, act, slab))
            for dtype, cl, shape, act, slab in itertools.chain(cases, tiled)]


def gpu_cases(device: torch.device, dtype: torch.dtype, smoke: bool) -> list[GpuCase]:
    def case(shape, layout):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format

        def make():
            if layout == "strided":  # every other channel of a wider tensor: not dense
                x = torch.randn(shape[0], 2 * shape[1], *shape[2:], device=device, dtype=dtype)[:, ::2]
            else:
                x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
            w = torch.randn(shape[1], device=device, dtype=dtype)
            return x, GROUPS, w, torch.randn_like(w), 1e-6, "silu"

        eager = {"eager": lambda x, groups, w, b, eps, act: activation(F.group_norm(x, groups, w, b, eps), act)}
        return GpuCase(f"{tuple(shape)} {layout}", make, eager, nbytes=2 * math.prod(shape) * dtype.itemsize)

    return [case(shape, layout) for shape in ([(1, 32, 8, 8)] if smoke else BENCH_SHAPES)
            for layout in ("nchw", "channels_last", "strided")]
