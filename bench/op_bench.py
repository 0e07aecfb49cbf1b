"""What the op benchmarks (bench/test_bench_<op>.py) share: their cases (CUDA ones skip without CUDA), the skips
for what is not timed on CPU, and torch.compile of a peer."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from fastdec import ops
from fastdec.bench.settings import dtype_name
from fastdec.kernels.support.cases import shape_label

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="decoder-sized benchmarks need CUDA")


def case(device: str, *values, id: str | None = None):
    """pytest.param(device, *values), by default with the id "device-shape-dtype-..." (a shape as AxBxC)."""
    def label(value) -> str:
        if isinstance(value, torch.dtype):
            return dtype_name(value)
        return shape_label(value) if isinstance(value, tuple) else str(value)

    name = id or "-".join([device, *map(label, values)])
    return pytest.param(device, *values, id=name, marks=needs_cuda if device == "cuda" else ())


def skip_untimed(op: str, impl: str, device: str, interpreter: bool = False) -> None:
    """Skips torch.compile on CPU, and fastdec on CPU where the op runs through triton's interpreter (unless
    ``interpreter``: a tiny case whose interpreted run is quick enough to show the path runs)."""
    if impl == "compiled" and device == "cpu":
        pytest.skip("torch.compile (inductor) is benchmarked on CUDA only: CPU compiles are slow in CI")
    if impl == "fastdec" and device == "cpu" and not interpreter and ops.backends()[op]["cpu"].startswith("triton"):
        pytest.skip("fastdec on CPU runs triton's interpreter here, which is far too slow to benchmark")


def compiled(fn: Callable) -> Callable:
    """``fn`` under torch.compile, one graph per case (dynamo reset first: stay under its recompile limit)."""
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, dynamic=False)


def timed_fn(impl: str, fastdec: Callable, eager: Callable) -> Callable:
    """What a case times: fastdec's op, the eager PyTorch code, or torch.compile of it ("compiled")."""
    return {"fastdec": fastdec, "eager": eager}.get(impl) or compiled(eager)
