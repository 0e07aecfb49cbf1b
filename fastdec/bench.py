"""``fastdec bench``: every decoder family, timed on this device against the same architecture in diffusers.

For each decoder, image size, batch and dtype it runs these variants on the same weights and the same latents:

* ``fastdec``: fastdec's fused ops (the backend that runs each op is printed: Triton kernels on CUDA; on CPU the eager
  references, or Triton's interpreter when FASTDEC_TRITON_INTERPRET=1, which checks kernels and is no speed figure);
* ``fastdec-reference``: the same model inside ``fastdec.ops.reference_ops()`` (every op on its eager reference);
* ``diffusers``: the same architecture in diffusers, eager (AutoencoderKL for sd-vae, AutoencoderTiny for taesd and
  tae-192; the other families have no diffusers implementation: reported "n/a" with the reason);
* ``diffusers-compile`` and ``fastdec-compile``: both under ``torch.compile`` (compile time, the first call, reported
  separately; fastdec's with fullgraph=True; dynamo's caches are reset per case so nothing silently falls back).

The diffusers model gets the fastdec model's weights. On CUDA the fastdec conv decoders run channels_last (their
preferred layout), diffusers runs as shipped (contiguous).

How each figure is measured:

* time: per call, ``repeats`` rounds after ``warmup`` calls and one probe call (memory and output, below); every
  round times each variant once, in an order that rotates from round to round (interleaved, so drift such as clocks
  or other processes hits all variants alike). CUDA: CUDA events around ``calls`` back-to-back calls (enough for
  ~20 ms); CPU: ``time.perf_counter`` around one call. Median, quartiles and min/max over the rounds; a single run is
  never reported. On a shared CPU, ``--threads 1`` avoids OpenMP stalls that swing multi-threaded times by 10x.
* ratio to diffusers eager: the median over rounds of (variant time / diffusers time) of the same round;
  ``speedup_vs_diffusers`` is its inverse.
* peak extra memory of one call, output included. CUDA: ``max_memory_allocated()`` after
  ``reset_peak_memory_stats()``, minus ``memory_allocated()`` before. CPU: the peak of bytes allocated minus bytes
  freed by torch's CPU allocator during the call, from ``torch.profiler`` memory events (the CPU analogue of
  max_memory_allocated). Allocations outside torch's allocator (oneDNN scratch, numpy arrays of Triton's
  interpreter) are not counted; the process RSS is not used, since the C allocator keeps freed pages mapped.
* fidelity: every output against the fp32 reference (the fastdec model in float32 on ``reference_ops()``, same
  weights, same latents), as images ([-1, 1] outputs mapped to [0, 1], not clamped): max |error| and PSNR in dB with
  the reference image's range (max - min) as the peak, so small-valued outputs of random weights do not inflate
  it. ``psnr_db`` is null when the outputs are identical.

Weights are random unless ``--weights DECODER=PATH`` (loaded by ``fastdec.load``); speed does not depend on weight
values. Latents are random normal. ``--pipeline-share`` adds one step of a diffusers UNet2DConditionModel (CFG batch)
and reports what share of a sampling run the decode is, at 1, 4, 20 and 50 steps.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

import fastdec
from fastdec import ops
from fastdec.api import RandomWeightsWarning, load
from fastdec.models.base import Decoder

DECODERS = ("sd-vae", "taesd", "taef2", "tae-192", "efficientvit", "efficientvit-attn", "vit-s", "vit-b")
# Replacements for the SD VAE: decoders of SD's 4-channel latents other than the exact path (taef2 reads FLUX.2's
# 32-channel latents, so it replaces no SD VAE).
LIGHTWEIGHT = ("taesd", "tae-192", "efficientvit", "efficientvit-attn", "vit-s", "vit-b")
VARIANTS = ("fastdec", "fastdec-reference", "diffusers", "diffusers-compile", "fastdec-compile")
VARIANT_LABELS = {
    "fastdec": "fastdec (fused)",
    "fastdec-reference": "fastdec (reference ops)",
    "diffusers": "diffusers eager",
    "diffusers-compile": "diffusers + torch.compile",
    "fastdec-compile": "fastdec + torch.compile",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PIPELINE_STEPS = (1, 4, 20, 50)
TEXT_TOKENS = 77  # CLIP's context length, the encoder_hidden_states of SD1.5's UNet
UNET_CONFIGS = {
    "sd15": dict(
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, layers_per_block=2, attention_head_dim=8,
    ),
    # Same block structure, 10x narrower: for CPUs, where the SD1.5-size UNet takes seconds per step at any size.
    "tiny": dict(
        block_out_channels=(32, 64, 128, 128), cross_attention_dim=64, layers_per_block=2, attention_head_dim=8,
    ),
}
UNET_BLOCKS = dict(
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
CUDA_ROUND_SECONDS = 0.02  # GPU calls per timed round: enough for the events' resolution and launch overlap
MIB = 2**20
GIB = 2**30


# --- settings ------------------------------------------------------------------------------------------------------


@dataclass
class Settings:
    decoders: tuple[str, ...]
    resolutions: tuple[int, ...]
    batches: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    repeats: int
    warmup: int
    compile: bool
    compile_backend: str
    weights: dict[str, str]
    pipeline_share: bool
    unet_config: str
    seed: int
    quick: bool
    threads: int | None = None

    def to_json(self) -> dict:
        return {
            "decoders": list(self.decoders), "resolutions": list(self.resolutions), "batches": list(self.batches),
            "dtype": dtype_name(self.dtype), "device": str(self.device), "repeats": self.repeats,
            "warmup": self.warmup, "compile": self.compile, "compile_backend": self.compile_backend,
            "weights": self.weights or "random", "pipeline_share": self.pipeline_share,
            "unet_config": self.unet_config if self.pipeline_share else None, "seed": self.seed, "quick": self.quick,
            "threads": self.threads,
        }


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``fastdec bench`` (also ``python -m fastdec.bench``)."""
    parser.add_argument("--decoders", default=",".join(DECODERS),
                        help=f"comma-separated subset of {','.join(DECODERS)} (default: all)")
    parser.add_argument("--resolution", type=_int_list, default=None,
                        help="image side(s) in pixels, comma-separated; latents are side/8 (default: 512,1024 on "
                             "CUDA, 256 on CPU; --quick: 512 on CUDA, 128 on CPU)")
    parser.add_argument("--batch", type=_int_list, default=None,
                        help="batch size(s), comma-separated (default: 1,8 on CUDA, 1 on CPU; --quick: 1)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds per variant (default: 20 on CUDA, 5 on CPU; at least 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 3 CUDA, 1 CPU)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the compile variants (default: inductor)")
    parser.add_argument("--weights", action="append", default=[], metavar="DECODER=PATH",
                        help="real weights for one decoder, loaded by fastdec.load (repeatable); default: random")
    parser.add_argument("--quick", action="store_true",
                        help="small and fast (under 2 minutes on 2 CPU cores): 128 px fp32 on CPU, 512 px bf16 on "
                             "CUDA, batch 1, 5 rounds on CPU / 10 on CUDA, no compile")
    parser.add_argument("--out", default=None, metavar="DIR", help="write DIR/bench.json, bench.png and bench.md")
    parser.add_argument("--compare", nargs="+", default=None, metavar="JSON",
                        help="OLD.json: run, then print new/old median per row; OLD.json NEW.json: compare two files "
                             "without running")
    parser.add_argument("--pipeline-share", action="store_true",
                        help="also time one UNet2DConditionModel step (CFG batch) and report the decode's share of a "
                             "sampling run at 1, 4, 20, 50 steps (needs sd-vae among --decoders)")
    parser.add_argument("--unet-config", choices=sorted(UNET_CONFIGS), default=None,
                        help="UNet of --pipeline-share: sd15 (SD1.5 size, default on CUDA) or tiny (same blocks, "
                             "widths /10, default on CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and latents")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); on a shared machine 1 avoids the OpenMP "
                             "stalls that make multi-threaded CPU times swing by 10x")


