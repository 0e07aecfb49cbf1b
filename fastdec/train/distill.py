"""``fastdec distill``: a smaller, faster decoder for any latent space, made from a teacher decoder.

Three stages in one run folder, each a ``fastdec train`` run (so each has its progress lines, metrics, curves and
checkpoints), then the frontier evaluation:

1. ``student/``: the student's first weights: the teacher pruned to its most active channels. A TAESD-family
   teacher is pruned to ``width`` channels, one or one per stage (fastdec.train.prune); an AutoencoderKL-family
   teacher (a diffusers VAE's decoder: SD, SDXL, SD3, FLUX.1, FLUX.2) to the ``width`` block_out_channels, as
   FLUX.2's small decoder is its VAE's at [96, 192, 384, 384] (fastdec.train.prune_kl); any other teacher (DC-AE,
   ViT) gets a TAESD-architecture student of that width with random weights.
2. ``distill/``: the student learns the teacher's outputs (and the photos) on the encoder's latents of the images.
3. ``finetune/``: the student learns the photos alone, at a lower learning rate.
4. ``eval/``: PSNR, SSIM and ms per image of the teacher, the latent preview and the student on held-out images,
   measured in one run, with the frontier plot (quality against time).

Killed at any point, the same command resumes: a finished stage is skipped, an interrupted one continues from its
checkpoint exactly as ``fastdec train --resume`` does. The options are recorded in ``distill.json``; a rerun with
other options is refused (a new run folder starts afresh).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from fastdec.models.autoencoder_kl import AutoencoderKLDecoder
from fastdec.models.base import Decoder
from fastdec.models.taesd import DECODER_BLOCKS, TAESDDecoder
from fastdec.train import checkpoint as ckpt
from fastdec.train.loop import TrainConfig, TrainingInterrupted, train
from fastdec.train.prune import prune_taesd
from fastdec.train.prune_kl import prune_autoencoder_kl

CALIBRATION_IMAGES = 8  # images whose latents rank the teacher's channels for pruning


@dataclass
class DistillConfig:
    """Everything a distillation run needs; the CLI's options map one to one."""

    data: list[str]  # training image folders
    output: str
    teacher: str  # a TAESD-family .pth, a fastdec decoder folder, a diffusers VAE folder or Hub id, or a name
    encoder: str  # the frozen encoder of the latent space (as fastdec train's --encoder)
    width: int | list[int] | None = None  # the student's channels, one or per stage; default: from ``speedup``
    speedup: float | None = None  # target speed-up over a TAESD-family teacher: width = teacher width / sqrt(it)
    distill_steps: int = 1000
    finetune_steps: int = 500
    distill_weight: float = 1.0
    crop: int = 128
    batch: int = 4
    lr: float = 5e-4
    finetune_lr: float = 1e-4
    loss: str = "mse"
    eval_data: str | None = None
    eval_images: int = 24
    cache_dir: str | None = None
    seed: int = 0
    device: str | None = None
    threads: int | None = None
    compile: bool = False
    channels_last: bool = False
    time_limit: float | None = None  # minutes for both stages, shared by their steps; a stage it stops counts done


