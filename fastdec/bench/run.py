"""Running ``fastdec bench``: every decoder, size and batch into one result dict; the command-line entry points."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch

from fastdec.api import RandomWeightsWarning
from fastdec.bench.cases import bench_decoder
from fastdec.bench.compare import compare, read_result
from fastdec.bench.contenders import build_contender
from fastdec.bench.environment import auto_threads, busy_cores, environment, load_average, machine_load
from fastdec.bench.goals import evaluate_goals
from fastdec.bench.pipeline import pipeline_share
from fastdec.bench.render import print_rich, render_markdown, write_outputs
from fastdec.bench.settings import Settings, add_arguments, dtype_name, settings_from

DESCRIPTION = ("``fastdec bench``: every decoder family, timed on this device against the same architecture in "
               "diffusers.")


class Progress:
    """A rich progress bar on a terminal (stderr), one plain line per step otherwise; both with the time elapsed and
    an ETA (the mean time of the steps done so far, times the steps left)."""

    def __init__(self, total: int):
        self.total, self.done, self.bar, self.started = total, 0, None, time.perf_counter()
        if sys.stderr.isatty():
            with contextlib.suppress(ImportError):
                from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

                self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                                    "{task.total}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                    transient=True)
                self.task = self.bar.add_task("fastdec bench", total=total)
                self.bar.start()

    def eta_text(self) -> str:
        elapsed = time.perf_counter() - self.started
        if not self.done:
            return f"{elapsed:.0f} s elapsed, ETA after the first step"
        return f"{elapsed:.0f} s elapsed, ETA {elapsed / self.done * (self.total - self.done):.0f} s"

    def step(self, description: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=description)
        else:
            print(f"[{self.done + 1}/{self.total}] {description} ({self.eta_text()})", file=sys.stderr, flush=True)

    def report(self, rows: list[dict]) -> None:
        """One plain line per measured row (no terminal): a run stopped by a time limit still leaves its numbers."""
        if self.bar is not None:
            return
        for row in rows:
            if row["median_ms"] is None:
                print(f"    {row['variant']}: {row['status']} ({row['reason']})", file=sys.stderr, flush=True)
                continue
            peak, ratio, psnr = row["peak_memory_bytes"], row["ratio_vs_diffusers"], row["psnr_db"]
            print(f"    {row['variant']}: {row['median_ms']:.2f} ms"
                  + (f", {ratio:.3f}x diffusers' time" if ratio else "")
                  + (f", peak {peak / 2**20:.0f} MiB" if peak is not None else "")
                  + (f", PSNR {psnr:.1f} dB" if psnr is not None else ""), file=sys.stderr, flush=True)

    def advance(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.advance(self.task)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def run_benchmark(settings: Settings, command: str) -> dict:
    """Builds every decoder, measures every variant at every size and batch, evaluates the goals: the JSON dict."""
    started, load_start = time.perf_counter(), load_average()
    configs = [(side, batch) for side in settings.resolutions for batch in settings.batches]
    progress = Progress(len(settings.decoders) * len(configs) + (len(configs) if settings.pipeline_share else 0))
    rows: list[dict] = []
    threads = torch.get_num_threads()
    busy = busy_cores() if settings.device.type == "cpu" else None
    run_threads = settings.threads or (auto_threads(busy, threads) if settings.device.type == "cpu" else threads)
    torch.set_num_threads(run_threads)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomWeightsWarning)
            for name in settings.decoders:
                progress.step(f"building {name}")
                contender = build_contender(name, settings.weights.get(name), settings.seed)
                for side, batch in configs:
                    progress.step(f"{name} {side}px batch {batch}")
                    measured = bench_decoder(contender, side, batch, settings)
                    progress.report(measured)
                    rows += measured
                    progress.advance()
                del contender
            shares = []
            if settings.pipeline_share:
                for side, batch in configs:
                    progress.step(f"UNet step {side}px batch {batch}")
                    shares.append(pipeline_share(rows, settings, side, batch))
                    progress.advance()
        env = environment(settings.device)
        load = machine_load(load_start, load_average(), run_threads, busy)
        if settings.threads is None and settings.device.type == "cpu":
            load["threads_chosen"] = f"auto: {run_threads} of {threads}"
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
        "goals": evaluate_goals(rows, settings.device.type, dtype_name(settings.dtype), busy=bool(load["busy"])),
        "pipeline_share": shares if settings.pipeline_share else None,
        "wall_s": time.perf_counter() - started,
        "load_average": load,
    }


def typed_command(argv: list[str] | None) -> str:
    """The command as a user types it (``fastdec bench ARGS``), never the executable's path on this machine."""
    if argv is None:
        typed = sys.argv[1:]
        argv = typed[typed.index("bench") + 1:] if "bench" in typed else typed
    return shlex.join(["fastdec", "bench", *argv])


def default_out_dir(result: dict) -> Path:
    """Where ``--quick`` writes without ``--out``: fastdec-bench/<date>-<time>-<device>-quick in the current folder."""
    stamp = result["date"][:19].replace(":", "").replace("T", "-")
    return Path("fastdec-bench") / f"{stamp}-{result['device']['type']}-quick"


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Runs ``fastdec bench`` from parsed arguments (for a subcommand parser built with add_arguments)."""
    command = typed_command(argv)
    if getattr(args, "batch_throughput", False):
        from fastdec.bench.batch_throughput import run_from_bench_args

        return run_from_bench_args(args)
    if getattr(args, "tiling", False):
        from fastdec.bench.tiling import run_from_bench_args as run_tiling

        return run_tiling(args)
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
    out = Path(args.out) if args.out else (default_out_dir(result) if args.quick else None)
    if out is not None:
        paths = write_outputs(result, out)
        for path in paths:
            print(f"wrote {path}")
        print(f"results in {out}/ (the plot: {paths[1]})" + ("" if args.out else "; choose the folder with --out"))
    if old is not None:
        print()
        print(compare(old, result))
    return 1 if any(row["status"] == "error" for row in result["rows"]) else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m fastdec.bench [options]``; returns the exit status (2: bad arguments, 1: a variant failed)."""
    parser = argparse.ArgumentParser(prog="fastdec bench", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else list(argv)
    return run(parser.parse_args(argv), argv)