def settings_from(args: argparse.Namespace) -> Settings:
    """Validated settings with the device-dependent defaults filled in (ValueError on bad input)."""
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        raise ValueError(f"--device {args.device!r} is not a device ({error}); use cuda or cpu") from error
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--device {args.device!r}: use cuda or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available here; use --device cpu")
    cuda = device.type == "cuda"
    decoders = tuple(name.strip() for name in args.decoders.split(",") if name.strip())
    unknown = [name for name in decoders if name not in DECODERS]
    if unknown or not decoders:
        raise ValueError(f"--decoders: unknown {unknown or 'empty list'}; choose from {','.join(DECODERS)}")
    if args.quick:
        resolutions, batches = args.resolution or ((512,) if cuda else (128,)), args.batch or (1,)
        repeats, compile_ = args.repeats or (10 if cuda else 5), False
    else:
        resolutions = args.resolution or ((512, 1024) if cuda else (256,))
        batches = args.batch or ((1, 8) if cuda else (1,))
        repeats, compile_ = args.repeats or (20 if cuda else 5), not args.no_compile
    bad = [side for side in resolutions if side % 8]
    if bad:
        raise ValueError(f"--resolution {bad}: image sides must be multiples of 8 (the decoders upsample 8x)")
    vits = [name for name in decoders if name.startswith("vit-")]
    if vits and any(side % 16 for side in resolutions):
        raise ValueError(f"--resolution {resolutions}: {vits} decode 2x2-latent patches, so sides must be multiples "
                         "of 16 (or leave the vit decoders out of --decoders)")
    if repeats < 2:
        raise ValueError(f"--repeats {repeats}: at least 2 rounds (a median of one run is no measurement)")
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    if warmup < 0:
        raise ValueError(f"--warmup {warmup}: must be >= 0")
    weights = {}
    for item in args.weights:
        name, sep, path = item.partition("=")
        if not sep or name not in DECODERS or not path:
            raise ValueError(f"--weights {item!r}: expected DECODER=PATH with DECODER one of {','.join(DECODERS)}")
        weights[name] = path
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads}: must be >= 1")
    if args.pipeline_share and "sd-vae" not in decoders:
        raise ValueError("--pipeline-share compares against the SD VAE: add sd-vae to --decoders")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    return Settings(
        decoders=decoders, resolutions=tuple(resolutions), batches=tuple(batches), dtype=dtype, device=device,
        repeats=repeats, warmup=warmup, compile=compile_, compile_backend=args.compile_backend, weights=weights,
        pipeline_share=args.pipeline_share, unet_config=args.unet_config or ("sd15" if cuda else "tiny"),
        seed=args.seed, quick=args.quick, threads=args.threads,
    )


# --- the models under test -----------------------------------------------------------------------------------------


@dataclass
class Contender:
    """A fastdec decoder (CPU, float32, eval) and the same architecture with the same weights in diffusers."""

    name: str
    model: Decoder
    diffusers: nn.Module | None
    no_diffusers_reason: str | None


def fastdec_model(name: str, weights: str | None = None) -> Decoder:
    """The fastdec decoder of a family, random (the paper's/preset's architecture) or from ``weights``."""
    from fastdec.models import efficientvit, vit
    from fastdec.models.autoencoder_kl import AutoencoderKLDecoder
    from fastdec.models.taesd import TAESDDecoder

    if weights is not None:
        model = load(weights, device="cpu", dtype=torch.float32)
        expected = {"sd-vae": "AutoencoderKLDecoder", "efficientvit": "EfficientViTDecoder", "vit-s": "ViTDecoder",
                    "efficientvit-attn": "EfficientViTDecoder", "vit-b": "ViTDecoder"}.get(name, "TAESDDecoder")
        if type(model).__name__ != expected:
            raise ValueError(f"--weights {name}={weights} holds a {type(model).__name__}, not a {expected}")
    elif name == "sd-vae":
        model = AutoencoderKLDecoder.from_preset("sd")
    elif name in ("taesd", "taef2"):
        model = TAESDDecoder(name)
    elif name == "tae-192":
        model = TAESDDecoder("tae-192", latent_channels=4)
    else:
        cls, config = {**efficientvit.PRESETS, **vit.PRESETS}[name]
        model = cls(**config)
    fuse = getattr(model, "fuse_for_inference", None)  # EfficientViT: BatchNorm folded into the convs
    if fuse is not None:
        model = fuse()
    return model.float().eval()


def _empty_module(cls, **config) -> nn.Module:
    """A diffusers module allocated without its (slow, here unused) random initialisation; filled by the caller."""
    with torch.device("meta"):
        module = cls(**config)
    module = module.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            tensor.zero_()
    return module.eval()


