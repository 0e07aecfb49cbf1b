"""Channel RMSNorm + activation, act(x / rms_c(x) * weight + bias) with act in {none, silu, relu}: the Triton
kernel, the launcher, the eager reference and the backward.

The statistic is per position, over the channel axis 1: ms = mean_c(x^2). Two ways to guard small norms
(``eps_mode``) cover the channel RMSNorms of the video and DC-AE decoders with one op:

* ``"add"``:   y = x * rsqrt(ms + eps)        (diffusers ``RMSNorm`` over channels, as DC-AE's ``RMSNorm2d`` use)
* ``"clamp"``: y = x / max(sqrt(ms), eps)     (Wan's ``WanRMS_norm``: ``F.normalize(x, dim=1) * sqrt(C)``, whose
  ``||x|| >= 1e-12`` clamp is ``rms >= 1e-12 / sqrt(C)``: pass ``eps = 1e-12 * C ** -0.5`` and ``weight = gamma``)

then ``* weight + bias`` (each optional, shape (C,)) and the activation.

Input: 4-D (N, C, H, W) or 5-D (N, C, T, H, W), float16/bfloat16/float32/float64, contiguous, channels_last /
channels_last_3d or strided; the output is ``torch.empty_like(x)`` (layout kept).

Kernel design: the tensor is viewed as (N, C, T, S) with one stride per axis: S the positions of a frame, T the
frames when the spatial dims flatten only to two strided axes, as in the (B, T)-permuted views that Wan's
per-frame layers return (read and written in place; only a layout that needs three axes is copied first). One
program owns a block of BLOCK_S positions of one frame and all C channels: pass 1 sums x^2 over channel tiles of
[BLOCK_C, BLOCK_S], pass 2 re-reads the same tiles (cache hits: the block was just read) and writes the
normalized, activated values. Tiles are long along the contiguous axis (positions for NCHW, channels for
channels_last). Traffic: 1 read from memory + 1 write, versus eager's read for the norm, a read and write of the
normalized tensor, and another read and write for the activation. Statistics in fp32 (fp64 for fp64 input); loads
convert to it at once, the result is cast to x's dtype on store.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.nn.functional as F

from fastdec.kernels.support.cases import CompileCase, GpuCase, cuda_empty, shape_label
from fastdec.kernels.support.dispatch import cpu_kernel, cuda_kernel, register_backward
from fastdec.kernels.support.norm import (  # noqa: F401 (ACTIVATIONS: the acts this op takes)
    ACTIVATIONS,
    TILE_ELEMENTS,
    activate,
    activation,
    affine_act_backward,
    check_norm_input,
    check_norm_params,
    compute_dtype,
    frame_views,
    group_tile_shape,
    per_channel,
)
from fastdec.kernels.support.triton_import import cdiv, tl, triton

EPS_MODES = ("add", "clamp")


def check_rms_norm_act(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    act: str,
    eps_mode: str,
) -> None:
    """Raises ValueError naming the first problem with the arguments of rms_norm_act."""
    check_norm_input("rms_norm_act", x)
    check_norm_params("rms_norm_act", x, weight, bias, eps, act,
                      "; reshape per-channel parameters such as Wan's (C, 1, 1) gamma to (C,)")
    if eps_mode not in EPS_MODES:
        raise ValueError(f"fastdec.rms_norm_act: eps_mode must be one of {EPS_MODES}, got {eps_mode!r}")


def _inverse_rms(xc: torch.Tensor, eps: float, eps_mode: str) -> torch.Tensor:
    """1 / rms per position, (N, 1, *spatial), from the compute-dtype input."""
    # vector_norm: no full-size temporary for x^2 (the reference is fastdec's CPU path when triton is off)
    rms = torch.linalg.vector_norm(xc, dim=1, keepdim=True) * xc.shape[1] ** -0.5
    return (rms.square() + eps).rsqrt() if eps_mode == "add" else rms.clamp_min(eps).reciprocal()


def rms_norm_act_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    act: str,
    eps_mode: str = "add",
) -> torch.Tensor:
    """Eager reference in fp32 (fp64 for fp64 x), cast back; keeps x's layout. Also the CPU path without triton."""
    check_rms_norm_act(x, weight, bias, eps, act, eps_mode)
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    xc = x.to(compute_dtype(x))
    y = xc * _inverse_rms(xc, eps, eps_mode)
    if weight is not None:
        y.mul_(per_channel(weight, y))
    if bias is not None:
        y.add_(per_channel(bias, y))
    out.copy_(activation(y, act, inplace=True))
    return out


