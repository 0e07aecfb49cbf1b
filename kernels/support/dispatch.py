"""How a registered op picks its implementation at call time; shared by the op files (kernels/<op>.py).

* CUDA tensors run the Triton launcher (``cuda_kernel``), or the eager reference when triton is missing or in
  interpreter mode.
* CPU tensors run the eager reference, or the launcher through triton's interpreter when FASTDEC_TRITON_INTERPRET=1
  (and TRITON_INTERPRET=1, which kernels/support/triton_import.py sets if triton is not imported yet), one launch at
  a time (``cpu_kernel``).
* Inside ``with reference_ops():`` every Triton op runs its eager reference on every device (parity tests).

``fastdec.ops`` re-exports ``reference_ops`` and says which of these runs where (``backends()``). Every op's autograd
formula is registered the same way (``register_backward``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterator

import torch

from fastdec.kernels.support.triton_import import TRITON_IMPORT_ERROR, triton_interpreting

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


def triton_on_cpu() -> bool:
    return not _force_reference and interpreter_requested() and triton_interpreting()


def triton_on_cuda() -> bool:
    return not _force_reference and TRITON_IMPORT_ERROR is None and not triton_interpreting()


# Triton's interpreter patches triton.language process-wide while it runs a kernel, so two threads interpreting at
# once break each other ("_semantic argument must be provided outside of JIT functions"): one launch at a time.
_INTERPRETER_LOCK = threading.RLock()


def _interpreted(launcher: Callable) -> Callable:
    """``launcher`` (a Triton launcher run on CPU through the interpreter) serialised by the interpreter lock."""
    @functools.wraps(launcher)
    def locked(*args, **kwargs):
        with _INTERPRETER_LOCK:
            return launcher(*args, **kwargs)
    return locked


def cpu_kernel(launcher: Callable, reference: Callable) -> Callable:
    """A Triton op's CPU kernel: the launcher in the interpreter (serialised) when requested, else the reference."""
    return _interpreted(launcher) if triton_on_cpu() else reference


def cuda_kernel(launcher: Callable, reference: Callable) -> Callable:
    """A Triton op's CUDA kernel: the launcher, or the reference when triton cannot run it or references are forced."""
    return launcher if triton_on_cuda() else reference


def device_kernel(x, launcher: Callable, reference: Callable) -> Callable:
    """What runs for tensor ``x`` outside the op registry (a helper an op's file exposes to tiling, say)."""
    return (cuda_kernel if x.is_cuda else cpu_kernel)(launcher, reference)


def register_backward(name: str, backward: Callable) -> None:
    """Registers ``backward(grad_out, *inputs)`` as the autograd formula of ``torch.ops.fastdec.<name>``. It returns
    the gradients of the op's tensor arguments in order (a lone tensor when there is one); those arguments are
    saved for it, and the others get no gradient."""
    arguments = getattr(torch.ops.fastdec, name).default._schema.arguments
    optional_tensor = torch._C.OptionalType.ofTensor()
    tensor_positions = [i for i, argument in enumerate(arguments) if argument.type.isSubtypeOf(optional_tensor)]

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*(inputs[i] for i in tensor_positions))
        ctx.other_inputs = [None if i in tensor_positions else value for i, value in enumerate(inputs)]

    def autograd_backward(ctx, grad_out):
        inputs = list(ctx.other_inputs)
        for i, tensor in zip(tensor_positions, ctx.saved_tensors, strict=True):
            inputs[i] = tensor
        grads = backward(grad_out, *inputs)
        by_position = dict(zip(tensor_positions, grads if isinstance(grads, tuple) else (grads,), strict=True))
        return tuple(by_position.get(i) for i in range(len(inputs)))

    torch.library.register_autograd(f"fastdec::{name}", autograd_backward, setup_context=setup_context)
