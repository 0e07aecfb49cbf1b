"""The pytest-benchmark regression workflow of bench/ works end to end: --benchmark-autosave saves a run, and
--benchmark-compare --benchmark-compare-fail=mean:10% passes against a slower baseline and fails against a faster
one. The baselines are the saved run with its times scaled, so the test checks the workflow, not this machine's
timing noise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITE = [str(ROOT / "bench" / "test_bench_pixel_shuffle.py"), "-k", "cpu"]


def run_bench(storage: Path, *options: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("FASTDEC_TRITON_INTERPRET", "TRITON_INTERPRET")}
    return subprocess.run([sys.executable, "-m", "pytest", *SUITE, "-q", "-p", "no:cacheprovider",
                           f"--benchmark-storage=file://{storage}", *options],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def scaled_copy(saved: Path, factor: float, number: int) -> None:
    """Write the saved run again as run `number`, every time statistic multiplied by `factor`."""
    run = json.loads(saved.read_text())
    for bench in run["benchmarks"]:
        for key in ("min", "max", "mean", "median", "stddev", "iqr", "q1", "q3", "ld15iqr", "hd15iqr", "total"):
            bench["stats"][key] *= factor
    saved.with_name(f"{number:04d}_scaled.json").write_text(json.dumps(run))


def test_autosave_then_compare_fail_threshold(tmp_path):
    first = run_bench(tmp_path, "--benchmark-autosave")
    assert first.returncode == 0, first.stdout[-2000:]
    (saved,) = tmp_path.glob("*/0001_*.json")
    run = json.loads(saved.read_text())
    assert run["benchmarks"] and {"gpu", "torch", "triton", "fastdec"} <= set(run["machine_info"])

    scaled_copy(saved, 1e4, 2)  # a baseline 10^4x slower (a margin no load on a shared CPU eats): the gate passes
    faster = run_bench(tmp_path, "--benchmark-compare=0002", "--benchmark-compare-fail=mean:10%")
    assert faster.returncode == 0, faster.stdout[-2000:]

    scaled_copy(saved, 1e-4, 3)  # a baseline 10^4x faster: a 10% regression gate must fail
    slower = run_bench(tmp_path, "--benchmark-compare=0003", "--benchmark-compare-fail=mean:10%")
    assert slower.returncode != 0 and "Performance has regressed" in slower.stdout + slower.stderr
