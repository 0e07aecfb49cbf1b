"""The one place where fastdec's fused ops are registered as ``torch.ops.fastdec.*`` and their backend is picked.

Every op has a schema, a CPU kernel, a CUDA kernel, a fake (meta) kernel that keeps shape, dtype and layout, and an
autograd formula. Dispatch rule:

* CUDA tensors run the fused kernel: Triton for the Triton ops, ``fastdec._C`` for pixel_shuffle.
* CPU tensors run the C++ kernel (pixel_shuffle) or the eager reference. With ``FASTDEC_TRITON_INTERPRET=1`` (plus
  ``TRITON_INTERPRET=1``, which fastdec sets if triton is not imported yet) the CPU path runs the real Triton kernel
  through triton's interpreter, which is how CI checks the kernel code on a machine without a GPU.
* Inside ``with reference_ops():`` the Triton ops run their eager reference on every device (for parity tests).

When triton or the extension is missing, the op falls back to its eager reference and ``backends()`` says why.
Models call these ops only, never the kernels directly.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator

import torch
from torch import Tensor

from fastdec.kernels import attention as _attention
from fastdec.kernels import group_norm_act as _group_norm_act
from fastdec.kernels import patch_unembed as _patch_unembed
from fastdec.kernels import pixel_shuffle as _pixel_shuffle
from fastdec.kernels import rms_norm_act as _rms_norm_act
from fastdec.kernels._triton import TRITON_IMPORT_ERROR, triton_interpreting

try:
    from fastdec import _C  # noqa: F401  (loading it registers fastdec::pixel_shuffle's C++/CUDA kernels)

    EXTENSION_ERROR: str | None = None
except ImportError as error:
    _C = None
    EXTENSION_ERROR = f"fastdec._C not built ({error})"

_force_reference = False


@contextlib.contextmanager
def reference_ops() -> Iterator[None]:
    """Run the Triton ops on their eager references inside this block (any device), e.g. for parity tests."""
    global _force_reference
    previous, _force_reference = _force_reference, True
    try:
        yield
    finally:
        _force_reference = previous


def interpreter_requested() -> bool:
    return os.environ.get("FASTDEC_TRITON_INTERPRET") == "1"


def _triton_on_cpu() -> bool:
    return not _force_reference and interpreter_requested() and triton_interpreting()


# Triton's interpreter patches triton.language process-wide while it runs a kernel, so two threads interpreting at
# once break each other ("_semantic argument must be provided outside of JIT functions"): one launch at a time.
_INTERPRETER_LOCK = threading.RLock()


def _interpreted(launcher):
    """``launcher`` (a Triton launcher run on CPU through the interpreter) serialised by the interpreter lock."""
    @functools.wraps(launcher)
    def locked(*args, **kwargs):
        with _INTERPRETER_LOCK:
            return launcher(*args, **kwargs)
    return locked


def _cpu_kernel(launcher, reference):
    """A Triton op's CPU kernel: the launcher in the interpreter (serialised) when requested, else the reference."""
    return _interpreted(launcher) if _triton_on_cpu() else reference


def _triton_on_cuda() -> bool:
    return not _force_reference and TRITON_IMPORT_ERROR is None and not triton_interpreting()


# --- group_norm_act ----------------------------------------------------------------------------------------------


@torch.library.custom_op("fastdec::group_norm_act", mutates_args=(), device_types="cpu")
def group_norm_act(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-6, act: str = "none"
) -> Tensor:
    """act(group_norm(x)) for 4-D (N,C,H,W) or 5-D (N,C,T,H,W) x; act in {"none", "silu", "relu"}."""
    fn = _cpu_kernel(_group_norm_act.group_norm_act_triton, _group_norm_act.group_norm_act_reference)
    return fn(x, num_groups, weight, bias, eps, act)


@group_norm_act.register_kernel("cuda")
def _(x, num_groups, weight, bias, eps=1e-6, act="none"):
    fn = _group_norm_act.group_norm_act_triton if _triton_on_cuda() else _group_norm_act.group_norm_act_reference
    return fn(x, num_groups, weight, bias, eps, act)


@group_norm_act.register_fake
def _(x, num_groups, weight, bias, eps=1e-6, act="none"):
    _group_norm_act.check_group_norm_act(x, num_groups, weight, bias, eps, act)
    return torch.empty_like(x)


def _group_norm_act_setup(ctx, inputs, output):
    x, num_groups, weight, bias, eps, act = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.args = (num_groups, eps, act)


