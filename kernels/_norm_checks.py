"""Argument checks shared by the normalisation+activation ops (group_norm_act, rms_norm_act): the same input,
parameter, eps and activation rules, worded with the op's name."""

from __future__ import annotations

import math

import torch

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