def rms_norm_act_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    act: str,
    eps_mode: str,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Exact gradients of act(x * inv * weight + bias), in fp32 (fp64 for fp64 x).

    With g the gradient at x * inv (after the activation and the weight) and inv = (ms + eps)^-1/2:
    grad_x = inv * g - x * inv^3 * mean_c(g * x). In "clamp" mode inv = 1/eps is constant where the rms is
    clamped, and there grad_x = inv * g.
    """
    xc = x.to(compute_dtype(x))
    inv = _inverse_rms(xc, eps, eps_mode)
    g, grad_weight, grad_bias = affine_act_backward(grad_out.to(xc.dtype), xc * inv, weight, bias, act)
    projection = xc * inv.pow(3) * (g * xc).mean(1, keepdim=True)
    if eps_mode == "clamp":
        projection = projection * (xc.square().mean(1, keepdim=True).sqrt() > eps)
    grad_x = torch.empty_like(x)
    grad_x.copy_(inv * g - projection)
    return grad_x, grad_weight, grad_bias


# --- Triton kernel ---------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_act_kernel(
    x_ptr,
    out_ptr,
    weight_ptr,
    bias_ptr,
    C,
    T,
    S,
    num_position_blocks,
    eps,
    stride_xn,
    stride_xc,
    stride_xt,
    stride_xs,
    stride_on,
    stride_oc,
    stride_ot,
    stride_os,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    CLAMP: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    COMPUTE: tl.constexpr,
    INDEX: tl.constexpr,
):
    pid = tl.program_id(0)
    frame = (pid // num_position_blocks).to(tl.int64)
    n = frame // T
    t = frame % T
    positions = ((pid % num_position_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)).to(INDEX)
    position_mask = positions < S
    x_base = x_ptr + n * stride_xn + t * stride_xt
    out_base = out_ptr + n * stride_on + t * stride_ot
    sum_sq = tl.zeros([BLOCK_S], dtype=COMPUTE)
    for c0 in range(0, C, BLOCK_C):
        channels = (c0 + tl.arange(0, BLOCK_C)).to(INDEX)
        mask = (channels < C)[:, None] & position_mask[None, :]
        offsets = (channels * stride_xc)[:, None] + (positions * stride_xs)[None, :]
        x = tl.load(x_base + offsets, mask=mask, other=0.0).to(COMPUTE)
        sum_sq += tl.sum(x * x, axis=0)
    mean_sq = sum_sq / C
    if CLAMP:
        inv = 1.0 / tl.maximum(tl.sqrt(mean_sq), eps)
    else:
        inv = 1.0 / tl.sqrt(mean_sq + eps)
    for c0 in range(0, C, BLOCK_C):
        channels = (c0 + tl.arange(0, BLOCK_C)).to(INDEX)
        channel_mask = channels < C
        mask = channel_mask[:, None] & position_mask[None, :]
        offsets = (channels * stride_xc)[:, None] + (positions * stride_xs)[None, :]
        x = tl.load(x_base + offsets, mask=mask, other=0.0).to(COMPUTE)
        y = x * inv[None, :]
        if HAS_WEIGHT:
            y = y * tl.load(weight_ptr + channels, mask=channel_mask, other=0.0).to(COMPUTE)[:, None]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + channels, mask=channel_mask, other=0.0).to(COMPUTE)[:, None]
        y = activate(y, ACT)
        out_offsets = (channels * stride_oc)[:, None] + (positions * stride_os)[None, :]
        tl.store(out_base + out_offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


# --- launcher --------------------------------------------------------------------------------------------------


def tile_shape(channels: int, positions: int, channels_contiguous: bool) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_S): group_norm_act's tile (norm.group_tile_shape) of one group holding every channel."""
    _, block_c, block_s = group_tile_shape(1, channels, positions, channels_contiguous)
    return block_c, block_s


def rms_norm_act_triton(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    act: str,
    eps_mode: str = "add",
) -> torch.Tensor:
    """Triton launcher: one launch, one program per (sample, block of positions)."""
    check_rms_norm_act(x, weight, bias, eps, act, eps_mode)
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    source, target, (frames, spatial), x_strides, out_strides, index = frame_views(x, out)
    batch, channels = x.shape[:2]
    block_c, block_s = tile_shape(channels, spatial, x_strides[1] == 1 and channels > 1)
    num_position_blocks = cdiv(spatial, block_s)
    _rms_norm_act_kernel[(batch * frames * num_position_blocks,)](
        source,
        target,
        weight.contiguous() if weight is not None else source,  # unused pointer when there is no weight
        bias.contiguous() if bias is not None else source,
        channels,
        frames,
        spatial,
        num_position_blocks,
        float(eps),
        *x_strides,
        *out_strides,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        ACT=act,
        CLAMP=eps_mode == "clamp",
        BLOCK_C=block_c,
        BLOCK_S=block_s,
        COMPUTE=tl.float64 if compute_dtype(x) == torch.float64 else tl.float32,
        INDEX=index,
        num_warps=4,
    )
    if target is not out:
        out.copy_(target)
    return out


# --- registration: torch.ops.fastdec.rms_norm_act ---------------------------------------------------------------

FUSED = "triton"  # what runs the fused path; fastdec.ops.backends() says where it runs, and why not


@torch.library.custom_op("fastdec::rms_norm_act", mutates_args=(), device_types="cpu")
def rms_norm_act(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-6,
    act: str = "none",
    eps_mode: str = "add",
) -> torch.Tensor:
    """act(x / rms_c(x) * weight + bias), channel RMS per position of 4-D/5-D x; eps_mode "add" (RMSNorm,
    rsqrt(ms + eps)) or "clamp" (Wan, 1 / max(rms, eps)); see the module docstring."""
    return cpu_kernel(rms_norm_act_triton, rms_norm_act_reference)(x, weight, bias, eps, act, eps_mode)


