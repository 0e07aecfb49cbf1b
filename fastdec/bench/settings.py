"""``fastdec bench`` options: the command line, its validation and the device-dependent defaults."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

import torch

from fastdec.batch.work import resolve_device
from fastdec.bench.decoders import DECODERS, DEFAULT_DECODERS, ENTRIES, QUICK_DECODERS

VARIANTS = ("fastdec", "fastdec-reference", "diffusers", "diffusers-compile", "fastdec-compile", "fastdec-cudagraph")
VARIANT_LABELS = {
    "fastdec": "fastdec (fused)",
    "fastdec-reference": "fastdec (reference ops)",
    "diffusers": "diffusers eager",
    "diffusers-compile": "diffusers + torch.compile",
    "fastdec-compile": "fastdec + torch.compile",
    "fastdec-cudagraph": "fastdec in a CUDA graph",
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
    reference_variant: bool = True  # time fastdec on reference ops too (--quick leaves it out)
    height: int | None = None  # image height when it differs from the side (--height): H x side images

    def to_json(self) -> dict:
        """Every field in order, the ones JSON cannot hold as they are (tuples, dtype, device) written out."""
        return {**asdict(self), "decoders": list(self.decoders), "resolutions": list(self.resolutions),
                "batches": list(self.batches), "dtype": dtype_name(self.dtype), "device": str(self.device),
                "weights": self.weights or "random", "unet_config": self.unet_config if self.pipeline_share else None}


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
    parser.add_argument("--decoders", default=None,
                        help=f"comma-separated subset of {','.join(DECODERS)} (default: "
                             f"{','.join(DEFAULT_DECODERS)}; --quick: {','.join(QUICK_DECODERS)}, one of each kind; "
                             "the others are slow and run when named)")
    parser.add_argument("--all", action="store_true",
                        help="with --quick: every default decoder rather than one of each kind")
    parser.add_argument("--resolution", type=_int_list, default=None,
                        help="image side(s) in pixels, comma-separated; latents are side/8 (default: 512,1024 on "
                             "CUDA, 256 on CPU; --quick: 512 on CUDA, 64 on CPU)")
    parser.add_argument("--batch", type=_int_list, default=None,
                        help="batch size(s), comma-separated (default: 1,8 on CUDA, 1 on CPU; --quick: 1)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds per variant (default: 20 on CUDA, 5 on CPU; --quick: 10 / 3; at least 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 3 CUDA, 1 CPU)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the compile variants (default: inductor)")
    parser.add_argument("--weights", action="append", default=[], metavar="DECODER=PATH",
                        help="real weights for one decoder, loaded by fastdec.load (repeatable); default: random")
    parser.add_argument("--quick", action="store_true",
                        help="small and fast (under a minute on 2 idle CPU cores): one decoder of each kind "
                             f"({','.join(QUICK_DECODERS)}), 64 px fp32 on CPU, 512 px bf16 on CUDA, batch 1, "
                             "3 rounds on CPU (no warm-up call) / 10 on CUDA, no compile, no fastdec-reference row")
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
    parser.add_argument("--batch-throughput", action="store_true",
                        help="instead: items/s of `fastdec batch`, local engine vs Ray, for taesd, tae-192 and sd-vae "
                             "(--resolution: first side, default 512; --threads, --out apply) and the time to decode "
                             "100K 1024^2 images projected from it; more options: "
                             "python -m fastdec.bench.batch_throughput -h")
    parser.add_argument("--tiling", action="store_true",
                        help="instead: peak memory, max error and seams of exact tiled vs untiled decoding, fastdec "
                             "and diffusers' enable_tiling (--resolution: SD-VAE sizes; --device, --dtype, --out "
                             "apply); more options: python -m fastdec.bench.tiling -h")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and latents")
    parser.add_argument("--height", type=int, default=None, metavar="PIXELS",
                        help="image height, when not square: --resolution gives the width (e.g. --resolution 832 "
                             "--height 480 for Wan's 480x832 frames; default: square images)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default on CPU: the cores that the load average at the start leaves "
                             "idle, at least 1: more threads than idle cores stall at OpenMP barriers)")


def settings_from(args: argparse.Namespace) -> Settings:
    """Validated settings with the device-dependent defaults filled in (ValueError on bad input)."""
    device = resolve_device(args.device)  # the default, 'not a device' and 'CUDA is not available' errors
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--device {args.device!r}: use cuda or cpu")
    cuda = device.type == "cuda"
    if args.all and args.decoders is not None:
        raise ValueError("--all and --decoders both choose the decoders: give one of them")
    if args.decoders is not None:
        decoders = tuple(name.strip() for name in args.decoders.split(",") if name.strip())
    else:
        decoders = QUICK_DECODERS if args.quick and not args.all else DEFAULT_DECODERS
    unknown = [name for name in decoders if name not in DECODERS]
    if unknown or not decoders:
        raise ValueError(f"--decoders: unknown {unknown or 'empty list'}; choose from {','.join(DECODERS)}")
    if args.quick:
        resolutions, batches = args.resolution or ((512,) if cuda else (64,)), args.batch or (1,)
        repeats, compile_ = args.repeats or (10 if cuda else 3), False
    else:
        resolutions = args.resolution or ((512, 1024) if cuda else (256,))
        batches = args.batch or ((1, 8) if cuda else (1,))
        repeats, compile_ = args.repeats or (20 if cuda else 5), not args.no_compile
    bad = [side for side in resolutions if side % 8]
    if bad:
        raise ValueError(f"--resolution {bad}: image sides must be multiples of 8 (the decoders upsample 8x)")
    for multiple in sorted({ENTRIES[name].side_multiple for name in decoders}):
        strict = [name for name in decoders if ENTRIES[name].side_multiple == multiple]
        if multiple != 8 and any(side % multiple for side in resolutions):
            raise ValueError(f"--resolution {resolutions}: {strict} need image sides that are multiples of "
                             f"{multiple} (or leave them out of --decoders)")
    if args.height is not None:
        multiple = max(ENTRIES[name].side_multiple for name in decoders)
        if args.height < 1 or args.height % multiple:
            raise ValueError(f"--height {args.height}: must be a positive multiple of {multiple} (the latent grid)")
    if repeats < 2:
        raise ValueError(f"--repeats {repeats}: at least 2 rounds (a median of one run is no measurement)")
    # On CPU a first call costs no compilation, and --quick's probe call (memory) precedes the timed rounds anyway.
    warmup = args.warmup if args.warmup is not None else (3 if cuda else (0 if args.quick else 1))
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
        seed=args.seed, quick=args.quick, threads=args.threads, reference_variant=not args.quick, height=args.height,
    )

