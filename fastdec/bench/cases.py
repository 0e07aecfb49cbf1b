"""One decoder at one image size and batch: every variant built, probed, timed; one result row per variant."""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fastdec import ops
from fastdec.bench.contenders import Contender, image_of, latents_for, prepare
from fastdec.bench.settings import Settings, dtype_name
from fastdec.bench.timing import (
    call_peak_memory,
    calls_per_round,
    fastdec_ops_called,
    fidelity,
    fused_backend,
    fused_differs_from_reference,
    interleaved_times,
    paired_ratio,
    summary_ms,
    synchronize,
    variant_label,
)
from fastdec.models.base import Decoder

OTHER_MODEL = "tiny vs full VAE"


@dataclass
class Variant:
    name: str
    fn: Callable[[], Tensor] | None = None
    output_range: str = "-1,1"
    backend: str = ""
    label: str = ""  # the row's label when not the variant's usual one (variant_label)
    reason: str | None = None  # why it did not run (n/a, or the error)
    status: str = "ok"
    compile_s: float | None = None
    calls: int = 1
    peak_memory_bytes: int | None = None
    output: Tensor | None = None
    extra: dict = field(default_factory=dict)


def _variants(contender: Contender, model: Decoder, twin: nn.Module | None, latents: Tensor,
              settings: Settings) -> list[Variant]:
    fastdec_range = model.output_range
    backend = fused_backend(settings.device)
    twin_name = type(contender.diffusers).__name__ if contender.diffusers is not None else ""

    def fastdec_call(reference: bool, module: Callable[[Tensor], Tensor]) -> Callable[[], Tensor]:
        def run() -> Tensor:
            with ops.reference_ops() if reference else contextlib.nullcontext():
                return module(latents)
        return run

    variants = [Variant("fastdec", fastdec_call(False, model), fastdec_range, backend)]
    if settings.reference_variant:
        variants.append(Variant("fastdec-reference", fastdec_call(True, model), fastdec_range, "eager-reference ops"))
    if twin is None:
        variants.append(Variant("diffusers", status="n/a", reason=contender.no_diffusers_reason))
    else:
        def twin_decode(z: Tensor) -> Tensor:
            return contender.entry.twin_decode(twin, z)

        other = contender.entry.twin_is_other_model
        variants.append(Variant("diffusers", lambda: twin_decode(latents), contender.entry.twin_output_range,
                                backend=f"diffusers {twin_name}, eager",
                                label=f"diffusers {twin_name} eager ({OTHER_MODEL})" if other else ""))
    if settings.compile:
        how = f"torch.compile(backend={settings.compile_backend!r})"
        if twin is None:
            variants.append(Variant("diffusers-compile", status="n/a", reason=contender.no_diffusers_reason))
        else:
            compiled_twin = torch.compile(twin_decode, backend=settings.compile_backend, dynamic=False)
            variants.append(Variant("diffusers-compile", lambda: compiled_twin(latents),
                                    contender.entry.twin_output_range,
                                    backend=f"diffusers {twin_name}, {how}"))
        compiled = torch.compile(model, backend=settings.compile_backend, fullgraph=True, dynamic=False)
        variants.append(Variant("fastdec-compile", fastdec_call(False, compiled), fastdec_range,
                                f"{backend}, {how}, fullgraph"))
    if settings.compile and settings.device.type == "cuda":  # --no-compile: the plain variants only
        graph = Variant("fastdec-cudagraph", output_range=fastdec_range, backend=f"{backend}, torch.cuda.graph")
        graph.fn = _cuda_graph_call(model, latents, graph.extra)
        variants.append(graph)
    return variants


