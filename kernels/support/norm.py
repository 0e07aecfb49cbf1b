"""What the normalisation+activation ops (group_norm_act, rms_norm_act) share: the argument checks (the same rules,
worded with the op's name), the compute dtype, the (N, C, S) strided view of x, the tile budget and the activation
(its in-kernel form and its derivative, and the backward of the affine + activation after the norm)."""

from __future__ import annotations

import math

import torch

from fastdec.kernels.support.triton_import import next_power_of_2, tl, triton, triton_interpreting

ACTIVATIONS = ("none", "silu", "relu")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_norm_input(op: str, x: torch.Tensor) -> None:
    """x is a 4-D (N, C, H, W) or 5-D (N, C, T, H, W) floating-point tensor."""
    if not isinstance(x, torch.Tensor) or x.dim() not in (4, 5):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"fastdec.{op}: x must be a 4-D (N, C, H, W) or 5-D (N, C, T, H, W) tensor, "
            f"got {shape}; add a spatial dim of size 1 for (N, C, L) input"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"fastdec.{op}: x must be float16, bfloat16, float32 or float64, got {x.dtype}")


def check_norm_params(
    op: str, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, act: str,
    shape_hint: str = "",
) -> None:
    """Per-channel weight/bias (shape (C,), x's device, x's dtype or fp32), eps > 0 and finite, a known act."""
    channels = x.shape[1]
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None:
            continue
        if param.shape != (channels,):
            raise ValueError(
                f"fastdec.{op}: {name} must have shape ({channels},), got {tuple(param.shape)}{shape_hint}"
            )
        if param.device != x.device:
            raise ValueError(f"fastdec.{op}: {name} is on {param.device} but x is on {x.device}")
        if param.dtype not in (x.dtype, torch.float32):
            raise ValueError(f"fastdec.{op}: {name} must be {x.dtype} (like x) or float32, got {param.dtype}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"fastdec.{op}: eps must be a finite number > 0, got {eps!r}")
    if act not in ACTIVATIONS:
        raise ValueError(f"fastdec.{op}: act must be one of {ACTIVATIONS}, got {act!r}")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Statistics and arithmetic run in fp32 (fp64 for fp64 input)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _spatial_groups(t: torch.Tensor) -> list[tuple[int, int]]:
    """t's spatial dims (size-1 dims dropped) merged where they flatten: [(size, stride)], outermost first. (A plain
    loop: this runs on every launch, and its host time counts against small GPU calls.)"""
    groups: list[tuple[int, int]] = []
    for size, stride in zip(t.shape[2:], t.stride()[2:], strict=True):
        if size == 1:
            continue
        if groups and groups[-1][1] == size * stride:
            groups[-1] = (groups[-1][0] * size, stride)
        else:
            groups.append((size, stride))
    return groups


def flat_strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(stride_n, stride_c, stride_s) when t's spatial dims flatten to one strided axis S, else None."""
    groups = _spatial_groups(t)
    if len(groups) > 1:
        return None
    return t.stride(0), t.stride(1), groups[0][1] if groups else 1


def _index_dtype(channels: int, positions: int, x_strides, out_strides):
    """int32 offsets inside one sample unless they can pass 2^31 (the last strides: positions')."""
    span = (channels - 1) * max(x_strides[1], out_strides[1]) + (positions - 1) * max(x_strides[-1], out_strides[-1])
    return tl.int64 if span >= 2**31 else tl.int32


def flat_views(x: torch.Tensor, out: torch.Tensor):
    """(source, target, x strides, target strides, index dtype) for a kernel over the (N, C, S) views of x and out.
    Layouts whose spatial dims do not flatten to one stride (e.g. a transposed H/W view) run on a copy (the caller
    copies target into out when they differ); offsets are int32 inside one sample unless they can pass 2^31."""
    source, x_strides = x, flat_strides(x)
    if x_strides is None:
        source = x.contiguous()
        x_strides = flat_strides(source)
    target, out_strides = out, flat_strides(out)
    if out_strides is None:
        target = torch.empty_like(source)
        out_strides = flat_strides(target)
    index = _index_dtype(x.shape[1], math.prod(x.shape[2:]), x_strides, out_strides)
    return source, target, x_strides, out_strides, index


def frame_views(x: torch.Tensor, out: torch.Tensor):
    """Like flat_views for ops that work per position, over (N, C, T, S) views: the spatial dims may flatten to two
    strided axes (frames T, positions S) instead of one, which covers a (B, T)-permuted video view (Wan's per-frame
    layers hand those over) without a copy. Returns (source, target, sizes (T, S), x strides (n, c, t, s), target
    strides, index dtype); layouts that split into more than two axes run on a copy."""
    x_groups, out_groups = _spatial_groups(x), _spatial_groups(out)
    if len(x_groups) > 2 or [size for size, _ in x_groups] != [size for size, _ in out_groups]:
        return frame_views(*flat_views(x, out)[:2])  # each one flat axis now: positions, one frame
    x_groups = [(1, 0)] * (2 - len(x_groups)) + x_groups
    out_groups = [(1, 0)] * (2 - len(out_groups)) + out_groups
    sizes = (x_groups[0][0], x_groups[1][0])
    x_strides = (x.stride(0), x.stride(1), x_groups[0][1], x_groups[1][1])
    out_strides = (out.stride(0), out.stride(1), out_groups[0][1], out_groups[1][1])
    return x, out, sizes, x_strides, out_strides, _index_dtype(x.shape[1], sizes[1], x_strides, out_strides)


# Elements per loaded tile: 16 values per thread at 4 warps on a GPU. Triton's CPU interpreter pays per tile op, not
# per element (numpy), so there tiles are 16x larger: same kernel code, far fewer loop trips.
TILE_ELEMENTS = 32768 if triton_interpreting() else 2048


def group_tile_shape(groups: int, group_channels: int, positions: int, channels_contiguous: bool
                     ) -> tuple[int, int, int]:
    """(BLOCK_G, BLOCK_CG, BLOCK_S) with about TILE_ELEMENTS lanes, long along the axis contiguous in memory:
    channels_last tiles span whole groups (rows of up to 1024 channels), NCHW tiles up to TILE_ELEMENTS/4
    positions (512 on a GPU)."""
    pow2 = next_power_of_2
    if channels_contiguous:
        block_cg = min(pow2(group_channels), TILE_ELEMENTS)
        block_g = min(pow2(groups), max(1, 1024 // block_cg))
        block_s = min(pow2(positions), max(1, TILE_ELEMENTS // (block_g * block_cg)))
    else:
        block_s = min(pow2(positions), TILE_ELEMENTS // 4)
        block_cg = min(pow2(group_channels), max(1, TILE_ELEMENTS // block_s))
        block_g = min(pow2(groups), max(1, TILE_ELEMENTS // (block_s * block_cg)))
    return block_g, block_cg, block_s


@triton.jit
def activate(y, ACT: tl.constexpr):
    if ACT == "silu":  # y * sigmoid(y) with exp(-|y|), which never overflows
        decay = tl.exp(-tl.abs(y))
        y = y * tl.where(y >= 0, 1.0, decay) / (1.0 + decay)
    elif ACT == "relu":  # where, not maximum: NaN stays NaN as in torch.relu
        y = tl.where(y < 0.0, 0.0, y)
    return y


def activation(y: torch.Tensor, act: str, inplace: bool = False) -> torch.Tensor:
    """act(y) in torch, for the eager references."""
    if act == "silu":
        return torch.nn.functional.silu(y, inplace=inplace)
    return torch.nn.functional.relu(y, inplace=inplace) if act == "relu" else y


def per_channel(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(C,) -> (1, C, 1, ...) in like's dtype, broadcastable against like."""
    return t.to(like.dtype).view(1, -1, *([1] * (like.dim() - 2)))


def affine_act_backward(grad_y: torch.Tensor, xhat: torch.Tensor, weight: torch.Tensor | None,
                        bias: torch.Tensor | None, act: str) -> tuple:
    """Backward of act(xhat * weight + bias), each per channel or None: (grad at xhat, grad_weight, grad_bias)."""
    w = None if weight is None else per_channel(weight, xhat)
    if act != "none":
        y = xhat if w is None else xhat * w
        grad_y = activation_grad(grad_y, y if bias is None else y + per_channel(bias, y), act)
    reduce_dims = [0, *range(2, xhat.dim())]
    grad_weight = None if weight is None else (grad_y * xhat).sum(reduce_dims).to(weight.dtype)
    grad_bias = None if bias is None else grad_y.sum(reduce_dims).to(bias.dtype)
    return grad_y if w is None else grad_y * w, grad_weight, grad_bias


def activation_grad(grad: torch.Tensor, y: torch.Tensor, act: str) -> torch.Tensor:
    """The gradient at the activation's input y from the gradient at its output."""
    if act == "silu":
        sig = torch.sigmoid(y)
        return grad * sig * (1 + y * (1 - sig))
    return grad * (y > 0) if act == "relu" else grad
