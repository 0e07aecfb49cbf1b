"""What an op file declares for the checks and benchmarks that discover it (``fastdec check``,
bench/compile_check.py, bench/gpu_check.py): the case types and the small helpers that build and label them."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "u8": torch.uint8}


class CompileCase(NamedTuple):
    """One call of a Triton launcher whose kernel launches bench/compile_check.py records and compiles for a GPU.
    ``run`` makes its tensors with ``cuda_empty`` (fake under compile_check). ``tuned``: one of several tuner
    candidates of the same case, of which the tuner needs only one that fits."""

    label: str
    run: Callable[[], object]
    tuned: bool = False


class GpuCase(NamedTuple):
    """One shape bench/gpu_check.py checks on a GPU, against the op's reference on fp32 copies of the arguments
    (``bitwise``: against the reference as is), and times against ``peers`` (callables taking the op's arguments;
    gpu_check adds the torch.compile'd reference as "torch.compile" unless a peer has that name)."""

    label: str
    make: Callable[[], tuple]  # fresh random arguments of the op
    peers: dict[str, Callable]
    nbytes: int | None = None  # bytes read + written per call, for GB/s
    flops: int | None = None  # per call, for TFLOP/s
    bitwise: bool = False


def cuda_empty(shape, dtype: str, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """An uninitialised CUDA tensor of a DTYPES dtype: under compile_check's FakeTensorMode a fake one, no GPU."""
    return torch.empty(shape, dtype=DTYPES[dtype], device="cuda", memory_format=memory_format)


def compiled_peer(fn: Callable, smoke: bool) -> Callable:
    """``fn`` under torch.compile, a gpu_check peer. ``smoke`` (gpu_check --smoke, on a CPU in CI) keeps the call
    but compiles with dynamo's eager backend: Inductor's CPU compiles took 28 of the smoke run's 34 s cold."""
    return torch.compile(fn, dynamic=False, backend="eager" if smoke else "inductor")


def shape_label(shape) -> str:
    return "x".join(map(str, shape))