def _group_norm_act_backward(ctx, grad_out):
    x, weight, bias = ctx.saved_tensors
    num_groups, eps, act = ctx.args
    grad_x, grad_w, grad_b = _group_norm_act.group_norm_act_backward(grad_out, x, num_groups, weight, bias, eps, act)
    return grad_x, None, grad_w, grad_b, None, None


group_norm_act.register_autograd(_group_norm_act_backward, setup_context=_group_norm_act_setup)


# --- rms_norm_act ------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastdec::rms_norm_act", mutates_args=(), device_types="cpu")
def rms_norm_act(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float = 1e-6,
    act: str = "none",
    eps_mode: str = "add",
) -> Tensor:
    """act(x / rms_c(x) * weight + bias), channel RMS per position of 4-D/5-D x; eps_mode "add" (RMSNorm,
    rsqrt(ms + eps)) or "clamp" (Wan, 1 / max(rms, eps)); see kernels/rms_norm_act.py."""
    fn = _cpu_kernel(_rms_norm_act.rms_norm_act_triton, _rms_norm_act.rms_norm_act_reference)
    return fn(x, weight, bias, eps, act, eps_mode)


@rms_norm_act.register_kernel("cuda")
def _(x, weight, bias, eps=1e-6, act="none", eps_mode="add"):
    fn = _rms_norm_act.rms_norm_act_triton if _triton_on_cuda() else _rms_norm_act.rms_norm_act_reference
    return fn(x, weight, bias, eps, act, eps_mode)


@rms_norm_act.register_fake
def _(x, weight, bias, eps=1e-6, act="none", eps_mode="add"):
    _rms_norm_act.check_rms_norm_act(x, weight, bias, eps, act, eps_mode)
    return torch.empty_like(x)


def _rms_norm_act_setup(ctx, inputs, output):
    x, weight, bias, eps, act, eps_mode = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.args = (eps, act, eps_mode)


def _rms_norm_act_backward(ctx, grad_out):
    x, weight, bias = ctx.saved_tensors
    grad_x, grad_w, grad_b = _rms_norm_act.rms_norm_act_backward(grad_out, x, weight, bias, *ctx.args)
    return grad_x, grad_w, grad_b, None, None, None


rms_norm_act.register_autograd(_rms_norm_act_backward, setup_context=_rms_norm_act_setup)


# --- attention ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastdec::attention", mutates_args=(), device_types="cpu")
def attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """softmax(q k^T * scale) v for (B, H, N, D) tensors, head_dim up to 512; scale defaults to D ** -0.5."""
    fn = _cpu_kernel(_attention.attention_triton, _attention.attention_reference)
    return fn(q, k, v, scale)


@attention.register_kernel("cuda")
def _(q, k, v, scale=None):
    fn = _attention.attention_triton if _triton_on_cuda() else _attention.attention_reference
    return fn(q, k, v, scale)


@attention.register_fake
def _(q, k, v, scale=None):
    _attention.check_attention(q, k, v, scale)
    return q.new_empty(q.shape[:-1] + v.shape[-1:])


def _attention_setup(ctx, inputs, output):
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v)
    ctx.scale = scale


def _attention_backward(ctx, grad_out):
    q, k, v = ctx.saved_tensors
    return (*_attention.attention_backward(grad_out, q, k, v, ctx.scale), None)


attention.register_autograd(_attention_backward, setup_context=_attention_setup)


# --- patch_unembed -----------------------------------------------------------------------------------------------


