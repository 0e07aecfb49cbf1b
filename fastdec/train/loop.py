"""``fastdec.train.train``: distil a frozen encoder's latent space into a fastdec decoder.

One step: a batch of crops drawn from a generator seeded by (seed, step), the student's decode, the loss (L1 or MSE
to the pixels, plus optional distillation to a teacher decoder's output, LPIPS and, after a warm-up, a patch
discriminator), AdamW with warm-up + cosine learning rate and gradient clipping, then the EMA update. Everything a
step depends on is either a function of the step or in the checkpoint (weights, EMA, optimizer and discriminator
state), so N steps + resume + N steps give the weights of 2N steps.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastdec.encoders import FrozenEncoder, load_encoder
from fastdec.machine import device_name
from fastdec.models.base import Decoder
from fastdec.train import checkpoint as ckpt
from fastdec.train.data import Skips, draw_batch, load_samples
from fastdec.train.losses import (
    PatchDiscriminator,
    discriminator_hinge_loss,
    generator_adversarial_loss,
    load_lpips,
    psnr,
)
from fastdec.train.scoring import quick_eval

log = logging.getLogger("fastdec.train")
LOSSES = ("l1", "mse")


@dataclass
class TrainConfig:
    """Everything a run needs; the CLI's options map one to one (``--crop`` -> ``crop``)."""

    data: str | list[str]  # one image folder or several (e.g. BSDS500's train and val)
    output: str
    decoder: str | Decoder = "tae-192"  # a preset name, a save_pretrained folder to fine-tune, or a Decoder
    latent_channels: int | None = None  # for presets; default: the encoder's
    encoder: str | nn.Module | None = None  # a TAESD encoder .pth, a diffusers VAE (instance, folder, Hub id)
    latents: str | None = None  # a folder of precomputed latents instead of an encoder (<image stem>.safetensors)
    downscale: int = 8  # pixels per latent, with precomputed latents
    eval_data: str | None = None
    cache_dir: str | None = None
    crop: int = 128
    batch: int = 4
    flips: bool = True
    steps: int = 1000
    lr: float = 5e-4
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema: float = 0.999
    loss: str = "l1"
    teacher: str | None = None  # a decoder of the same latent space (name or path) to distil
    distill_weight: float = 0.0
    lpips_weight: float = 0.0
    adv_weight: float = 0.0
    adv_start: int = 0
    seed: int = 0
    checkpoint_every: int = 250
    log_every: int = 10
    resume: str | None = None
    stop_at: int | None = None  # stop (checkpointed) after this step, keeping the schedule of ``steps``
    time_limit: float | None = None  # minutes; stop checkpointed when exceeded (the schedule is not shortened)
    device: str | None = None
    threads: int | None = None
    compile: bool = False
    grad_checkpointing: bool = False
    channels_last: bool = False  # NHWC weights and activations: the layout tensor cores want on a GPU
    eval_images: int = 8
    extra: dict = field(default_factory=dict)  # free-form notes recorded in the model card


def build_student(decoder: str | Decoder, latent_channels: int) -> Decoder:
    """A preset name (random init; seeded by the caller), a save_pretrained folder or a Decoder, in fp32."""
    import fastdec
    from fastdec.api import build_preset
    from fastdec.models import registry

    if isinstance(decoder, Decoder):
        student = decoder
    elif isinstance(decoder, str) and decoder.lower() in registry.presets():
        # A preset name is never a path here: the run folder is often named after the preset (-o vit-s).
        student = build_preset(decoder.lower(), latent_channels=latent_channels)
    else:
        student = fastdec.load(decoder)
    if student.latent_channels != latent_channels:
        raise ValueError(
            f"the encoder writes {latent_channels}-channel latents but the student decoder {decoder!r} takes "
            f"{student.latent_channels}: pass --latent-channels {latent_channels} (a preset) or a decoder of this "
            "latent space"
        )
    return student.float()


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def enable_grad_checkpointing(model: nn.Module) -> int:
    """Recomputes each residual/transformer block in the backward pass instead of storing its activations."""
    from torch.utils.checkpoint import checkpoint

    from fastdec.models.dcae import EfficientViTBlock, ResBlock
    from fastdec.models.taesd import Block
    from fastdec.models.vit import TransformerBlock

    count = 0
    for module in model.modules():
        if isinstance(module, (Block, ResBlock, TransformerBlock, EfficientViTBlock)):
            module.forward = functools.partial(checkpoint, module.forward, use_reentrant=False)
            count += 1
    return count