def _cuda_graph_call(module: Callable[[Tensor], Tensor], latents: Tensor, extra: dict) -> Callable[[], Tensor]:
    """``module(latents)`` captured in a CUDA graph on its first call (after two warm-up calls on a side stream, as
    torch.cuda.graphs asks), replayed on every call: the decode without the host work of each op (Python, dispatch,
    launches). The output is the graph's own tensor, overwritten by each replay. A replay allocates nothing, so the
    decode's peak memory is taken during the capture (extra["capture_peak_memory_bytes"]): what the graph holds."""
    graph, output = None, None

    def run() -> Tensor:
        nonlocal graph, output
        if graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    module(latents)
            torch.cuda.current_stream().wait_stream(side)

            def capture() -> tuple[torch.cuda.CUDAGraph, Tensor]:
                captured = torch.cuda.CUDAGraph()
                with torch.cuda.graph(captured):
                    return captured, module(latents)

            (graph, output), extra["capture_peak_memory_bytes"] = call_peak_memory(capture, latents.device)
        graph.replay()
        return output

    return run


class Case:
    """One decoder at one size and batch, ready to run: its latents, fastdec's model and the diffusers twin on the
    device, and every variant (built, not yet called). ``fastdec bench`` times them; ``python -m
    fastdec.bench.prewarm`` only calls the compiled ones, so that the same compiles later hit torch's caches."""

    def __init__(self, contender: Contender, side: int, batch: int, settings: Settings):
        device, dtype = settings.device, settings.dtype
        self.channels_last = device.type == "cuda" and contender.channels_last
        self.latents_cpu = latents_for(contender, side, batch, settings.seed, settings.height)
        self.latents = self.latents_cpu.to(device=device, dtype=dtype)
        if self.channels_last:
            self.latents = self.latents.contiguous(memory_format=torch.channels_last)
        self.model = prepare(copy.deepcopy(contender.model), device, dtype, self.channels_last)
        self.twin = None
        if contender.diffusers is not None:
            from diffusers.utils import logging as diffusers_logging

            level = diffusers_logging.get_verbosity()
            diffusers_logging.set_verbosity_error()  # .to(dtype) logs a notice about from_pretrained(torch_dtype=...)
            try:
                self.twin = prepare(copy.deepcopy(contender.diffusers), device, dtype, False)
            finally:
                diffusers_logging.set_verbosity(level)
        if settings.compile:
            torch._dynamo.reset()  # fresh compile caches per case: under dynamo's recompile limit, no fallback
        self.variants = _variants(contender, self.model, self.twin, self.latents, settings)