@torch.library.custom_op("fastdec::patch_unembed", mutates_args=(), device_types="cpu")
def patch_unembed(
    tokens: Tensor,
    patch: int,
    grid_h: int,
    grid_w: int,
    bias: Tensor | None = None,
    out: str = "identity",
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """(B, grid_h*grid_w, p*p*C) tokens -> (B, C, grid_h*p, grid_w*p) image; see kernels/patch_unembed.py."""
    fn = _cpu_kernel(_patch_unembed.patch_unembed_triton, _patch_unembed.patch_unembed_reference)
    return fn(tokens, patch, grid_h, grid_w, bias, out, out_dtype)


@patch_unembed.register_kernel("cuda")
def _(tokens, patch, grid_h, grid_w, bias=None, out="identity", out_dtype=None):
    fn = _patch_unembed.patch_unembed_triton if _triton_on_cuda() else _patch_unembed.patch_unembed_reference
    return fn(tokens, patch, grid_h, grid_w, bias, out, out_dtype)


@patch_unembed.register_fake
def _(tokens, patch, grid_h, grid_w, bias=None, out="identity", out_dtype=None):
    shape = _patch_unembed.check_patch_unembed(tokens, patch, grid_h, grid_w, bias, out, out_dtype)
    return tokens.new_empty(shape, dtype=out_dtype or tokens.dtype)


def _patch_unembed_setup(ctx, inputs, output):
    tokens, patch, grid_h, grid_w, bias, out, out_dtype = inputs
    ctx.save_for_backward(tokens, bias)
    ctx.args = (patch, grid_h, grid_w, out, out_dtype)


def _patch_unembed_backward(ctx, grad_out):
    tokens, bias = ctx.saved_tensors
    grad_tokens, grad_bias = _patch_unembed.patch_unembed_backward(grad_out, tokens, *ctx.args[:3], bias, *ctx.args[3:])
    return grad_tokens, None, None, None, grad_bias, None, None


patch_unembed.register_autograd(_patch_unembed_backward, setup_context=_patch_unembed_setup)


# --- pixel_shuffle (C++/CUDA in csrc/) ----------------------------------------------------------------------------

if _C is None:
    # Same schema as csrc/pixel_shuffle.cpp, backed by the eager reference.
    torch.library.define("fastdec::pixel_shuffle", "(Tensor x, int factor, int phase_offset=0) -> Tensor")
    torch.library.impl("fastdec::pixel_shuffle", "cpu")(_pixel_shuffle.pixel_shuffle_reference)
    torch.library.impl("fastdec::pixel_shuffle", "cuda")(_pixel_shuffle.pixel_shuffle_reference)
elif not _C.built_with_cuda():
    torch.library.impl("fastdec::pixel_shuffle", "cuda")(_pixel_shuffle.pixel_shuffle_reference)

torch.library.register_fake("fastdec::pixel_shuffle")(_pixel_shuffle.pixel_shuffle_empty)


def _pixel_shuffle_setup(ctx, inputs, output):
    x, factor, phase_offset = inputs
    ctx.save_for_backward(x)
    ctx.args = (factor, phase_offset)


def _pixel_shuffle_backward(ctx, grad_out):
    (x,) = ctx.saved_tensors
    return _pixel_shuffle.pixel_shuffle_backward(grad_out, x, *ctx.args), None, None


torch.library.register_autograd("fastdec::pixel_shuffle", _pixel_shuffle_backward, setup_context=_pixel_shuffle_setup)


def pixel_shuffle(x: Tensor, factor: int, phase_offset: int = 0) -> Tensor:
    """Pixel-shuffle upsampling, bitwise equal to F.pixel_shuffle (phase_offset=0); see kernels/pixel_shuffle.py."""
    return torch.ops.fastdec.pixel_shuffle(x, factor, phase_offset)


# --- which backend runs where ------------------------------------------------------------------------------------

TRITON_OPS = ("group_norm_act", "rms_norm_act", "attention", "patch_unembed")


def _triton_backends() -> dict[str, str]:
    if TRITON_IMPORT_ERROR is not None:
        reason = f"eager reference: {TRITON_IMPORT_ERROR}"
        return {"cpu": reason, "cuda": reason}
    if triton_interpreting():
        cpu = (
            "triton (interpreter)"
            if interpreter_requested()
            else "eager reference: TRITON_INTERPRET=1 but FASTDEC_TRITON_INTERPRET is not 1"
        )
        return {"cpu": cpu, "cuda": "eager reference: triton is in interpreter mode (TRITON_INTERPRET=1)"}
    cpu = "eager reference"
    if interpreter_requested():
        cpu += ": FASTDEC_TRITON_INTERPRET=1 but triton was imported before TRITON_INTERPRET=1 was set"
    return {"cpu": cpu, "cuda": "triton"}


def backends() -> dict[str, dict[str, str]]:
    """Per op, which backend runs on CPU and on CUDA in this process, and why when it is a fallback."""
    table = {name: _triton_backends() for name in TRITON_OPS}
    if _C is None:
        reason = f"eager reference: {EXTENSION_ERROR}"
        table["pixel_shuffle"] = {"cpu": reason, "cuda": reason}
    else:
        cuda = "CUDA (fastdec._C)" if _C.built_with_cuda() else "eager reference: fastdec._C built without CUDA"
        table["pixel_shuffle"] = {"cpu": "C++ (fastdec._C)", "cuda": cuda}
    return table


def format_backends() -> str:
    """backends() as a markdown table."""
    rows = ["| op | CPU | CUDA |", "|---|---|---|"]
    rows += [f"| `{name}` | {b['cpu']} | {b['cuda']} |" for name, b in backends().items()]
    return "\n".join(rows)