class EMA:
    """Exponential moving average of a model's parameters (buffers copied), with the usual short-run warm-up:
    decay min(ema, (1 + step) / (10 + step))."""

    def __init__(self, model: nn.Module, decay: float):
        import copy

        self.decay, self.model = decay, copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()], 1 - decay)
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_buffer.copy_(buffer)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training at a step boundary, after a checkpoint: ``--resume`` continues exactly."""

    def __init__(self, step: int, steps: int, output: Path):
        self.step, self.steps = step, steps
        super().__init__(f"interrupted at step {step} of {steps}, checkpointed; run the same command with "
                         f"--resume {output} to continue")


@contextlib.contextmanager
def _stop_requests():
    """While training: the first Ctrl-C asks to stop after the current step (a checkpoint at a step boundary keeps
    the resume exact); a second one stops at once. Only the main thread can take signals: elsewhere, no change."""
    requested = [False]
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def ask(signum, frame) -> None:
        if requested[0]:
            raise KeyboardInterrupt
        requested[0] = True
        print("\nCtrl-C: stopping after this step, with a checkpoint (again: stop now, without one)", file=sys.stderr,
              flush=True)

    previous = signal.signal(signal.SIGINT, ask)
    try:
        yield requested
    finally:
        signal.signal(signal.SIGINT, previous)


def train(config: TrainConfig | None = None, **options) -> Path:
    """Trains a student decoder; returns the ``save_pretrained`` folder it ends with (``<output>/decoder``).

    ``train(TrainConfig(...))`` or ``train(data=..., output=..., encoder=..., decoder="tae-192", ...)``.
    """
    config = config or TrainConfig(**options)
    _check_config(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    output = Path(config.output).expanduser()
    output.mkdir(parents=True, exist_ok=True)
    _log_to(output / "train.log")

    encoder, teacher = _latent_space(config, device)
    channels = encoder.latent_channels if encoder else config.latent_channels
    downscale = encoder.downscale if encoder else config.downscale
    if config.crop % downscale:
        raise ValueError(f"--crop {config.crop} is not a multiple of the encoder's downscale {downscale}")
    distill = teacher is not None and config.distill_weight > 0
    flips = config.flips and config.latents is None
    samples, skips = [], Skips()
    for folder in [config.data] if isinstance(config.data, str) else config.data:
        found, skipped = load_samples(
            folder, encoder.encode if encoder else None, downscale, config.crop,
            encoder.description if encoder else f"latents {config.latents}",
            teacher=teacher.decode if distill else None, teacher_id=str(config.teacher) if distill else "",
            cache_dir=config.cache_dir, latents_folder=config.latents, flips=flips,
        )
        samples += found
        skips.unreadable += skipped.unreadable
        skips.too_small += skipped.too_small
    log.info("%d training images (%s)", len(samples), skips.summary())
    if device.type == "cuda":  # uint8 pixels and latents: a few hundred MB for thousands of photos
        samples = [sample.to(device) for sample in samples]

    torch.manual_seed(config.seed)
    layout = torch.channels_last if config.channels_last else torch.contiguous_format
    student = build_student(config.decoder, channels).to(device, memory_format=layout).train()
    student_class, student_config = type(student).__name__, json.loads(json.dumps(student.config))
    ema = EMA(student, config.ema)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.99))
    disc = disc_opt = None
    if config.adv_weight > 0:
        disc = PatchDiscriminator().to(device).train()
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=config.lr, betas=(0.5, 0.99))
    lpips = load_lpips(device=device) if config.lpips_weight > 0 else None

    step, elapsed = 0, 0.0
    if config.resume:
        path = ckpt.checkpoint_path(config.resume)
        state = ckpt.load_checkpoint(path)
        ckpt.check_same_student(state, student_class, student_config, path)
        student.load_state_dict(state["student"])
        ema.model.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        if disc is not None:
            if "discriminator" not in state:
                raise ValueError(f"{path} was trained without the adversarial loss; resume without --adv-weight")
            disc.load_state_dict(state["discriminator"])
            disc_opt.load_state_dict(state["discriminator_optimizer"])
        step, elapsed = int(state["step"]), float(state["elapsed"])
        log.info("resumed from %s at step %d", path, step)
    _truncate_metrics(output / "metrics.jsonl", step)

    forward = torch.compile(student) if config.compile else student
    if config.grad_checkpointing:
        log.info("gradient checkpointing on %d blocks", enable_grad_checkpointing(student))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    last = min(config.steps, config.stop_at or config.steps)
    started, window, window_start = time.perf_counter() - elapsed, [], time.perf_counter()

    def save() -> None:
        state = {
            "step": step, "elapsed": time.perf_counter() - started, "student_class": student_class,
            "student_config": student_config, "student": student.state_dict(), "ema": ema.model.state_dict(),
            "optimizer": optimizer.state_dict(), "config": _jsonable(config),
        }
        if disc is not None:
            state["discriminator"], state["discriminator_optimizer"] = disc.state_dict(), disc_opt.state_dict()
        ckpt.save_checkpoint(output / ckpt.CHECKPOINT_NAME, state)

    with _stop_requests() as stop_requested:
        while step < last:
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            latents, images, targets = draw_batch(samples, config.batch, config.crop, downscale, generator, flips,
                                                  distill)
            latents, images = latents.to(device).contiguous(memory_format=layout), images.to(device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, config)
            with autocast:
                out = forward(student.to_decoder_space(latents))  # as decode() does: identity for scale 1, shift 0
                out = out * 0.5 + 0.5 if student.output_range == "-1,1" else out  # pixels in [0, 1]
            if out.shape != images.shape:
                raise ValueError(
                    f"the student decodes {tuple(latents.shape[-2:])} latents to {tuple(out.shape[-2:])} pixels, the "
                    f"crop is {tuple(images.shape[-2:])}: its upsampling does not match the encoder's downscale "
                    f"{downscale}"
                )
            out = out.float()
            pixel = F.l1_loss if config.loss == "l1" else F.mse_loss
            terms = {"pixel": pixel(out, images)}
            if distill:
                terms["distill"] = config.distill_weight * pixel(out, targets.to(device))
            if lpips is not None:
                terms["lpips"] = config.lpips_weight * lpips(out.clamp(0, 1), images).mean()
            adversarial = disc is not None and step >= config.adv_start
            if adversarial:
                terms["adv"] = config.adv_weight * generator_adversarial_loss(disc(out))
            loss = sum(terms.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip)
            optimizer.step()
            if adversarial:
                disc_opt.zero_grad(set_to_none=True)
                discriminator_hinge_loss(disc(images), disc(out.detach())).backward()
                disc_opt.step()
            ema.update(student, step)
            step += 1
            window.append({"loss": loss.item(), "psnr": psnr(out.detach(), images).mean().item(),
                           "grad_norm": grad_norm.item(), **{k: v.item() for k, v in terms.items()}})
            if not math.isfinite(window[-1]["loss"]):
                raise FloatingPointError(f"the loss became {window[-1]['loss']} at step {step}: lower --lr")
            if step % config.log_every == 0 or step == last:
                now = time.perf_counter()
                rate = len(window) / max(now - window_start, 1e-9)
                record = {"step": step, "lr": lr_at(step - 1, config), "it_s": rate, "elapsed": now - started,
                          **{k: sum(r[k] for r in window) / len(window) for k in window[0]}}
                with open(output / "metrics.jsonl", "a") as handle:
                    handle.write(json.dumps(record) + "\n")
                print(f"step {step}/{config.steps} loss {record['loss']:.4f} psnr {record['psnr']:.2f} dB "
                      f"{rate:.2f} it/s ETA {(last - step) / rate / 60:.1f} min", file=sys.stderr, flush=True)
                window, window_start = [], now
            limit_hit = config.time_limit is not None and time.perf_counter() - started > config.time_limit * 60
            if step % config.checkpoint_every == 0 or step == last or limit_hit or stop_requested[0]:
                save()
            if stop_requested[0]:
                raise TrainingInterrupted(step, config.steps, output)
            if limit_hit:
                log.info("time limit of %.1f min reached at step %d: checkpointed; --resume continues",
                         config.time_limit, step)
                break
    if step < config.steps:
        log.info("stopped at step %d of %d; resume with --resume %s", step, config.steps, output)
    return _finish(config, output, ema.model, student_class, encoder, skips, len(samples), step,
                   time.perf_counter() - started, device)


def _check_config(config: TrainConfig) -> None:
    if (config.encoder is None) == (config.latents is None):
        raise ValueError("give exactly one latent space: --encoder (a frozen encoder) or --latents (a folder)")
    if config.latents is not None and config.latent_channels is None:
        raise ValueError("--latents needs --latent-channels (the channel count of the precomputed latents)")
    if config.loss not in LOSSES:
        raise ValueError(f"--loss must be one of {LOSSES}, got {config.loss!r}")
    if config.distill_weight > 0 and config.teacher is None:
        raise ValueError("--distill-weight needs --teacher (a decoder of the same latent space)")
    positive = {"crop": config.crop, "batch": config.batch, "steps": config.steps,
                "checkpoint_every": config.checkpoint_every, "log_every": config.log_every}
    bad = {k: v for k, v in positive.items() if not isinstance(v, int) or v < 1}
    if bad:
        raise ValueError(f"these options must be positive integers: {bad}")
    if not 0 <= config.ema < 1:
        raise ValueError(f"--ema must be in [0, 1), got {config.ema}")


def _latent_space(config: TrainConfig, device: torch.device) -> tuple[FrozenEncoder | None, Decoder | None]:
    encoder = load_encoder(config.encoder, device) if config.encoder is not None else None
    teacher = None
    if config.teacher is not None:
        import fastdec

        teacher = fastdec.load(config.teacher, device=device, dtype=torch.float32).eval().requires_grad_(False)
        channels = encoder.latent_channels if encoder else config.latent_channels
        if teacher.latent_channels != channels:
            raise ValueError(f"the teacher decodes {teacher.latent_channels}-channel latents, the encoder writes "
                             f"{channels}: pick a teacher of this latent space")
    if encoder is not None and config.latent_channels not in (None, encoder.latent_channels):
        raise ValueError(
            f"--latent-channels {config.latent_channels} does not match the encoder ({encoder.description}), which "
            f"writes {encoder.latent_channels}-channel latents"
        )
    return encoder, teacher


def _finish(config: TrainConfig, output: Path, model: Decoder, student_class: str, encoder, skips, images: int,
            step: int, wall: float, device: torch.device) -> Path:
    """EMA weights -> <output>/decoder (save_pretrained + model_card.json), the curves PNG, a final eval."""
    model = model.float().eval()
    if hasattr(model, "fuse_for_inference"):
        model.fuse_for_inference()  # BatchNorm folded into the convs: exact, and the saved file is smaller
    folder = output / "decoder"
    model.save_pretrained(folder)
    final_eval = None
    if config.eval_data:
        final_eval = quick_eval(model, config.eval_data, encoder, config.eval_images, device)
        log.info("final eval on %s: %s", config.eval_data, final_eval)
    card = {
        "decoder": student_class, "config": model.config,
        "latent_space": {
            "encoder": encoder.description if encoder else f"precomputed latents in {config.latents}",
            "latent_channels": model.latent_channels, "scaling_factor": model.scaling_factor,
            "shift_factor": model.shift_factor,
            "convention": "decodes the encoder's output (diffusion latents) as is" if (
                model.scaling_factor, model.shift_factor) == (1.0, 0.0) else
            "decodes the encoder's output (diffusion latents), mapped to its own space as its teacher does",
        },
        "data": {"folders": config.data if isinstance(config.data, list) else [config.data], "images": images,
                 "skipped": skips.summary(), "crop": config.crop, "batch": config.batch,
                 "flips": config.flips and config.latents is None},
        "training": {k: v for k, v in _jsonable(config).items() if k not in ("data", "output", "encoder", "extra")},
        "notes": config.extra,
        "steps": step, "steps_planned": config.steps, "wall_time_s": round(wall, 1),
        "device": device_name(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "final_eval": final_eval,
    }
    (folder / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    _plot_curves(output / "metrics.jsonl", output / "curves.png")
    log.info("saved %s (%d steps, %.1f min)", folder, step, wall / 60)
    return folder


def _jsonable(config: TrainConfig) -> dict:
    return {k: (v if isinstance(v, (str, int, float, bool, type(None), dict, list)) else repr(v))
            for k, v in asdict(config).items()}


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint (steps a killed run logged after its last checkpoint)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _plot_curves(metrics: Path, png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no %s (pip install matplotlib)", png.name)
        return
    if not metrics.is_file():
        return
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not records:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [r["step"] for r in records]
    left.plot(steps, [r["loss"] for r in records])
    left.set(xlabel="step", ylabel="loss", yscale="log", title="training loss")
    right.plot(steps, [r["psnr"] for r in records])
    right.set(xlabel="step", ylabel="PSNR (dB)", title="training-crop PSNR")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _log_to(path: Path) -> None:
    if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve() for h in log.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
    if not any(type(h) is logging.StreamHandler for h in log.handlers):
        log.addHandler(logging.StreamHandler(sys.stderr))
    log.setLevel(logging.INFO)