def diffusers_twin(name: str, model: Decoder) -> tuple[nn.Module | None, str | None]:
    """The diffusers module that runs the same decoder with ``model``'s weights, or (None, why there is none).

    The encoder half of the diffusers autoencoder is allocated (zeros) but never run.
    """
    import diffusers

    config = model.config
    if name == "sd-vae":
        stages = len(config["block_out_channels"])
        vae = _empty_module(
            diffusers.AutoencoderKL, latent_channels=config["latent_channels"], out_channels=config["out_channels"],
            block_out_channels=tuple(config["block_out_channels"]), layers_per_block=config["layers_per_block"],
            norm_num_groups=config["norm_num_groups"], down_block_types=("DownEncoderBlock2D",) * stages,
            up_block_types=("UpDecoderBlock2D",) * stages, use_post_quant_conv=config["use_post_quant_conv"],
            mid_block_add_attention=config["mid_block_add_attention"], scaling_factor=config["scaling_factor"],
            shift_factor=config["shift_factor"],
        )
        state = model.state_dict()
        for part in ("decoder", "post_quant_conv"):
            part_state = {k.removeprefix(f"{part}."): v for k, v in state.items() if k.startswith(f"{part}.")}
            if part_state:
                getattr(vae, part).load_state_dict(part_state, strict=True)
        return vae, None
    if name in ("taesd", "tae-192"):
        if config["midblock_gn"]:
            return None, "diffusers' AutoencoderTiny has no GroupNorm mid-block branch"
        blocks = tuple(config["blocks"])
        tiny = _empty_module(
            diffusers.AutoencoderTiny, latent_channels=config["latent_channels"],
            decoder_block_out_channels=(config["width"],) * len(blocks), num_decoder_blocks=blocks,
        )
        # madebyollin's index i (fastdec's keys) is diffusers' i - 1: DecoderTiny clamps in forward, not in a layer.
        shifted = {f"{int(key.split('.', 1)[0]) - 1}.{key.split('.', 1)[1]}": value
                   for key, value in model.state_dict().items()}
        tiny.decoder.layers.load_state_dict(shifted, strict=True)
        return tiny, None
    if name == "taef2":
        return None, "no diffusers implementation (AutoencoderTiny lacks TAEF2's GroupNorm mid-block branch)"
    return None, f"no diffusers implementation of the {name} architecture"


def build_contender(name: str, weights: str | None = None, seed: int = 0) -> Contender:
    """Builds fastdec's model (seeded random weights unless ``weights``) and its diffusers twin, on the CPU."""
    torch.manual_seed(seed + DECODERS.index(name))
    model = fastdec_model(name, weights)
    twin, reason = diffusers_twin(name, model)
    return Contender(name, model, twin, reason)


