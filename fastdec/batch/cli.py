"""``fastdec batch INPUT OUTPUT --decoder NAME|PATH``: arguments and the command (registered in fastdec/cli.py)."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from fastdec.batch.work import FORMATS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="a folder of latent files (.safetensors, .pt, .npy, .npz; each one latent "
                                      "(C, h, w) or a batch) or Parquet (a .parquet file or a folder of them)")
    parser.add_argument("output", help="folder for the images, manifest.jsonl and failures.jsonl; rerun to resume")
    parser.add_argument("--decoder", required=True, help="a name (taesd, sdxl, ...) or a path fastdec.load reads")
    parser.add_argument("--engine", choices=["local", "ray"], default="local",
                        help="local: threads on this machine (default); ray: Ray Data on a cluster or a local Ray")
    parser.add_argument("--format", choices=sorted(FORMATS), default="png", help="image format (default: png)")
    parser.add_argument("--quality", type=int, help="webp/jpeg quality, 1-100 (default: PIL's)")
    parser.add_argument("--fps", type=float, default=16.0,
                        help="frame rate of the mp4 written for each video latent (default 16)")
    parser.add_argument("--batch-size", type=int,
                        help="most latents of one shape decoded together (default: 16, or the resumed job's); a "
                             "file holding up to this many decodes as one batch, as `fastdec decode` does")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                        help="decoder dtype (default: bfloat16 on CUDA, else float32)")
    local = parser.add_argument_group("local engine")
    local.add_argument("--device", help="cpu, cuda, cuda:1 (default: every GPU, one decoder each; else cpu)")
    local.add_argument("--workers", type=int, default=2, help="image encode+write threads (default: 2)")
    ray = parser.add_argument_group("ray engine (pip install 'fastdec[ray]')")
    ray.add_argument("--address", help="the Ray cluster to join (e.g. auto, ray://host:10001); default: a local Ray")
    ray.add_argument("--actors", type=int, help="decoder actors (default: one per GPU, else one per CPU but one)")
    ray.add_argument("--actor-cpus", type=float, help="CPUs per actor (default: 1)")
    ray.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    # For the resume tests only: a worker exits after this many items, once. Not a user option: hidden from --help.
    parser.add_argument("--fail-after", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--report", help="also write the report as JSON to this file")


def run(args: argparse.Namespace) -> int:
    from fastdec.batch import JobInterrupted, decode_dataset

    try:
        report = decode_dataset(
            args.input, args.output, args.decoder, engine=args.engine, image_format=args.format,
            quality=args.quality, fps=args.fps, batch_size=args.batch_size, device=args.device,
            dtype=getattr(torch, args.dtype) if args.dtype else None, workers=args.workers, address=args.address,
            actors=args.actors, actor_cpus=args.actor_cpus, ray_num_cpus=args.num_cpus, fail_after=args.fail_after,
            progress=not args.quiet,
        )
    except JobInterrupted as interrupted:
        print(f"\nfastdec batch: {interrupted}", file=sys.stderr)
        return 130  # the shell's status for a SIGINT
    except (ImportError, ValueError, TypeError, OSError) as error:
        ray_missing = isinstance(error, ImportError) and args.engine == "ray"
        hint = " (the Ray engine needs: pip install 'fastdec[ray]')" if ray_missing else ""
        print(f"fastdec batch: error: {error}{hint}", file=sys.stderr)
        return 2
    print(report.summary())
    if args.report:
        with open(args.report, "w") as handle:
            json.dump(report.to_json(), handle, indent=2)
    return 1 if report.failed else 0
