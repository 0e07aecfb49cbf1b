"""The one script a lent GPU runs: check every fastdec op on CUDA at real sizes, time it against its peers, and write
bench/results/<date>-<gpu>.json and .md.

    pip install --no-build-isolation --no-deps -e . && python bench/gpu_check.py [--out DIR] [--skip-decoders]

Correctness: fresh random inputs (never zeros), the CUDA caching allocator poisoned with NaN before each op so that
an unwritten output element shows up as NaN, relative error ||out - ref|| / ||ref|| against an fp32 (or bitwise)
reference. Timing: CUDA events around each call, inputs rotated over several sets so that small shapes are not
timed out of L2, warm-up first, median and interquartile range of many calls. Peers: eager PyTorch,
torch.compile of the eager reference, and for attention every SDPA backend that accepts the shape. The device copy
bandwidth is measured in the same run as the ceiling for the memory-bound ops. Meant to finish in <= 6 minutes on an
H100; ``--smoke`` runs tiny shapes on any device (used by the test suite to keep this script working).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import fastdec
from fastdec import ops
from fastdec.bench.environment import nvidia_driver
from fastdec.kernels.support.cases import compiled_peer
from fastdec.kernels.support.triton_import import TRITON_IMPORT_ERROR, triton

ROOT = Path(__file__).resolve().parents[1]
CHECKED_OPS = tuple(name for name, module in ops.OP_MODULES.items() if hasattr(module, "gpu_cases"))
LOW_PRECISION_REL = 1e-2  # bf16/fp16 operands, fp32 accumulation (METHOD: between 1e-3 and 1e-2)


def poison_allocator(device: torch.device) -> None:
    """Fill the caching allocator's free blocks with 0xFF bytes (NaN in fp16, bf16 and fp32), so a kernel output
    allocated next that is not fully written contains NaN."""
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info()
    chunk = torch.empty(min(free // 2, 8 << 30), dtype=torch.uint8, device=device).fill_(0xFF)
    del chunk


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def time_calls(fn: Callable[[object], object], inputs: list, device: torch.device, min_seconds: float) -> dict:
    """Median and IQR in microseconds of fn(inputs[i % len(inputs)]) over many calls."""
    for args in inputs:  # warm-up: compilation, autotuning, allocator growth
        fn(args)
    samples: list[float] = []
    deadline = time.perf_counter() + min_seconds
    while len(samples) < 10 or (time.perf_counter() < deadline and len(samples) < 2000):
        args = inputs[len(samples) % len(inputs)]
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(args)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            fn(args)
            samples.append((time.perf_counter() - t0) * 1e6)
    q1, median, q3 = statistics.quantiles(samples, n=4)
    return {"median_us": median, "iqr_us": q3 - q1, "calls": len(samples)}


def input_sets(make: Callable[[], tuple], nbytes: int, device: torch.device) -> list[tuple]:
    """Enough distinct input sets that rotating over them exceeds the L2 cache (2x of 60 MB)."""
    count = 1 if device.type != "cuda" else max(2, min(8, -(-120_000_000 // max(nbytes, 1))))
    return [make() for _ in range(count)]


class Check:
    def __init__(self, device: torch.device, smoke: bool, seconds: float):
        self.device, self.smoke, self.seconds = device, smoke, seconds
        self.with_peers = True  # False: check and time fastdec only (the second dtype of each op)
        self.rows: list[dict] = []

    def run(self, op: str, shape: str, dtype: torch.dtype, make, fused, reference, peers: dict, nbytes=None,
            flops=None, bitwise=False) -> None:
        """Check fused against reference on fresh inputs, then time fused and every peer that runs."""
        args = make()
        poison_allocator(self.device)
        out = fused(args)
        ref = reference(args)
        if bitwise:
            error = 0.0 if torch.equal(out.view(torch.int16) if out.element_size() == 2 else out, ref.view(
                torch.int16) if ref.element_size() == 2 else ref) else float("inf")
        else:
            error = relative_error(out, ref)
        limit = 0.0 if bitwise else (1e-5 if dtype == torch.float32 else LOW_PRECISION_REL)
        row = {"op": op, "shape": shape, "dtype": str(dtype).removeprefix("torch."), "rel_error": error,
               "error_limit": limit, "correct": error <= limit, "timings": {}}
        inputs = input_sets(make, nbytes or 0, self.device)
        for name, fn in {"fastdec": fused, **(peers if self.with_peers else {})}.items():
            try:
                timing = time_calls(fn, inputs, self.device, self.seconds)
            except Exception as refusal:  # a peer that refuses the shape (e.g. flash attention at d=512)
                reason = str(refusal).splitlines()[0][:160] if str(refusal) else ""
                row["timings"][name] = {"error": f"{type(refusal).__name__}: {reason}"}
                continue
            seconds = timing["median_us"] * 1e-6
            if nbytes:
                timing["GB/s"] = nbytes / seconds / 1e9
            if flops:
                timing["TFLOP/s"] = flops / seconds / 1e12
            row["timings"][name] = timing
        fastest_peer = min((t["median_us"] for n, t in row["timings"].items() if n != "fastdec" and "median_us" in t),
                           default=None)
        if fastest_peer and "median_us" in row["timings"]["fastdec"]:
            row["speedup_vs_best_peer"] = fastest_peer / row["timings"]["fastdec"]["median_us"]
        self.rows.append(row)
        fd = row["timings"]["fastdec"]
        print(f"{'ok  ' if row['correct'] else 'FAIL'} {op:15s} {shape:22s} {row['dtype']:9s} err {error:.2e}  "
              f"fastdec {fd.get('median_us', float('nan')):9.1f} us  "
              f"x{row.get('speedup_vs_best_peer', float('nan')):.2f} vs best peer", flush=True)


def _fp32(args: tuple) -> tuple:
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def check_op(c: Check, name: str, dtype: torch.dtype) -> None:
    """Every gpu case the op file declares (kernels/<name>.py): fastdec against its peers and the compiled
    reference."""
    module = ops.OP_MODULES[name]
    fused, reference = getattr(ops, name), getattr(module, f"{name}_reference")
    compiled_reference = compiled_peer(reference, c.smoke)
    for case in module.gpu_cases(c.device, dtype, c.smoke):
        peers = {"torch.compile": compiled_reference, **case.peers}
        c.run(name, case.label, dtype, case.make, lambda a: fused(*a),
              (lambda a: reference(*a)) if case.bitwise else (lambda a: reference(*_fp32(a))),
              {peer: (lambda a, fn=fn: fn(*a)) for peer, fn in peers.items()},
              nbytes=case.nbytes, flops=case.flops, bitwise=case.bitwise)


def copy_bandwidth(device: torch.device, smoke: bool) -> float | None:
    """Device-to-device copy, bytes read + written per second: the ceiling for the memory-bound ops."""
    if device.type != "cuda" or smoke:
        return None
    src = torch.randn(1 << 30, device=device, dtype=torch.float16)
    dst = torch.empty_like(src)
    timing = time_calls(lambda _: dst.copy_(src), [None], device, 1.0)
    return 2 * src.numel() * src.element_size() / (timing["median_us"] * 1e-6) / 1e9


def environment(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": triton.__version__ if TRITON_IMPORT_ERROR is None else TRITON_IMPORT_ERROR,
        "fastdec": fastdec.__version__, "python": platform.python_version(), "backends": ops.backends(),
        "command": " ".join(sys.argv),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"sm_count": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
                 "driver": nvidia_driver()}
    return info


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# fastdec gpu_check — {env['device']}, {env['date']}", "",
             f"torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, fastdec {env['fastdec']}, "
             f"driver {env.get('driver')}; device copy {report['copy_GBps'] or 'n/a'} GB/s (read + write)", "",
             "| op | shape | dtype | rel. error | fastdec | best peer | speed-up | GB/s or TFLOP/s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        fd = row["timings"]["fastdec"]
        peers = {n: t for n, t in row["timings"].items() if n != "fastdec" and "median_us" in t}
        best = min(peers, key=lambda n: peers[n]["median_us"]) if peers else None
        rate = fd.get("GB/s") or fd.get("TFLOP/s")
        unit = "GB/s" if "GB/s" in fd else "TFLOP/s"
        lines.append(
            f"| {row['op']} | {row['shape']} | {row['dtype']} | {row['rel_error']:.1e}"
            f"{'' if row['correct'] else ' FAIL'} | {fd.get('median_us', float('nan')):.1f} us | "
            + (f"{best} {peers[best]['median_us']:.1f} us" if best else "none ran")
            + (f" | {row['speedup_vs_best_peer']:.2f}x | " if "speedup_vs_best_peer" in row else " | – | ")
            + (f"{rate:.0f} {unit}" if rate else "") + " |")
    if report.get("skipped"):
        lines += ["", f"Not run (--budget spent): {', '.join(report['skipped'])}"]
    if report.get("errors"):
        lines += ["", "Errors: " + "; ".join(report["errors"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where the .json/.md go")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on any device (tests this script)")
    parser.add_argument("--seconds", type=float, default=0.3, help="timing budget per variant")
    parser.add_argument("--ops", default=",".join(CHECKED_OPS), help="comma list (default: %(default)s)")
    parser.add_argument("--skip-decoders", action="store_true", help="skip the end-to-end `fastdec bench` run")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="start no (op, dtype) pass after this many seconds; the report says what was skipped")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        parser.error("no CUDA device: gpu_check needs a GPU (use --smoke to exercise it on CPU)")
    if device.type == "cuda" and (ops.EXTENSION is None or not ops.EXTENSION.built_with_cuda()):
        print(f"WARNING: fastdec._C has no CUDA kernels here: {ops.backends()['pixel_shuffle']}", flush=True)
    torch.manual_seed(0)
    started = time.perf_counter()
    check = Check(device, args.smoke, args.seconds)
    skipped: list[str] = []  # (op, dtype) passes not started: --budget spent
    errors: list[str] = []  # passes that raised
    # Each op against its peers in the dtype its goal is stated in; then fastdec alone in the other half precision
    # and in fp32 (correctness at every size, no peers: their torch.compile runs would double the script's time).
    # fp32 runs with TF32 off, so attention's exact path is what is checked against the 1e-5 limit.
    torch.backends.cuda.matmul.allow_tf32 = False
    for name in args.ops.split(","):
        goal_dtype = ops.OP_MODULES[name].GPU_DTYPE
        other = torch.float16 if goal_dtype == torch.bfloat16 else torch.bfloat16
        plan = [(goal_dtype, True), (other, False)] + ([(torch.float32, False)] if goal_dtype != torch.float32 else [])
        for dtype, with_peers in ([(torch.float32, True)] if args.smoke else plan):
            label = f"{name} {str(dtype).removeprefix('torch.')}"
            if args.budget is not None and time.perf_counter() - started > args.budget:
                skipped.append(label)
                continue
            check.with_peers = with_peers
            try:
                check_op(check, name, dtype)
            except Exception as error:  # the other ops' results must still be written
                first_line = str(error).splitlines()[0][:300] if str(error) else ""
                errors.append(f"{label}: {type(error).__name__}: {first_line}")
                print(f"ERROR {errors[-1]}", flush=True)
        print(f"-- {name} done at {time.perf_counter() - started:.0f} s", flush=True)
    report = {"environment": environment(device), "copy_GBps": copy_bandwidth(device, args.smoke),
              "rows": check.rows, "skipped": skipped, "errors": errors, "seconds": None}
    if not args.skip_decoders and not args.smoke:
        try:
            from fastdec import bench as decoder_bench

            decoder_bench.main(["--out", str(args.out / "decoders"), "--no-compile", "--resolution", "512,1024",
                                "--batch", "1"])
            report["decoders"] = str(args.out / "decoders")
        except Exception as error:  # the kernel results above must still be written
            report["decoders_error"] = f"{type(error).__name__}: {error}"
    report["seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    slug = report["environment"]["device"].replace(" ", "-").replace("/", "-")
    stem = args.out / f"{datetime.date.today().isoformat()}-{slug}{'-smoke' if args.smoke else ''}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print("\n" + markdown(report))
    print(f"wrote {stem}.json and .md in {report['seconds']} s")
    return 0 if all(row["correct"] for row in check.rows) and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