def latents_for(model: Decoder, side: int, batch: int, seed: int) -> Tensor:
    """Random normal latents (never zeros: some kernels shortcut on them) for a side x side image, on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, model.latent_channels, side // 8, side // 8, generator=generator)


def uses_convolutions(model: Decoder) -> bool:
    return not type(model).__name__.startswith("ViT")


def prepare(module: nn.Module, device: torch.device, dtype: torch.dtype, channels_last: bool) -> nn.Module:
    module = module.to(device=device, dtype=dtype)
    return module.to(memory_format=torch.channels_last) if channels_last else module


def image_of(output: Tensor, output_range: str) -> Tensor:
    """A decoder output as an fp32 image on the [0, 1] scale, not clamped (fidelity is measured on it)."""
    image = output.float()
    return image * 0.5 + 0.5 if output_range == "-1,1" else image


# --- measuring -----------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_peak_memory(fn: Callable[[], Tensor], device: torch.device) -> tuple[Tensor, int]:
    """(fn()'s output, peak extra bytes during the call); see the module docstring for what is counted."""
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


def fused_backend(device: torch.device) -> str:
    """What ``fastdec`` variants run on this device, from ops.backends(), in a few words."""
    table = ops.backends()
    triton_state = table["group_norm_act"][device.type]
    if triton_state == "triton":
        triton_ops = "Triton ops"
    elif triton_state.startswith("triton (interpreter)"):
        triton_ops = "Triton ops in the interpreter (a correctness check, not a speed figure)"
    else:
        triton_ops = "eager-reference ops"
    pixel_shuffle = table["pixel_shuffle"][device.type]
    shuffle = pixel_shuffle.split(" (")[0] if not pixel_shuffle.startswith("eager") else "eager-reference"
    return f"{triton_ops}, {shuffle} pixel_shuffle"


# --- one decoder at one size ---------------------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    fn: Callable[[], Tensor] | None = None
    output_range: str = "-1,1"
    backend: str = ""
    reason: str | None = None  # why it did not run (n/a, or the error)
    status: str = "ok"
    compile_s: float | None = None
    calls: int = 1
    peak_memory_bytes: int | None = None
    output: Tensor | None = None
    extra: dict = field(default_factory=dict)


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


@contextlib.contextmanager
def _reference_ops_if(enabled: bool) -> Iterator[None]:
    if enabled:
        with ops.reference_ops():
            yield
    else:
        yield


def _variants(contender: Contender, model: Decoder, twin: nn.Module | None, latents: Tensor,
              settings: Settings) -> list[Variant]:
    fastdec_range = model.output_range
    backend = fused_backend(settings.device)
    twin_name = type(contender.diffusers).__name__ if contender.diffusers is not None else ""

    def fastdec_call(reference: bool, module: Callable[[Tensor], Tensor]) -> Callable[[], Tensor]:
        def run() -> Tensor:
            with _reference_ops_if(reference):
                return module(latents)
        return run

    variants = [
        Variant("fastdec", fastdec_call(False, model), fastdec_range, backend),
        Variant("fastdec-reference", fastdec_call(True, model), fastdec_range, "eager-reference ops"),
    ]
    if twin is None:
        variants.append(Variant("diffusers", status="n/a", reason=contender.no_diffusers_reason))
    else:
        def twin_decode(z: Tensor) -> Tensor:
            return twin.decode(z, return_dict=False)[0]

        variants.append(Variant("diffusers", lambda: twin_decode(latents), backend=f"diffusers {twin_name}, eager"))
    if settings.compile:
        how = f"torch.compile(backend={settings.compile_backend!r})"
        if twin is None:
            variants.append(Variant("diffusers-compile", status="n/a", reason=contender.no_diffusers_reason))
        else:
            compiled_twin = torch.compile(twin_decode, backend=settings.compile_backend, dynamic=False)
            variants.append(Variant("diffusers-compile", lambda: compiled_twin(latents),
                                    backend=f"diffusers {twin_name}, {how}"))
        compiled = torch.compile(model, backend=settings.compile_backend, fullgraph=True, dynamic=False)
        variants.append(Variant("fastdec-compile", fastdec_call(False, compiled), fastdec_range,
                                f"{backend}, {how}, fullgraph"))
    return variants


def _failed(variant: Variant, error: Exception) -> None:
    variant.status, variant.fn = "error", None
    variant.reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"


def bench_decoder(contender: Contender, side: int, batch: int, settings: Settings) -> list[dict]:
    """Every variant of one decoder at one image size and batch: one result row per variant."""
    device, dtype = settings.device, settings.dtype
    cuda = device.type == "cuda"
    channels_last = cuda and uses_convolutions(contender.model)
    latents_cpu = latents_for(contender.model, side, batch, settings.seed)
    latents = latents_cpu.to(device=device, dtype=dtype)
    if channels_last:
        latents = latents.contiguous(memory_format=torch.channels_last)
    model = prepare(copy.deepcopy(contender.model), device, dtype, channels_last)
    twin = None
    if contender.diffusers is not None:
        with _quiet_diffusers():  # .to(dtype) logs a notice about from_pretrained(torch_dtype=...), not our case
            twin = prepare(copy.deepcopy(contender.diffusers), device, dtype, False)
    if settings.compile:
        torch._dynamo.reset()  # fresh compile caches per case: stay under dynamo's recompile limit, never fall back
    variants = _variants(contender, model, twin, latents, settings)

    with torch.no_grad():
        for variant in variants:
            if variant.fn is None:
                continue
            try:
                if variant.name.endswith("-compile"):
                    synchronize(device)
                    start = time.perf_counter()
                    variant.fn()
                    synchronize(device)
                    variant.compile_s = time.perf_counter() - start
                for _ in range(settings.warmup):
                    variant.fn()
                variant.output, variant.peak_memory_bytes = call_peak_memory(variant.fn, device)
                variant.calls = calls_per_round(variant.fn, device)
            except Exception as error:  # an OOM or a compile failure is a result row, not the end of the run
                _failed(variant, error)
                if cuda:
                    torch.cuda.empty_cache()

        reference, fidelity_reason = None, None
        reference_variant = next(v for v in variants if v.name == "fastdec-reference")
        if dtype == torch.float32 and reference_variant.output is not None:
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
    rows = []
    for variant in variants:
        row = {
            "decoder": contender.name, "variant": variant.name, "label": VARIANT_LABELS[variant.name],
            "resolution": side, "latent": [side // 8, side // 8], "latent_channels": contender.model.latent_channels,
            "batch": batch, "dtype": dtype_name(dtype), "device": device.type,
            "memory_format": "channels_last" if channels_last and variant.name.startswith("fastdec") else "contiguous",
            "backend": variant.backend, "status": variant.status, "reason": variant.reason,
            "median_ms": None, "q25_ms": None, "q75_ms": None, "iqr_ms": None, "min_ms": None, "max_ms": None,
            "repeats": 0, "calls_per_repeat": variant.calls, "compile_s": variant.compile_s,
            "peak_memory_bytes": variant.peak_memory_bytes, "max_abs_error": None, "psnr_db": None, "finite": None,
            "fidelity_reason": None,
            "ratio_vs_diffusers": None, "speedup_vs_diffusers": None, "ratio_q25": None, "ratio_q75": None,
            "ratio_reason": None,
        }
        if variant.name in times:
            row.update(summary_ms(times[variant.name]), repeats=len(times[variant.name]))
            if reference is None:
                row["fidelity_reason"] = fidelity_reason
            else:
                row.update(fidelity(image_of(variant.output, variant.output_range), reference))
            if baseline is None:
                row["ratio_reason"] = contender.no_diffusers_reason or "diffusers eager did not run"
            else:
                ratios = [t / b for t, b in zip(times[variant.name], baseline, strict=True)]
                ratio = statistics.median(ratios)
                ratio_q25, _, ratio_q75 = statistics.quantiles(ratios, n=4, method="inclusive")
                row.update(ratio_vs_diffusers=ratio, speedup_vs_diffusers=1 / ratio, ratio_q25=ratio_q25,
                           ratio_q75=ratio_q75)
                if variant.name == "diffusers":
                    row["ratio_reason"] = "the baseline itself"
        else:
            row["ratio_reason"] = variant.reason
        rows.append(row)
    del variants, model, twin
    if cuda:
        torch.cuda.empty_cache()
    return rows


# --- pipeline share ------------------------------------------------------------------------------------------------


def unet_step_times(settings: Settings, side: int, batch: int) -> tuple[dict, dict]:
    """One denoiser step of a random-weight UNet2DConditionModel on the CFG batch (2 x batch): (summary, config)."""
    import diffusers

    config = dict(sample_size=side // 8, in_channels=4, out_channels=4, **UNET_CONFIGS[settings.unet_config],
                  **UNET_BLOCKS)
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**config)
    unet = unet.to_empty(device=settings.device)
    generator = torch.Generator(settings.device).manual_seed(settings.seed)
    with torch.no_grad():
        for tensor in (*unet.parameters(), *unet.buffers()):
            tensor.normal_(0, 0.02, generator=generator)  # values do not change the speed; fast on any device
    unet = unet.to(settings.dtype).eval()
    cfg_batch = 2 * batch
    sample = torch.randn(cfg_batch, 4, side // 8, side // 8, generator=generator, device=settings.device)
    context = torch.randn(cfg_batch, TEXT_TOKENS, config["cross_attention_dim"], generator=generator,
                          device=settings.device)
    sample, context = sample.to(settings.dtype), context.to(settings.dtype)
    timestep = torch.full((cfg_batch,), 500, device=settings.device)

    def step() -> Tensor:
        return unet(sample, timestep, encoder_hidden_states=context, return_dict=False)[0]

    with torch.no_grad():
        for _ in range(max(settings.warmup, 1)):
            step()
        calls = calls_per_round(step, settings.device)
        times = interleaved_times({"unet": step}, {"unet": calls}, settings.repeats, settings.device)["unet"]
    described = {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()}
    return summary_ms(times), {"name": settings.unet_config, "cfg_batch": cfg_batch, **described}


def pipeline_share(rows: list[dict], settings: Settings, side: int, batch: int) -> dict:
    """The decode's share of a sampling run (steps x UNet step + one decode), without and with fastdec."""
    def median(decoder: str, variant: str) -> float | None:
        row = next((r for r in rows if (r["decoder"], r["variant"], r["resolution"], r["batch"]) ==
                    (decoder, variant, side, batch)), None)
        return None if row is None else row["median_ms"]

    decoders = {"diffusers sd-vae (eager)": ("sd-vae", "diffusers", median("sd-vae", "diffusers")),
                "fastdec sd-vae (exact)": ("sd-vae", "fastdec", median("sd-vae", "fastdec"))}
    lightweight = [(median(name, "fastdec"), name) for name in LIGHTWEIGHT if median(name, "fastdec") is not None]
    if lightweight:
        best_ms, best = min(lightweight)
        decoders[f"fastdec {best} (best lightweight)"] = (best, "fastdec", best_ms)
    decoders = {label: entry for label, entry in decoders.items() if entry[2] is not None}
    unet, unet_config = unet_step_times(settings, side, batch)
    unet_ms = unet["median_ms"]
    baseline = decoders.get("diffusers sd-vae (eager)")
    steps = []
    for count in PIPELINE_STEPS:
        entry = {"steps": count, "total_ms": {}, "decode_share": {}, "speedup_vs_diffusers": {}}
        for label, (_, _, decode_ms) in decoders.items():
            total = count * unet_ms + decode_ms
            entry["total_ms"][label] = total
            entry["decode_share"][label] = decode_ms / total
            if baseline is not None:
                entry["speedup_vs_diffusers"][label] = (count * unet_ms + baseline[2]) / total
        steps.append(entry)
    label = (f"unet config: {unet_config['name']} (block_out_channels {unet_config['block_out_channels']}, "
             f"cross_attention_dim {unet_config['cross_attention_dim']}, batch {unet_config['cfg_batch']} for CFG)")
    if unet_config["name"] != "sd15":
        label += " -- NOT the SD1.5-size UNet: shares are illustrative only"
    return {"resolution": side, "batch": batch, "unet_config": unet_config, "unet_label": label, "unet_step": unet,
            "decoders": {label_: {"decoder": d, "variant": v, "median_ms": ms}
                         for label_, (d, v, ms) in decoders.items()},
            "steps": steps}


# --- goals ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    """A figure this benchmark must show: the row metric of one decoder/variant/size/batch against a limit."""

    text: str
    decoder: str
    variant: str
    resolution: int
    batch: int
    metric: str  # "median_ms" or "peak_memory_bytes"
    limit: float
    baseline: str  # the reference figure the goal is set against, for the reader

    def short(self) -> str:
        value = f"{self.limit / GIB:g} GiB" if self.metric == "peak_memory_bytes" else f"{self.limit:g} ms"
        return f"<= {value}"


GPU_GOALS = (
    Goal("SD-VAE decode 512x512, exact fast path", "sd-vae", "fastdec", 512, 1, "median_ms", 5.5,
         "diffusers eager 22.2 ms, torch.compile 8.9 ms (H200)"),
    Goal("SD-VAE decode 1024x1024, exact fast path", "sd-vae", "fastdec", 1024, 1, "median_ms", 22.0,
         "diffusers eager 87 ms (H200)"),
    Goal("SD-VAE decode 1024x1024, peak extra memory", "sd-vae", "fastdec", 1024, 1, "peak_memory_bytes",
         1.2 * GIB, "diffusers eager 2.4 GiB"),
    Goal("TAESD decode 512x512", "taesd", "fastdec", 512, 1, "median_ms", 0.8, "diffusers eager 2.54 ms (H200)"),
)
LIGHTWEIGHT_SPEEDUP_GOAL = 25.0


def _find(rows: list[dict], decoder: str, variant: str, side: int, batch: int) -> dict | None:
    return next((r for r in rows if (r["decoder"], r["variant"], r["resolution"], r["batch"]) ==
                 (decoder, variant, side, batch) and r["median_ms"] is not None), None)


def evaluate_goals(rows: list[dict], device: str, dtype: str) -> list[dict]:
    """Every goal with status "met", "not met" or "not measured here" (and why)."""
    on_gpu = device == "cuda" and dtype == "bfloat16"
    goals = []
    for goal in GPU_GOALS:
        entry = {"goal": f"{goal.text} {goal.short()}", "decoder": goal.decoder, "variant": goal.variant,
                 "resolution": goal.resolution, "batch": goal.batch, "limit": goal.limit, "metric": goal.metric,
                 "baseline": goal.baseline, "value": None}
        row = _find(rows, goal.decoder, goal.variant, goal.resolution, goal.batch)
        if not on_gpu:
            entry.update(status="not measured here", why=f"a CUDA bf16 goal; this run: {device} {dtype}")
        elif row is None or row[goal.metric] is None:
            entry.update(status="not measured here",
                         why=f"{goal.decoder} {goal.resolution}px batch {goal.batch} is not in this run")
        else:
            entry.update(value=row[goal.metric], status="met" if row[goal.metric] <= goal.limit else "not met")
        goals.append(entry)
    configs = sorted({(r["resolution"], r["batch"]) for r in rows})
    for side, batch in configs:
        entry = {"goal": f"best lightweight decoder >= {LIGHTWEIGHT_SPEEDUP_GOAL:g}x faster than diffusers SD-VAE "
                         f"eager, {side}px batch {batch}", "decoder": None, "variant": "fastdec", "resolution": side,
                 "batch": batch, "limit": LIGHTWEIGHT_SPEEDUP_GOAL, "metric": "speedup_vs_sd_vae_eager",
                 "baseline": "diffusers AutoencoderKL eager, same run", "value": None}
        sd_eager = _find(rows, "sd-vae", "diffusers", side, batch)
        best = min((r for r in (_find(rows, name, "fastdec", side, batch) for name in LIGHTWEIGHT) if r),
                   key=lambda r: r["median_ms"], default=None)
        if not on_gpu:
            entry.update(status="not measured here", why=f"a CUDA bf16 goal; this run: {device} {dtype}")
        elif sd_eager is None or best is None:
            entry.update(status="not measured here", why="needs sd-vae and a lightweight decoder in the run")
        else:
            speedup = sd_eager["median_ms"] / best["median_ms"]
            entry.update(decoder=best["decoder"], value=speedup,
                         status="met" if speedup >= LIGHTWEIGHT_SPEEDUP_GOAL else "not met")
        goals.append(entry)
    cpu_goal = {"goal": "CPU: no fastdec decoder slower than the same architecture in diffusers eager",
                "decoder": None, "variant": "fastdec", "resolution": None, "batch": None, "limit": 1.0,
                "metric": "ratio_vs_diffusers", "baseline": "diffusers eager, same run, interleaved", "value": None}
    compared = [r for r in rows if r["variant"] == "fastdec" and r["ratio_vs_diffusers"] is not None]
    if device != "cpu":
        cpu_goal.update(status="not measured here", why=f"a CPU goal; this run: {device}")
    elif any("interpreter" in r["backend"] for r in compared):
        cpu_goal.update(status="not measured here",
                        why="fastdec's Triton ops ran in Triton's interpreter (FASTDEC_TRITON_INTERPRET=1): no speed "
                            "figure; run without it")
    elif not compared:
        cpu_goal.update(status="not measured here", why="no decoder with a diffusers equivalent in the run")
    else:
        slower = [f"{r['decoder']} {r['resolution']}px b{r['batch']} x{r['ratio_vs_diffusers']:.2f}"
                  + (" (within noise: the paired ratio's IQR includes 1)" if r["ratio_q25"] <= 1.0 else "")
                  for r in compared if r["ratio_vs_diffusers"] > 1.0]
        worst = max(compared, key=lambda r: r["ratio_vs_diffusers"])
        cpu_goal.update(value=worst["ratio_vs_diffusers"], decoder=worst["decoder"],
                        status="not met" if slower else "met", why=("slower: " + ", ".join(slower)) if slower else None)
    goals.append(cpu_goal)
    return goals


def goal_for_row(row: dict, goals: list[dict]) -> str:
    """The goal column of a result row: the goals that name this row's figure, with their status."""
    marks = []
    for goal in goals:
        if goal["status"] == "not measured here" or goal["variant"] != row["variant"]:
            continue
        if goal["metric"] == "ratio_vs_diffusers":
            if row["ratio_vs_diffusers"] is not None and row["device"] == "cpu":
                status = "met" if row["ratio_vs_diffusers"] <= 1.0 else "not met"
                marks.append(f"not slower than diffusers: {status}")
        elif (goal["decoder"], goal["resolution"], goal["batch"]) == (row["decoder"], row["resolution"], row["batch"]):
            if goal["metric"] == "speedup_vs_sd_vae_eager":
                marks.append(f">= {goal['limit']:g}x vs SD-VAE eager: {goal['status']} ({goal['value']:.1f}x)")
            else:
                memory = goal["metric"] == "peak_memory_bytes"
                limit = f"{goal['limit'] / GIB:g} GiB" if memory else f"{goal['limit']:g} ms"
                marks.append(f"<= {limit}: {goal['status']}")
    return "; ".join(marks)


# --- environment ---------------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    """Device, driver and library versions, for comparing runs."""
    from fastdec.kernels._triton import TRITON_IMPORT_ERROR, triton

    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    info = {"type": device.type, "torch_threads": torch.get_num_threads(), "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(name=properties.name, capability=f"{properties.major}.{properties.minor}",
                    memory_bytes=properties.total_memory, driver=_nvidia_driver(), cuda=torch.version.cuda,
                    cudnn_benchmark=torch.backends.cudnn.benchmark)
    else:
        info.update(name=info["cpu"], driver=None, cuda=None)
    return {
        "device": info,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "triton": triton.__version__ if TRITON_IMPORT_ERROR is None else None,
                     "diffusers": diffusers_version, "fastdec": fastdec.__version__},
        "fastdec_backends": ops.backends(),
        "interpreter": {"FASTDEC_TRITON_INTERPRET": os.environ.get("FASTDEC_TRITON_INTERPRET"),
                        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET")},
    }


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _nvidia_driver() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10, check=True)
        return result.stdout.strip().splitlines()[0]
    return None


# --- running -------------------------------------------------------------------------------------------------------


class Progress:
    """A rich progress bar on a terminal (stderr), one plain line per step otherwise."""

    def __init__(self, total: int):
        self.total, self.done, self.bar = total, 0, None
        if sys.stderr.isatty():
            with contextlib.suppress(ImportError):
                from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

                self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                                    "{task.total}"), TimeElapsedColumn(), transient=True)
                self.task = self.bar.add_task("fastdec bench", total=total)
                self.bar.start()

    def step(self, description: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=description)
        else:
            print(f"[{self.done + 1}/{self.total}] {description}", file=sys.stderr, flush=True)

    def advance(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.advance(self.task)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def run_benchmark(settings: Settings, command: str) -> dict:
    """Builds every decoder, measures every variant at every size and batch, evaluates the goals: the JSON dict."""
    started = time.perf_counter()
    configs = [(side, batch) for side in settings.resolutions for batch in settings.batches]
    progress = Progress(len(settings.decoders) * len(configs) + (len(configs) if settings.pipeline_share else 0))
    rows: list[dict] = []
    threads = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomWeightsWarning)
            for name in settings.decoders:
                progress.step(f"building {name}")
                contender = build_contender(name, settings.weights.get(name), settings.seed)
                for side, batch in configs:
                    progress.step(f"{name} {side}px batch {batch}")
                    rows += bench_decoder(contender, side, batch, settings)
                    progress.advance()
                del contender
            shares = []
            if settings.pipeline_share:
                for side, batch in configs:
                    progress.step(f"UNet step {side}px batch {batch}")
                    shares.append(pipeline_share(rows, settings, side, batch))
                    progress.advance()
        env = environment(settings.device)
    finally:
        progress.close()
        torch.set_num_threads(threads)
    return {
        "kind": "fastdec-bench", "schema": 1,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command, **env, "settings": settings.to_json(),
        "methods": {
            "timing": ("CUDA events around back-to-back calls" if settings.device.type == "cuda"
                       else "time.perf_counter around one call") + f", {settings.warmup} warm-up calls, "
                      f"{settings.repeats} interleaved rounds; median, quartiles, min/max",
            "ratio_vs_diffusers": "median over rounds of variant time / diffusers eager time of the same round "
                                  "(ratio_q25, ratio_q75: its quartiles)",
            "memory": ("CUDA max_memory_allocated - memory_allocated before, one call, output included"
                       if settings.device.type == "cuda" else
                       "torch CPU allocator peak (allocated - freed) during one call, from torch.profiler memory "
                       "events, output included; memory outside torch's allocator not counted"),
            "fidelity": "vs the fp32 fastdec model on reference ops, same weights and latents; images on the [0, 1] "
                        "scale, unclamped; PSNR peak = the reference's max - min; psnr_db null when identical",
            "weights": "random (speed does not depend on weight values)" if not settings.weights
                       else f"from {settings.weights}, random for the others",
        },
        "rows": rows,
        "goals": evaluate_goals(rows, settings.device.type, dtype_name(settings.dtype)),
        "pipeline_share": shares if settings.pipeline_share else None,
        "wall_s": time.perf_counter() - started,
    }


