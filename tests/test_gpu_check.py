"""bench/gpu_check.py, the script a lent GPU runs, must not rot while CI has no GPU: run it at tiny sizes here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_writes_a_complete_report(tmp_path):
    # Without the interpreter variables, so the Triton ops take their (fast) reference path on CPU.
    env = {k: v for k, v in os.environ.items() if k not in ("FASTDEC_TRITON_INTERPRET", "TRITON_INTERPRET")}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--seconds", "0.01",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (report_file,) = tmp_path.glob("*-smoke.json")
    report = json.loads(report_file.read_text())
    assert {"date", "device", "torch", "triton", "fastdec", "backends"} <= set(report["environment"])
    assert {row["op"] for row in report["rows"]} == {"pixel_shuffle", "group_norm_act", "attention", "patch_unembed",
                                                    "rms_norm_act"}
    for row in report["rows"]:
        assert row["correct"], row
        assert row["timings"]["fastdec"]["median_us"] > 0
        assert any("median_us" in t for name, t in row["timings"].items() if name != "fastdec"), row
    markdown = report_file.with_suffix(".md").read_text()
    assert markdown.count("\n| ") == len(report["rows"]) + 1  # header + one line per row
