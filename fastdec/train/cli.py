"""``fastdec train``: the command line of fastdec.train.train."""

from __future__ import annotations

import argparse
import sys

from fastdec.train.loop import TrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig(data="", output="")
    add = parser.add_argument
    add("data", nargs="+", help="folder(s) of training images (recursive; jpg/png/webp)")
    add("-o", "--output", required=True, help="run folder: checkpoint.pt, metrics.jsonl, curves.png, decoder/")
    add("--decoder", default=defaults.decoder,
        help="student: a preset (tae-192, efficientvit, efficientvit-attn, vit-s, vit-b) or a save_pretrained folder "
             "to fine-tune (default: %(default)s)")
    add("--latent-channels", type=int, help="latent channels of a preset student (default: the encoder's)")
    space = parser.add_mutually_exclusive_group(required=True)
    space.add_argument("--encoder", help="frozen encoder: a TAESD encoder .pth (e.g. taef2_encoder.pth) or a diffusers "
                                         "VAE folder or Hub id")
    space.add_argument("--latents", help="folder of precomputed latents, <image stem>.safetensors per image")
    add("--downscale", type=int, default=defaults.downscale, help="pixels per latent with --latents (default: 8)")
    add("--eval-data", help="held-out image folder for the final evaluation")
    add("--eval-images", type=int, default=defaults.eval_images, help="held-out images to evaluate (default: 8)")
    add("--cache-dir", help="latent cache folder: each image is encoded once, across runs")
    add("--crop", type=int, default=defaults.crop, help="crop size in pixels, a multiple of the downscale")
    add("--batch", type=int, default=defaults.batch)
    add("--no-flips", dest="flips", action="store_false", help="no horizontal flips (halves the encoding work)")
    add("--steps", type=int, default=defaults.steps)
    add("--lr", type=float, default=defaults.lr)
    add("--warmup", type=int, default=defaults.warmup, help="linear warm-up steps before the cosine decay")
    add("--weight-decay", type=float, default=defaults.weight_decay)
    add("--grad-clip", type=float, default=defaults.grad_clip)
    add("--ema", type=float, default=defaults.ema, help="EMA decay of the saved weights (default: %(default)s)")
    add("--loss", choices=["l1", "mse"], default=defaults.loss)
    add("--teacher", help="decoder of the same latent space to distil (name or path), e.g. a taef2_decoder.pth")
    add("--distill-weight", type=float, default=defaults.distill_weight)
    add("--lpips-weight", type=float, default=defaults.lpips_weight,
        help="LPIPS loss weight (needs the lpips package and its backbone weights on this machine)")
    add("--adv-weight", type=float, default=defaults.adv_weight, help="patch-discriminator loss weight")
    add("--adv-start", type=int, default=defaults.adv_start, help="step at which the adversarial loss starts")
    add("--seed", type=int, default=defaults.seed)
    add("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    add("--log-every", type=int, default=defaults.log_every)
    add("--resume", help="continue from a run folder or its checkpoint.pt (same options)")
    add("--stop-at", type=int, help="stop, checkpointed, after this step (the schedule still spans --steps)")
    add("--time-limit", type=float, help="minutes; stop, checkpointed, when exceeded")
    add("--device", help="cpu, cuda, ... (default: cuda if available)")
    add("--threads", type=int, help="torch CPU threads")
    add("--compile", action="store_true", help="torch.compile the student")
    add("--channels-last", action="store_true", help="channels_last layout (faster convolutions on GPU)")
    add("--grad-checkpointing", action="store_true", help="recompute blocks in the backward pass (less memory)")


def run(args: argparse.Namespace) -> int:
    from fastdec.train.loop import TrainingInterrupted, train

    options = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    try:
        folder = train(TrainConfig(**options))
    except TrainingInterrupted as interrupted:
        print(f"fastdec train: {interrupted}", file=sys.stderr)
        return 130  # the shell's status for a SIGINT
    except (ValueError, FileNotFoundError, TypeError, OSError, FloatingPointError) as error:
        print(f"fastdec train: error: {error}", file=sys.stderr)
        return 2
    print(folder)
    return 0