# --- rendering -----------------------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3g}" if value < 1000 else f"{value:.0f}"


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MIB:.1f}"


def _error(row: dict, digits: int) -> str:
    return "n/a" if row["max_abs_error"] is None else f"{row['max_abs_error']:.{digits}e}"


def _psnr(row: dict) -> str:
    if row["status"] != "ok" or row["finite"] is None:
        return "n/a"
    if not row["finite"]:
        return "non-finite"
    return "identical" if row["psnr_db"] is None else f"{row['psnr_db']:.1f}"


def _speedup(row: dict) -> str:
    if row["speedup_vs_diffusers"] is None:
        return "n/a"
    return "1 (baseline)" if row["variant"] == "diffusers" else f"{row['speedup_vs_diffusers']:.2f}x"


def header_lines(result: dict) -> list[str]:
    device, versions = result["device"], result["versions"]
    settings = result["settings"]
    card = device["name"] + (f", driver {device['driver']}" if device.get("driver") else "")
    if device["type"] == "cpu":
        card += f" ({device['cpu_count']} cores, {device['torch_threads']} torch threads)"
    return [
        f"**{card}** · {result['date'][:10]} · torch {versions['torch']} · triton {versions['triton']} · "
        f"diffusers {versions['diffusers']} · fastdec {versions['fastdec']} · {settings['dtype']} · "
        f"weights: {'random' if settings['weights'] == 'random' else 'real'}",
        "",
        f"`{result['command']}`",
    ]