def bench_decoder(contender: Contender, side: int, batch: int, settings: Settings) -> list[dict]:
    """Every variant of one decoder at one image size and batch: one result row per variant."""
    device, dtype = settings.device, settings.dtype
    cuda = device.type == "cuda"
    case = Case(contender, side, batch, settings)
    latents_cpu, latents, model, twin, channels_last, variants = (
        case.latents_cpu, case.latents, case.model, case.twin, case.channels_last, case.variants)

    fused_differs = True  # until the fastdec variant's first call shows which ops it runs
    fastdec_variant = variants[0]
    with torch.no_grad():
        for variant in list(variants):
            if variant.fn is None:
                continue
            if variant.name == "fastdec-reference" and not fused_differs:
                # Every op this model calls runs its eager reference in ``fastdec`` too: one code path, one row.
                variants.remove(variant)
                fastdec_variant.backend = "eager-reference ops (the same code as fastdec-reference here)"
                fastdec_variant.label = "fastdec (eager-reference ops)"
                continue
            try:
                if variant.name.endswith(("-compile", "-cudagraph")):  # the first call compiles or captures
                    synchronize(device)
                    start = time.perf_counter()
                    variant.fn()
                    synchronize(device)
                    variant.compile_s = time.perf_counter() - start
                warmup = settings.warmup
                if variant is fastdec_variant:  # a warm-up call that also records which fastdec ops run
                    fused_differs = fused_differs_from_reference(fastdec_ops_called(variant.fn), device)
                    warmup -= 1
                for _ in range(warmup):
                    variant.fn()
                variant.output, variant.peak_memory_bytes = call_peak_memory(variant.fn, device)
                variant.peak_memory_bytes = variant.extra.get("capture_peak_memory_bytes", variant.peak_memory_bytes)
                variant.calls = calls_per_round(variant.fn, device)
            except Exception as error:  # an OOM or a compile failure is a result row, not the end of the run
                variant.status, variant.fn = "error", None
                first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
                variant.reason = f"{type(error).__name__}: {first_line}"
                if cuda:
                    torch.cuda.empty_cache()

        reference, fidelity_reason = None, None
        by_name = {v.name: v for v in variants}
        # fastdec's own output is the reference only when it ran the reference code (fastdec-reference dropped)
        reference_variant = by_name.get("fastdec-reference", None if fused_differs else by_name["fastdec"])
        if dtype == torch.float32 and reference_variant is not None and reference_variant.output is not None:
            reference = image_of(reference_variant.output, model.output_range)
        else:  # an fp32 copy of the same weights, every op on its eager reference
            try:
                reference_model = prepare(copy.deepcopy(contender.model), device, torch.float32, channels_last)
                with ops.reference_ops():
                    reference = image_of(reference_model(latents.float()), model.output_range)
                del reference_model
            except Exception as error:  # e.g. out of memory in fp32: the speed figures still stand
                fidelity_reason = f"fp32 reference failed: {type(error).__name__}: {str(error).strip()[:200]}"
                if cuda:
                    torch.cuda.empty_cache()

        running = {v.name: v.fn for v in variants if v.fn is not None}
        times = interleaved_times(running, {v.name: v.calls for v in variants}, settings.repeats, device)

    baseline = times.get("diffusers")
    twin_name = type(contender.diffusers).__name__ if contender.diffusers is not None else ""
    rows = []
    for variant in variants:
        row = {
            "decoder": contender.name, "variant": variant.name,
            "label": variant.label or variant_label(variant.name, device),
            "resolution": side, "height": settings.height or side, "latent": list(latents_cpu.shape[2:]),
            "latent_channels": contender.model.latent_channels,
            "batch": batch, "dtype": dtype_name(dtype), "device": device.type,
            "memory_format": "channels_last" if channels_last and variant.name.startswith("fastdec") else "contiguous",
            "backend": variant.backend, "status": variant.status, "reason": variant.reason,
            "median_ms": None, "q25_ms": None, "q75_ms": None, "iqr_ms": None, "min_ms": None, "max_ms": None,
            "repeats": 0, "calls_per_repeat": variant.calls, "compile_s": variant.compile_s,
            "peak_memory_bytes": variant.peak_memory_bytes, "max_abs_error": None, "psnr_db": None, "finite": None,
            "fidelity_reason": None,
            "ratio_vs_diffusers": None, "speedup_vs_diffusers": None, "ratio_q25": None, "ratio_q75": None,
            "ratio_reason": None,
            # What the diffusers baseline is: the same architecture and weights, or another model that users run
            # otherwise (taew2_1 against AutoencoderKLWan), whose time ratio is no speed-up of the same model.
            "comparison": OTHER_MODEL if contender.entry.twin_is_other_model else "same model",
        }
        if variant.name in times:
            row.update(summary_ms(times[variant.name]), repeats=len(times[variant.name]))
            if variant.name.startswith("diffusers") and contender.entry.twin_is_other_model:
                row["fidelity_reason"] = f"{twin_name} is another model than {contender.name}: no fidelity comparison"
            elif reference is None:
                row["fidelity_reason"] = fidelity_reason
            else:
                row.update(fidelity(image_of(variant.output, variant.output_range), reference))
            if baseline is None:
                row["ratio_reason"] = contender.no_diffusers_reason or "diffusers eager did not run"
            else:
                row.update(paired_ratio(times[variant.name], baseline))
                if variant.name == "diffusers":
                    row["ratio_reason"] = "the baseline itself"
        else:
            row["ratio_reason"] = variant.reason
        rows.append(row)
    del case, variants, model, twin
    if cuda:
        torch.cuda.empty_cache()
    return rows

