"""Shared benchmark helpers (pytest-benchmark). Run: ``pytest bench/ --benchmark-autosave``.

* ``device`` fixture: ``torch.device("cuda")`` when CUDA is available, else CPU. Benchmarks use decoder-sized
  inputs on CUDA and tiny ones on CPU (so the suite also runs in CI without a GPU).
* ``timed(fn, every=1)``: ``fn`` wrapped to call ``torch.cuda.synchronize()`` after every ``every``-th call, so
  a timed loop of ``every`` calls ends only when the GPU has finished them (GPU work is asynchronous).
* ``measure`` fixture: ``measure(fn, nbytes=..., flops=...)`` times ``fn`` with ``benchmark.pedantic`` (several
  calls per round on CUDA, synchronised once per round, so launch latency overlaps as in a real decoder and the
  reported times are per call), returns ``fn()``'s result and puts ``GB/s`` (bytes read + written per call) and/or
  ``TFLOP/s`` into ``benchmark.extra_info``. With the Triton ops in the interpreter (CI) it calls ``fn`` once.
* The machine info of saved runs gains the GPU name, CUDA, torch, triton and fastdec versions and fastdec's
  backend table, so results from different machines stay comparable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import fastdec
from fastdec import ops
from fastdec.kernels.support.dispatch import triton_on_cpu
from fastdec.kernels.support.triton_import import TRITON_IMPORT_ERROR, triton


def timed(fn: Callable[[], Any], every: int = 1) -> Callable[[], Any]:
    """``fn`` that synchronises CUDA after every ``every``-th call (a no-op wrapper without CUDA)."""
    if not torch.cuda.is_available():
        return fn
    calls = 0

    def run() -> Any:
        nonlocal calls
        result = fn()
        calls += 1
        if calls % every == 0:
            torch.cuda.synchronize()
        return result

    return run


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def measure(benchmark):
    """``measure(fn, *, nbytes=None, flops=None, calls_per_round=None, rounds=None)`` -> fn()'s result."""

    def run(
        fn: Callable[[], Any],
        *,
        nbytes: int | None = None,
        flops: int | None = None,
        calls_per_round: int | None = None,
        rounds: int | None = None,
    ) -> Any:
        cuda = torch.cuda.is_available()
        calls = calls_per_round or (10 if cuda else 1)
        if not cuda and triton_on_cpu():  # Triton's interpreter: a check that the path runs, not a speed figure
            result = benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)
        else:
            result = benchmark.pedantic(
                timed(fn, calls),
                rounds=rounds or (20 if cuda else 5),
                iterations=calls,
                warmup_rounds=2 if cuda else 1,
            )
        if benchmark.disabled:  # --benchmark-disable: fn ran once, nothing was timed
            return result
        seconds = benchmark.stats.stats.median
        benchmark.extra_info["median_us"] = round(seconds * 1e6, 2)
        if nbytes is not None:
            benchmark.extra_info["GB/s"] = round(nbytes / seconds / 1e9, 2)
        if flops is not None:
            benchmark.extra_info["TFLOP/s"] = round(flops / seconds / 1e12, 3)
        return result

    return run


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    machine_info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    machine_info["cuda"] = torch.version.cuda
    machine_info["torch"] = torch.__version__
    machine_info["triton"] = triton.__version__ if TRITON_IMPORT_ERROR is None else TRITON_IMPORT_ERROR
    machine_info["fastdec"] = fastdec.__version__
    machine_info["fastdec_backends"] = ops.backends()