@rms_norm_act.register_kernel("cuda")
def _(x, weight, bias, eps=1e-6, act="none", eps_mode="add"):
    return cuda_kernel(rms_norm_act_triton, rms_norm_act_reference)(x, weight, bias, eps, act, eps_mode)


@rms_norm_act.register_fake
def _(x, weight, bias, eps=1e-6, act="none", eps_mode="add"):
    check_rms_norm_act(x, weight, bias, eps, act, eps_mode)
    return torch.empty_like(x)


register_backward("rms_norm_act", rms_norm_act_backward)


# --- the calls its checks and benchmarks make -----------------------------------------------------------------

# The Wan 2.1 decoder at 480x832, one chunk of 4 output frames: 384 channels at 1/8..1/2 size, 96 at full size
# (bench/, gpu_check).
BENCH_SHAPES = ((1, 384, 4, 60, 104), (1, 384, 4, 240, 416), (1, 96, 4, 480, 832))
# compile_check: Wan 2.1 at 480x832 and 720x1280 (smallest and largest stage of a 4-frame chunk) and DC-AE's
# RMSNorm2d ("add", 4-D) at its first stage and at 1024 and 2048 px.
COMPILE_SHAPES = (BENCH_SHAPES[0], BENCH_SHAPES[2], (1, 384, 4, 90, 160), (1, 96, 4, 720, 1280),
                  (1, 1024, 32, 32), (1, 128, 1024, 1024), (1, 128, 2048, 2048))
LAYOUTS = ("contiguous", "channels_last", "per_frame")  # per_frame: what models/wan.py per_frame returns
GPU_DTYPE = torch.bfloat16  # the dtype Wan decodes in


def check_call(r) -> tuple:
    return r(1, 96, 3, 17, 9), r(96), None, 1e-12 * 96**-0.5, "silu", "clamp"


def layout_input(shape, layout: str, empty) -> torch.Tensor:
    """An input of ``shape`` in a layout; ``empty(shape, memory_format)`` allocates. per_frame (5-D only): a
    (B*T, C, H, W) tensor seen as (B, C, T, H, W), the (B, T)-permuted view Wan's per-frame layers return."""
    if layout == "per_frame" and len(shape) == 5:
        b, c, t, h, w = shape
        return empty((b * t, c, h, w), torch.contiguous_format).unflatten(0, (b, t)).transpose(1, 2)
    channels_last = torch.channels_last_3d if len(shape) == 5 else torch.channels_last
    return empty(shape, channels_last if layout == "channels_last" else torch.contiguous_format)


def compile_cases(quick: bool) -> list[CompileCase]:
    cases = [(dtype, layout, shape, act) for dtype, layout, shape, act
             in itertools.product(("bf16", "fp16", "fp32"), LAYOUTS, COMPILE_SHAPES, ("silu", "none"))
             if layout != "per_frame" or len(shape) == 5]
    if quick:
        cases = (("bf16", "channels_last", (1, 96, 4, 480, 832), "silu"), ("fp32", "contiguous", (1, 384, 4, 60, 104),
                 "none"), ("bf16", "per_frame", (1, 96, 4, 480, 832), "silu"))

    def run(dtype, layout, shape, act):
        x = layout_input(shape, layout, lambda s, fmt: cuda_empty(s, dtype, fmt))
        wan = len(shape) == 5  # Wan's clamp; DC-AE's RMSNorm2d adds eps
        rms_norm_act_triton(x, cuda_empty(shape[1:2], dtype), None if wan else cuda_empty(shape[1:2], dtype),
                            1e-12 * shape[1] ** -0.5 if wan else 1e-5, act, "clamp" if wan else "add")

    return [CompileCase(f"{dtype} {layout} {shape_label(shape)} {act}",
                        functools.partial(run, dtype, layout, shape, act)) for dtype, layout, shape, act in cases]


def gpu_cases(device: torch.device, dtype: torch.dtype, smoke: bool) -> list[GpuCase]:
    """Wan's RMS norm + SiLU in every layout its decoder hands over, against eager WanRMS_norm + silu."""

    def eager(x, weight, bias, eps, act, eps_mode):
        return activation(F.normalize(x, dim=1) * x.shape[1] ** 0.5 * weight.view(1, -1, 1, 1, 1), act)

    def case(shape, layout):
        def make():
            x = layout_input(shape, layout, lambda s, fmt: torch.empty(s, device=device, dtype=dtype,
                                                                     memory_format=fmt).normal_())
            return x, torch.rand(shape[1], device=device, dtype=dtype) + 0.5, None, 1e-12 * shape[1] ** -0.5, \
                "silu", "clamp"

        return GpuCase(f"{shape_label(shape)} {layout}", make, {"eager": eager},
                       nbytes=2 * math.prod(shape) * dtype.itemsize)

    return [case(shape, layout) for shape in ([(1, 32, 2, 8, 8)] if smoke else BENCH_SHAPES) for layout in LAYOUTS]
