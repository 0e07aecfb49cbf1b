"""What a new user meets first on the command line: ``fastdec check`` only says "ok" where a fused kernel ran against
its reference, and says when there is no GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdec import ops
from fastdec.cli import main

REPO = Path(__file__).resolve().parents[1]


def op_lines(output: str) -> dict[tuple[str, str], str]:
    """(op, device) -> its result line of ``fastdec check``."""
    lines = {}
    for line in output.splitlines():
        parts = line.split()
        if parts and parts[0] in ("ok", "FAIL", "skip"):
            lines[parts[1], parts[2]] = line
    return lines


def test_check_says_ok_only_where_a_fused_kernel_ran(capsys):
    assert main(["check"]) == 0
    output = capsys.readouterr().out
    lines = op_lines(output)
    assert {op for op, _ in lines} == set(ops.backends())
    for (op, device), line in lines.items():
        backend = ops.backends()[op][device]
        if backend.startswith("eager"):
            assert line.startswith("skip") and "skipped: no fused backend runs here" in line, line
        else:
            assert line.startswith("ok") and backend in line, line
    assert ("no GPU here" in output) == (not torch.cuda.is_available())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only machine")
def test_check_without_the_interpreter_skips_the_triton_ops():
    """Without FASTDEC_TRITON_INTERPRET/TRITON_INTERPRET the Triton ops run their eager reference on CPU: comparing
    it with itself must not print "ok"."""
    env = {k: v for k, v in os.environ.items() if k not in ("FASTDEC_TRITON_INTERPRET", "TRITON_INTERPRET")}
    result = subprocess.run([sys.executable, "-m", "fastdec.cli", "check"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = op_lines(result.stdout)
    for op in ops.TRITON_OPS:
        assert lines[op, "cpu"].startswith("skip"), lines[op, "cpu"]
        assert "no fused backend runs here" in lines[op, "cpu"] and "FASTDEC_TRITON_INTERPRET=1" in lines[op, "cpu"]
    assert "no GPU here" in result.stdout and "not checked" in result.stdout
