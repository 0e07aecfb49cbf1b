"""bench/gpu_run.sh, the one call a lent GPU gets (issue 21 item 3), must not rot while CI has no GPU: its --smoke
mode runs the same steps on the CPU at tiny sizes (here for one op; the whole smoke run is marked slow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_run.sh"
needs_bash = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="gpu_run.sh needs bash and coreutils' timeout")


def run_smoke(out: Path, *options: str, limit: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("FASTDEC_TRITON_INTERPRET", "TRITON_INTERPRET")}
    env["PYTHON"] = sys.executable
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run(["bash", str(SCRIPT), str(out), "--smoke", *options], capture_output=True, text=True,
                          env=env, timeout=limit, cwd=ROOT)


def check_report(out: Path, steps: list[str], ops: set[str]) -> dict:
    report = json.loads((out / "gpu_run.json").read_text())
    assert [s["step"] for s in report["steps"]] == steps
    assert all(s["status"] == "ok" for s in report["steps"]), report["steps"]
    assert report["problems"] == [] and report["smoke"] is True
    assert {row["op"] for row in report["reports"]["gpu_check"]["rows"]} == ops
    assert all(row["correct"] for row in report["reports"]["gpu_check"]["rows"])
    assert report["reports"]["decoders"]["rows"], "the end-to-end decode step wrote no rows"
    markdown = (out / "gpu_run.md").read_text()
    assert markdown.startswith("# fastdec GPU run") and "## gpu_check" in markdown and "## decoders" in markdown
    return report


@needs_bash
def test_smoke_run_of_one_op_writes_one_json_and_markdown(tmp_path):
    """--only leaves out the tests step (what a rerun on a warm machine does with the steps a first call missed); the
    bench step is prewarmed first."""
    done = run_smoke(tmp_path, "--ops", "pixel_shuffle", "--only", "gpu_check,decoders", limit=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = check_report(tmp_path, ["gpu_check", "prewarm", "decoders"], {"pixel_shuffle"})
    # the prewarm compiled what the bench step then compiled (tests/test_bench_prewarm.py: the same calls)
    assert "taesd 64px batch 1 diffusers-compile" in (tmp_path / "prewarm-0.log").read_text()
    compiled = [row for row in report["reports"]["decoders"]["rows"] if row["variant"].endswith("-compile")]
    assert len(compiled) == 2 and all(row["status"] == "ok" for row in compiled)


@needs_bash
@pytest.mark.slow
def test_full_smoke_run(tmp_path):
    done = run_smoke(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = check_report(tmp_path, ["tests", "gpu_check", "prewarm", "decoders"],
                          {"pixel_shuffle", "group_norm_act", "attention", "patch_unembed", "rms_norm_act"})
    assert report["tests"]["tests"] >= 2 and report["tests"]["failures"] == 0


def test_report_flags_failed_and_timed_out_steps(tmp_path):
    (tmp_path / "steps.tsv").write_text("build\tok\t60\ngpu_check\ttimed out after 200 s\t200\n"
                                        "decoders\tfailed (exit 1)\t12\n")
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_attention" name="test_a"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_attention" name="test_b"/></testsuite></testsuites>')
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_run_report.py"), str(tmp_path), "--smoke"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads((tmp_path / "gpu_run.json").read_text())
    assert report["problems"] == ["step gpu_check: timed out after 200 s", "step decoders: failed (exit 1)",
                                  "tests: 1 failed, 0 errors: tests.test_attention::test_a"]
    assert "| gpu_check | timed out after 200 s | 200 |" in (tmp_path / "gpu_run.md").read_text()


def test_report_shows_every_attention_probe_launch(tmp_path):
    """bench/attention_key_tail_probe.py's rows, a launch that failed in its process too, go into the markdown
    without counting as the run's problems (the probe looks for a known wrong path)."""
    rows = [{"call": "d96-fp16", "keys": 45, "split": True, "peel": True, "change": {}, "block_m": 128, "block_n": 64,
             "block_dv": 512, "kv_splits": 1, "num_warps": 8, "num_stages": 3, "key_tail": True,
             "max_abs_error": 1.15, "correct": False},
            {"call": "d96-fp16", "keys": 45, "split": True, "peel": False, "change": {"num_stages": 2},
             "error": "process exit 1: illegal memory access", "correct": False}]
    (tmp_path / "attention_probe.json").write_text(json.dumps({"rows": rows}))
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_run_report.py"), str(tmp_path), "--smoke"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    markdown = (tmp_path / "gpu_run.md").read_text()
    assert "| d96-fp16 | 45 | True | True | 128, 64, 512, 8, 3 | True | 1.15 | False |" in markdown
    failed = "| d96-fp16 | 45 | True | False | ?, ?, ?, ?, ? | ? | process exit 1: illegal memory access | False |"
    assert failed in markdown
    assert json.loads((tmp_path / "gpu_run.json").read_text())["attention_probe"]["rows"] == rows


@needs_bash
def test_scripts_parse_and_refuse_unknown_options(tmp_path):
    for script in ("gpu_run.sh", "gpu_wheels.sh"):
        assert subprocess.run(["bash", "-n", str(ROOT / "bench" / script)]).returncode == 0
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path), "--frobnicate"], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown option --frobnicate" in done.stderr
