"""Measuring one call: time (interleaved rounds), peak memory, fidelity against the fp32 reference, backend."""

from __future__ import annotations

import gc
import math
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from fastdec import ops
from fastdec.bench.settings import VARIANT_LABELS

CUDA_ROUND_SECONDS = 0.02  # GPU calls per timed round: enough for the events' resolution and launch overlap


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_peak_memory(fn: Callable[[], Tensor], device: torch.device) -> tuple[Tensor, int]:
    """(fn()'s output, peak extra bytes during the call); fastdec.bench's docstring says what is counted."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        output = fn()
        synchronize(device)
        return output, torch.cuda.max_memory_allocated(device) - before
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # else kineto prints two lines per profiled region
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        output = fn()
    events = [event for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda event: event.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return output, peak


def calls_per_round(fn: Callable[[], object], device: torch.device) -> int:
    """1 on CPU; on CUDA as many back-to-back calls as take about CUDA_ROUND_SECONDS (1 to 100)."""
    if device.type != "cuda":
        return 1
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return max(1, min(100, math.ceil(CUDA_ROUND_SECONDS / max(time.perf_counter() - start, 1e-6))))


def time_round(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    """Seconds per call of ``calls`` back-to-back calls (CUDA events on CUDA, perf_counter on CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        synchronize(device)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    start_time = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start_time) / calls


def interleaved_times(fns: dict[str, Callable[[], object]], calls: dict[str, int], repeats: int,
                      device: torch.device) -> dict[str, list[float]]:
    """``repeats`` rounds; each round times every fn once, the order rotating by one per round."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(time_round(fns[name], calls[name], device))
    return times


def summary_ms(seconds: list[float]) -> dict[str, float]:
    ms = sorted(value * 1e3 for value in seconds)
    q25, _, q75 = statistics.quantiles(ms, n=4, method="inclusive")
    return {"median_ms": statistics.median(ms), "q25_ms": q25, "q75_ms": q75, "iqr_ms": q75 - q25,
            "min_ms": ms[0], "max_ms": ms[-1]}


def paired_ratio(seconds: list[float], baseline: list[float]) -> dict[str, float]:
    """Round by round, time / baseline time of the same round: its median (and inverse) and quartiles."""
    ratios = [t / b for t, b in zip(seconds, baseline, strict=True)]
    ratio = statistics.median(ratios)
    ratio_q25, _, ratio_q75 = statistics.quantiles(ratios, n=4, method="inclusive")
    return {"ratio_vs_diffusers": ratio, "speedup_vs_diffusers": 1 / ratio, "ratio_q25": ratio_q25,
            "ratio_q75": ratio_q75}


def fidelity(image: Tensor, reference: Tensor) -> dict[str, float | bool | None]:
    """max |image - reference| and PSNR (peak: the reference's range); psnr_db None when identical; finite False
    (and both None) when the output holds NaN or Inf."""
    if image.shape != reference.shape:
        raise ValueError(f"output shape {tuple(image.shape)} differs from the reference's {tuple(reference.shape)}")
    error = (image.double() - reference.double())
    mse = float(error.square().mean())
    if not math.isfinite(mse):
        return {"max_abs_error": None, "psnr_db": None, "finite": False}
    peak = float(reference.max() - reference.min()) or 1.0
    psnr = None if mse == 0 else 10 * math.log10(peak**2 / mse)
    return {"max_abs_error": float(error.abs().max()), "psnr_db": psnr, "finite": True}


def fastdec_ops_called(fn: Callable[[], object]) -> set[str]:
    """The ``torch.ops.fastdec`` ops that one call of ``fn`` runs (names without the namespace)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    called: set[str] = set()

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "fastdec":
                called.add(func._opname)
            return func(*args, **(kwargs or {}))

    with Recorder():
        fn()
    return called


def fused_differs_from_reference(op_names: set[str], device: torch.device) -> bool:
    """Whether any of these ops runs other code in ``fastdec`` than in ``fastdec-reference`` on ``device`` (a
    Triton or C++/CUDA kernel rather than its eager reference)."""
    table = ops.backends()
    return any(not table[name][device.type].startswith("eager reference") for name in op_names)


def fused_backend(device: torch.device, short: bool = False) -> str:
    """What ``fastdec`` variants run on this device, from ops.backends(), in a few words (``short``: fewer)."""
    table = ops.backends()
    triton_state = table["group_norm_act"][device.type]
    if triton_state == "triton":
        triton_ops = "Triton ops"
    elif triton_state.startswith("triton (interpreter)"):
        triton_ops = "Triton interpreter" if short else \
            "Triton ops in the interpreter (a correctness check, not a speed figure)"
    else:
        triton_ops = "eager-reference ops"
    pixel_shuffle = table["pixel_shuffle"][device.type]
    shuffle = pixel_shuffle.split(" (")[0] if not pixel_shuffle.startswith("eager") else "eager-reference"
    return f"{triton_ops}, {shuffle} pixel_shuffle"


def variant_label(variant: str, device: torch.device) -> str:
    """A variant's name in tables and the plot: ``fastdec`` names the backend that runs it on ``device``."""
    if variant != "fastdec":
        return VARIANT_LABELS[variant]
    return f"fastdec ({fused_backend(device, short=True)})"