def student_width(teacher: Decoder, width: int | list[int] | None, speedup: float | None) -> int | list[int]:
    """The student's width (one, or one per stage): given, or the widest multiple of 4 whose convolutions cost at
    most 1/speedup of a TAESD-family teacher's (cost grows with the square of the width)."""
    if width is not None and speedup is not None:
        raise ValueError("give --width or --speedup, not both")
    speedup = 2.0 if speedup is None else speedup
    if not speedup > 1:
        raise ValueError(f"--speedup must be above 1, got {speedup}")
    if isinstance(teacher, AutoencoderKLDecoder):
        return _block_widths(teacher, width, speedup)
    if width is not None:
        widths = [width] if isinstance(width, int) else width
        if not widths or any(w < 4 or w % 4 for w in widths):
            raise ValueError(f"--width must be positive multiples of 4, got {width}")
        return width
    if not isinstance(teacher, TAESDDecoder):
        raise ValueError(
            f"--speedup sizes a pruned TAESD-family teacher; a {type(teacher).__name__} teacher gets a TAESD-"
            "architecture student: pass its --width (e.g. 64)"
        )
    return max(4, int(teacher.config["width"] / math.sqrt(speedup)) // 4 * 4)


def _block_widths(teacher: AutoencoderKLDecoder, width: int | list[int] | None, speedup: float) -> list[int]:
    """An AutoencoderKL teacher's student: its block_out_channels, given, or each of the teacher's divided by
    sqrt(speedup) and rounded down to a multiple of the norm groups (FLUX.2's small decoder is [128, 256, 512,
    512] at 0.75: [96, 192, 384, 384])."""
    full, groups = teacher.config["block_out_channels"], teacher.config["norm_num_groups"]
    if isinstance(width, int):
        raise ValueError(
            f"a {type(teacher).__name__} teacher takes one --width per block (its block_out_channels {full}), "
            f"each a multiple of its {groups} norm groups, e.g. {','.join(str(w * 3 // 4) for w in full)}"
        )
    if width is not None:
        return width
    return [max(groups, int(w / math.sqrt(speedup)) // groups * groups) for w in full]


def parse_width(text: str) -> int | list[int]:
    """``--width``: ``32`` or ``64,64,48,32``."""
    try:
        widths = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a width like 32 or one per stage like 64,64,48,32, got {text!r}") from None
    return widths[0] if len(widths) == 1 else widths


def _calibration_latents(config: DistillConfig, encoder) -> torch.Tensor:
    from fastdec.train.scoring import load_eval_images

    pairs = load_eval_images(config.data[0], CALIBRATION_IMAGES, (config.crop, config.crop), encoder.downscale)
    return torch.cat([encoder.encode(image[None]) for _, image in pairs])


def initial_student(teacher: Decoder, width: int | list[int], calibration: torch.Tensor) -> Decoder:
    """The pruned teacher (TAESD and AutoencoderKL families) or a random TAESD-architecture student with the
    teacher's upsampling."""
    if teacher.latent_ndim != 4:
        raise ValueError(f"fastdec distill makes image decoders; {type(teacher).__name__} decodes video latents")
    if isinstance(teacher, TAESDDecoder):
        return prune_taesd(teacher, width, calibration)
    if isinstance(teacher, AutoencoderKLDecoder):
        return prune_autoencoder_kl(teacher, width, calibration)
    with torch.no_grad():
        probe = torch.zeros(1, teacher.latent_channels, 2, 2)
        factor = teacher.decode(probe.to(next(teacher.parameters()).device)).shape[-1] // 2
    stages = int(math.log2(factor))
    if 2**stages != factor:
        raise ValueError(f"the teacher upsamples {factor}x, not a power of 2: no TAESD-architecture student fits")
    blocks = DECODER_BLOCKS[-stages - 1:] if stages < len(DECODER_BLOCKS) else (3,) * stages + (1,)
    return TAESDDecoder("tae-192", teacher.latent_channels, width=width, blocks=blocks)


def _stage_done(folder: Path, steps: int, time_limited: bool) -> bool:
    """The stage's decoder is written and it ran all its steps, or its share of the time limit."""
    card = folder / "decoder" / "model_card.json"
    return card.is_file() and (time_limited or json.loads(card.read_text())["steps"] >= steps)


def _record_options(config: DistillConfig, output: Path) -> None:
    """distill.json holds the run's options; a rerun must ask for the same ones to resume."""
    options = dataclasses.asdict(config)
    recorded = output / "distill.json"
    if recorded.is_file():
        before = json.loads(recorded.read_text())
        changed = sorted(k for k in options if before.get(k) != options[k] and k not in ("threads", "device"))
        if changed:
            raise ValueError(
                f"{output} is a distillation run with other options ({', '.join(changed)} differ): rerun it with "
                "the same options to resume, or use a new run folder"
            )
    else:
        output.mkdir(parents=True, exist_ok=True)
        recorded.write_text(json.dumps(options, indent=2) + "\n")


def distill(config: DistillConfig) -> dict:
    """Runs (or resumes) the stages; returns the evaluation report (its rows: teacher, preview, student)."""
    import fastdec
    from fastdec.encoders import load_encoder
    from fastdec.evaluation import evaluate

    if not config.eval_data:
        raise ValueError("--eval-data is needed: the student is measured against the teacher on held-out images")
    output = Path(config.output).expanduser()
    if config.threads:
        torch.set_num_threads(config.threads)
    teacher = fastdec.load(config.teacher, device="cpu", dtype=torch.float32).eval()
    width = student_width(teacher, config.width, config.speedup)
    _record_options(config, output)

    start = output / "student"
    if not (start / "config.json").is_file():
        torch.manual_seed(config.seed)
        encoder = load_encoder(config.encoder, torch.device("cpu"))
        initial_student(teacher, width, _calibration_latents(config, encoder)).save_pretrained(start)
    shared = dict(data=config.data, encoder=config.encoder, crop=config.crop, batch=config.batch, loss=config.loss,
                  cache_dir=config.cache_dir, seed=config.seed, device=config.device, threads=config.threads,
                  compile=config.compile, channels_last=config.channels_last, eval_data=config.eval_data)
    total_steps = config.distill_steps + config.finetune_steps
    stages = [
        ("distill", start, dict(steps=config.distill_steps, lr=config.lr, teacher=config.teacher,
                                distill_weight=config.distill_weight)),
        ("finetune", output / "distill" / "decoder", dict(steps=config.finetune_steps, lr=config.finetune_lr)),
    ]
    for name, decoder, options in stages:
        folder = output / name
        if _stage_done(folder, options["steps"], config.time_limit is not None):
            continue
        resume = str(folder) if (folder / ckpt.CHECKPOINT_NAME).is_file() else None
        minutes = None if config.time_limit is None else config.time_limit * options["steps"] / total_steps
        train(TrainConfig(output=str(folder), decoder=str(decoder), resume=resume, ema=0.99, time_limit=minutes,
                          warmup=min(50, options["steps"] // 10), **shared, **options))
    student = output / "finetune" / "decoder"
    return evaluate({f"student (width {width})": str(student)}, config.eval_data, config.encoder,
                    preview_data=config.data, reference=config.teacher, images=config.eval_images,
                    output=output / "eval", cache_dir=config.cache_dir, device=config.device, threads=config.threads)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = DistillConfig(data=[], output="", teacher="", encoder="")
    add = parser.add_argument
    add("data", nargs="+", help="folder(s) of training images (recursive; jpg/png/webp)")
    add("-o", "--output", required=True, help="run folder: student/, distill/, finetune/, eval/ (rerun to resume)")
    add("--teacher", required=True, help="the decoder to slim: a TAESD-family .pth (e.g. taef2_decoder.pth), a "
                                         "fastdec decoder folder, a diffusers VAE folder or Hub id, or a name")
    add("--encoder", required=True, help="the latent space's frozen encoder: a TAESD encoder .pth or a diffusers "
                                         "VAE folder or Hub id")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--width", type=parse_width, help="the student's channels (a multiple of 4), or one per "
                      "stage from low resolution to high (e.g. 64,64,48,32: thin where the time goes); for an "
                      "AutoencoderKL teacher its block_out_channels (e.g. 96,192,384,384 for FLUX.2's VAE)")
    size.add_argument("--speedup", type=float, help="target speed-up over a TAESD- or AutoencoderKL-family "
                                                    "teacher (default 2): sets the width; the evaluation measures "
                                                    "the real one")
    add("--eval-data", required=True, help="held-out images: the frontier evaluation at the end (never trained on)")
    add("--eval-images", type=int, default=defaults.eval_images)
    add("--distill-steps", type=int, default=defaults.distill_steps)
    add("--finetune-steps", type=int, default=defaults.finetune_steps)
    add("--distill-weight", type=float, default=defaults.distill_weight,
        help="weight of the teacher's outputs against the photos' in the distillation stage")
    add("--crop", type=int, default=defaults.crop)
    add("--batch", type=int, default=defaults.batch)
    add("--lr", type=float, default=defaults.lr, help="distillation learning rate")
    add("--finetune-lr", type=float, default=defaults.finetune_lr)
    add("--loss", choices=["l1", "mse"], default=defaults.loss)
    add("--cache-dir", help="latent cache folder: each image is encoded once, across runs")
    add("--seed", type=int, default=defaults.seed)
    add("--device", help="cpu, cuda, ... (default: cuda if available)")
    add("--threads", type=int, help="torch CPU threads")
    add("--compile", action="store_true", help="torch.compile the student")
    add("--channels-last", action="store_true", help="channels_last layout (faster convolutions on GPU)")
    add("--time-limit", type=float, help="minutes for both training stages (shared by their steps); a stage "
                                         "stopped by it is finished as it is")


def run(args: argparse.Namespace) -> int:
    from fastdec.evaluation import score_line

    config = DistillConfig(**{k: v for k, v in vars(args).items() if k in DistillConfig.__dataclass_fields__})
    try:
        report = distill(config)
    except TrainingInterrupted as interrupted:
        print(f"\nfastdec distill: interrupted at step {interrupted.step} of {interrupted.steps} of a stage, "
              "checkpointed; run the same command to resume", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, ImportError) as error:
        print(f"fastdec distill: error: {error}", file=sys.stderr)
        return 2
    for row in report["rows"]:
        print(score_line(row["decoder"], row))
    print(f"student: {Path(config.output) / 'finetune' / 'decoder'}; report: {Path(config.output) / 'eval'}")
    return 0