SUMMARY_VARIANTS = ("fastdec", "fastdec-reference", "diffusers", "diffusers-compile", "fastdec-compile")


def summary_table(result: dict) -> list[str]:
    """One line per decoder, size and batch: the median ms of each variant, fastdec's speed-up, memory, PSNR."""
    rows, goals = result["rows"], result["goals"]
    present = [v for v in SUMMARY_VARIANTS if any(r["variant"] == v for r in rows)]
    head = ["decoder", "image", "batch", *(f"{VARIANT_LABELS[v]} ms" for v in present),
            "fastdec speed-up vs diffusers eager", "peak MiB fastdec / diffusers", "fastdec PSNR dB", "goal"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = list(dict.fromkeys((r["decoder"], r["resolution"], r["batch"]) for r in rows))
    for decoder, side, batch in keys:
        case = {r["variant"]: r for r in rows if (r["decoder"], r["resolution"], r["batch"]) == (decoder, side, batch)}
        fused, eager = case.get("fastdec"), case.get("diffusers")
        times = [_ms(case[v]["median_ms"]) if v in case else "n/a" for v in present]
        memory = f"{_mib(fused and fused['peak_memory_bytes'])} / {_mib(eager and eager['peak_memory_bytes'])}"
        goal_marks = "; ".join(mark for mark in (goal_for_row(case[v], goals) for v in case) if mark)
        lines.append("| " + " | ".join([decoder, f"{side}²", str(batch), *times, _speedup(fused) if fused else "n/a",
                                        memory, _psnr(fused) if fused else "n/a", goal_marks or "–"]) + " |")
    return lines


def full_table(result: dict) -> list[str]:
    head = ["decoder", "image", "batch", "variant", "backend", "median ms", "IQR ms", "min–max ms", "compile s",
            "peak MiB", "max abs err", "PSNR dB", "vs diffusers", "goal"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["rows"]:
        if row["status"] == "ok":
            cells = [_ms(row["median_ms"]), _ms(row["iqr_ms"]), f"{_ms(row['min_ms'])}–{_ms(row['max_ms'])}",
                     "–" if row["compile_s"] is None else f"{row['compile_s']:.1f}", _mib(row["peak_memory_bytes"]),
                     _error(row, 2), _psnr(row), _speedup(row)]
        else:
            cells = [f"{row['status']}: {row['reason']}", *["–"] * 7]
        lines.append("| " + " | ".join([row["decoder"], f"{row['resolution']}²", str(row["batch"]), row["label"],
                                        row["backend"] or "–", *cells, goal_for_row(row, result["goals"]) or "–"])
                     + " |")
    return lines


def goals_table(result: dict) -> list[str]:
    lines = ["| goal | set against | measured | status |", "|---|---|---|---|"]
    for goal in result["goals"]:
        value = goal["value"]
        if value is None:
            measured = "–"
        elif goal["metric"] == "peak_memory_bytes":
            measured = f"{value / GIB:.2f} GiB"
        elif goal["metric"] == "median_ms":
            measured = f"{value:.3g} ms"
        elif goal["metric"] == "speedup_vs_sd_vae_eager":
            measured = f"{value:.1f}x ({goal['decoder']})"
        else:
            measured = f"worst x{value:.2f} of diffusers time ({goal['decoder']})"
        status = goal["status"] + (f" ({goal['why']})" if goal.get("why") else "")
        lines.append(f"| {goal['goal']} | {goal['baseline']} | {measured} | {status} |")
    return lines


def pipeline_lines(result: dict) -> list[str]:
    lines = []
    for share in result.get("pipeline_share") or []:
        unet = share["unet_step"]
        lines += ["", f"Pipeline share, {share['resolution']}² batch {share['batch']}: one UNet step "
                      f"{_ms(unet['median_ms'])} ms (IQR {_ms(unet['iqr_ms'])}); {share['unet_label']}; a run is "
                      "steps x UNet step + one decode; speed-up is against the same run with diffusers' SD-VAE", ""]
        labels = list(share["decoders"])
        head = ["steps", *(f"{label}: decode share / total ms / speed-up" for label in labels)]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for entry in share["steps"]:
            cells = [f"{entry['decode_share'][label]:.1%} / {_ms(entry['total_ms'][label])} / "
                     f"{entry['speedup_vs_diffusers'].get(label, float('nan')):.2f}x" for label in labels]
            lines.append("| " + " | ".join([str(entry["steps"]), *cells]) + " |")
    return lines


def render_markdown(result: dict, full: bool = True) -> str:
    """bench.md: header, summary table, goals, pipeline share and (full=True) every row with its spread."""
    lines = [*header_lines(result), "", *summary_table(result), "", *goals_table(result), *pipeline_lines(result)]
    if full:
        lines += ["", "All rows (median over interleaved rounds; IQR and min–max show the spread; PSNR against the "
                      "fp32 reference-ops output):", "", *full_table(result)]
    return "\n".join(lines) + "\n"


def print_rich(result: dict) -> None:
    """The result as rich tables on a terminal."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print("\n".join(header_lines(result)).replace("**", ""))
    table = Table(show_lines=False)
    for column in ("decoder", "image", "batch", "variant", "median ms", "IQR ms", "compile s", "peak MiB",
                   "max abs err", "PSNR dB", "vs diffusers", "goal"):
        table.add_column(column, justify="right" if column not in ("decoder", "variant", "goal") else "left")
    for row in result["rows"]:
        if row["status"] == "ok":
            cells = [_ms(row["median_ms"]), _ms(row["iqr_ms"]),
                     "–" if row["compile_s"] is None else f"{row['compile_s']:.1f}", _mib(row["peak_memory_bytes"]),
                     _error(row, 1), _psnr(row), _speedup(row)]
        else:
            cells = [f"{row['status']}", "", "", "", "", "", ""]
        table.add_row(row["decoder"], str(row["resolution"]), str(row["batch"]), row["label"], *cells,
                      goal_for_row(row, result["goals"]))
    console.print(table)
    console.print("\n".join(goals_table(result) + pipeline_lines(result)))
    console.print(f"fastdec backend here: {fused_backend(torch.device(result['device']['type']))}")


def plot(result: dict, path: Path) -> None:
    """bench.png: median time per decoder and variant (log scale, IQR error bars) and peak memory, per size/batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    configs = list(dict.fromkeys((r["resolution"], r["batch"]) for r in rows))
    decoders = list(dict.fromkeys(r["decoder"] for r in rows))
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    figure, axes = plt.subplots(2, len(configs), figsize=(1.2 + 1.6 * len(decoders) * len(configs), 8), squeeze=False)
    width = 0.8 / len(variants)
    for column, (side, batch) in enumerate(configs):
        for index, variant in enumerate(variants):
            xs, times, low, high, memory_xs, memory = [], [], [], [], [], []
            for position, decoder in enumerate(decoders):
                row = _find(rows, decoder, variant, side, batch)
                if row is None:
                    continue
                x = position + (index - (len(variants) - 1) / 2) * width
                xs.append(x)
                times.append(row["median_ms"])
                low.append(row["median_ms"] - row["q25_ms"])
                high.append(row["q75_ms"] - row["median_ms"])
                if row["peak_memory_bytes"] is not None:
                    memory_xs.append(x)
                    memory.append(max(row["peak_memory_bytes"] / MIB, 1e-3))
            axes[0, column].bar(xs, times, width, yerr=[low, high], capsize=2, label=VARIANT_LABELS[variant])
            axes[1, column].bar(memory_xs, memory, width, label=VARIANT_LABELS[variant])
        for row_index, ylabel in enumerate(("time per call, ms (median, IQR)", "peak extra memory, MiB")):
            axis = axes[row_index, column]
            axis.set_yscale("log")
            axis.set_xticks(range(len(decoders)), decoders, rotation=30, ha="right")
            axis.set_ylabel(ylabel)
            axis.grid(axis="y", which="both", alpha=0.3)
        axes[0, column].set_title(f"{side}x{side}, batch {batch}, {result['settings']['dtype']}")
    axes[0, 0].legend(fontsize="small")
    figure.suptitle(f"fastdec bench on {result['device']['name']} ({result['date'][:10]})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_outputs(result: dict, directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / "bench.json", directory / "bench.png", directory / "bench.md"]
    paths[0].write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    plot(result, paths[1])
    paths[2].write_text(render_markdown(result))
    return paths


# --- comparing two runs --------------------------------------------------------------------------------------------


def read_result(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} not found: pass a bench.json written by `fastdec bench --out DIR`")
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from error
    if not isinstance(result, dict) or result.get("kind") != "fastdec-bench":
        raise ValueError(f"{path} is not a fastdec bench result (no \"kind\": \"fastdec-bench\")")
    return result


def compare(old: dict, new: dict) -> str:
    """Markdown: new/old median per decoder/variant/size/batch/dtype, and the geometric mean per variant."""
    def key(row: dict) -> tuple:
        return row["decoder"], row["variant"], row["resolution"], row["batch"], row["dtype"]

    old_rows = {key(r): r for r in old["rows"] if r["median_ms"] is not None}
    new_rows = {key(r): r for r in new["rows"] if r["median_ms"] is not None}
    lines = [f"old: {old['device']['name']} {old['date']} `{old['command']}`",
             f"new: {new['device']['name']} {new['date']} `{new['command']}`"]
    if old["device"]["name"] != new["device"]["name"]:
        lines.append("warning: the runs are from different devices; ratios mix hardware and code changes")
    lines += ["", "| decoder | variant | image | batch | dtype | old ms | new ms | new/old |", "|" + "---|" * 8]
    ratios: dict[str, list[float]] = {}
    for row_key, new_row in new_rows.items():
        if row_key not in old_rows:
            continue
        ratio = new_row["median_ms"] / old_rows[row_key]["median_ms"]
        ratios.setdefault(row_key[1], []).append(ratio)
        decoder, variant, side, batch, dtype = row_key
        lines.append(f"| {decoder} | {variant} | {side}² | {batch} | {dtype} | {_ms(old_rows[row_key]['median_ms'])} "
                     f"| {_ms(new_row['median_ms'])} | {ratio:.3f} |")
    lines.append("")
    for variant, values in ratios.items():
        lines.append(f"geometric mean new/old, {variant}: {math.exp(statistics.fmean(map(math.log, values))):.3f} "
                     f"over {len(values)} rows")
    only_old, only_new = sorted(set(old_rows) - set(new_rows)), sorted(set(new_rows) - set(old_rows))
    if only_old:
        lines.append(f"only in old: {len(only_old)} rows, e.g. {only_old[:3]}")
    if only_new:
        lines.append(f"only in new: {len(only_new)} rows, e.g. {only_new[:3]}")
    if not ratios:
        lines.append("no row is in both runs (same decoder, variant, size, batch and dtype)")
    return "\n".join(lines)


# --- entry points --------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Runs ``fastdec bench`` from parsed arguments (for a subcommand parser built with add_arguments)."""
    command = shlex.join(["fastdec", "bench", *argv]) if argv is not None else shlex.join(sys.argv)
    try:
        if args.compare is not None and len(args.compare) > 2:
            raise ValueError("--compare takes OLD.json, or OLD.json NEW.json")
        if args.compare is not None and len(args.compare) == 2:
            print(compare(read_result(args.compare[0]), read_result(args.compare[1])))
            return 0
        old = read_result(args.compare[0]) if args.compare else None
        settings = settings_from(args)
        result = run_benchmark(settings, command)
    except ValueError as error:
        print(f"fastdec bench: error: {error}", file=sys.stderr)
        return 2
    if sys.stdout.isatty():
        print_rich(result)
    else:
        print(render_markdown(result, full=True))
    print(f"wall time: {result['wall_s']:.1f} s")
    if args.out:
        for path in write_outputs(result, Path(args.out)):
            print(f"wrote {path}")
    if old is not None:
        print()
        print(compare(old, result))
    return 1 if any(row["status"] == "error" for row in result["rows"]) else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m fastdec.bench [options]``; returns the exit status (2: bad arguments, 1: a variant failed)."""
    parser = argparse.ArgumentParser(prog="fastdec bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else list(argv)
    return run(parser.parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
