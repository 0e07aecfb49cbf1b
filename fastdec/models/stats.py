"""Model size and cost: parameter count, and forward FLOPs (2 per multiply-add) at a latent shape."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from fastdec import ops  # noqa: F401  (registers torch.ops.fastdec.*, whose attention formula is added below)


@register_flop_formula(torch.ops.fastdec.attention)
def _attention_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """softmax(q k^T) v: two matmuls, (B*H) x N x M x D and (B*H) x N x M x Dv multiply-adds."""
    *batch, tokens, head_dim = q_shape
    keys, value_dim = k_shape[-2], v_shape[-1]
    return 2 * math.prod(batch) * tokens * keys * (head_dim + value_dim)


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BatchNorm statistics are not counted)."""
    return sum(parameter.numel() for parameter in model.parameters())


def flops(model: nn.Module, latent_shape: tuple[int, ...]) -> int:
    """Forward FLOPs of ``model`` on latents of ``latent_shape`` (B, C, h, w), as FlopCounterMode counts them:
    convolutions, matmuls and ``fastdec.attention`` (norms, activations and other elementwise work are memory
    bound and count 0). Runs on the meta device, so nothing is computed and any size is cheap."""
    state = {name: torch.empty_like(value, device="meta") for name, value in model.state_dict().items()}
    dtype = next(model.parameters()).dtype
    latents = torch.empty(latent_shape, device="meta", dtype=dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        functional_call(model, state, (latents,))
    return counter.get_total_flops()
