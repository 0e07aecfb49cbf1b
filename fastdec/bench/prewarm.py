"""Fill torch.compile's caches on disk for the compiles a later ``fastdec bench`` with the same options makes.

    python -m fastdec.bench.prewarm [fastdec bench options]

It builds every case as the bench does (``cases.Case``) and calls only its torch.compile variants once: dynamo
traces them and Inductor compiles them, which fills Inductor's FX graph and autotuning caches and Triton's kernel
cache. A bench run afterwards traces again but takes the compiled code from those caches: diffusers' VAE decoder
compiled in 32-38 s per size on an H200 (bench/results/2026-12-04-gpu-run-h200-call5-7), and in 25 s cold against
2 s warm on this project's CPU for a small AutoencoderKL. Nothing is timed or written here.

bench/gpu_run.sh runs it in the background while it builds fastdec and runs the kernel tests, which leave most of the
GPU machine's cores idle, for the end-to-end benches that follow.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

from fastdec.api import RandomWeightsWarning
from fastdec.bench.cases import Case
from fastdec.bench.contenders import build_contender
from fastdec.bench.settings import Settings, add_arguments, settings_from


def prewarm(settings: Settings) -> list[str]:
    """Calls every compiled variant of every case in ``settings`` once; returns what it compiled, one line each."""
    if not settings.compile:
        raise ValueError("nothing to prewarm: these options compile nothing (--no-compile or --quick)")
    done = []
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        for name in settings.decoders:
            contender = build_contender(name, settings.weights.get(name), settings.seed)
            for side in settings.resolutions:
                for batch in settings.batches:
                    case = Case(contender, side, batch, settings)
                    for variant in case.variants:
                        if variant.name.endswith("-compile") and variant.fn is not None:
                            start = time.perf_counter()
                            variant.fn()
                            done.append(f"{name} {side}px batch {batch} {variant.name}: "
                                        f"{time.perf_counter() - start:.1f} s")
                            print(done[-1], file=sys.stderr, flush=True)
                    del case
    return done


# fastdec bench options that choose another run or an output: nothing here compiles or writes for them
NOT_PREWARMED = ("tiling", "batch_throughput", "pipeline_share", "compare", "out")


def main(argv: list[str] | None = None) -> int:
    """``python -m fastdec.bench.prewarm [fastdec bench options]``; 2 on bad arguments."""
    parser = argparse.ArgumentParser(prog="python -m fastdec.bench.prewarm", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        given = [f"--{name.replace('_', '-')}" for name in NOT_PREWARMED if getattr(args, name)]
        if given:
            raise ValueError(f"{', '.join(given)}: not a compile this prewarms (it prewarms the timed decodes of "
                             "fastdec bench); leave it out")
        prewarm(settings_from(args))
    except ValueError as error:
        print(f"fastdec.bench.prewarm: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
