"""bench/gpu_train.sh --smoke: the GPU training recipe of the lightweight decoders (slim by fastdec distill, plus by
fastdec train, the frontier by fastdec eval) runs end to end on the CPU with two photos and two steps a stage, so it
is ready for a GPU session (marked slow: run it with -m slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
# About 5 minutes on 2 shared cores (the real TAEF2 at full size on the CPU): slow, out of CI; the same commands run
# on tiny models in CI through tests/test_distill.py and tests/test_train.py.
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (SHARED / "weights" / "taef2" / "taef2_decoder.pth").is_file(),
                                 reason="needs ../shared (TAEF2 weights and BSDS500)")]


def test_gpu_training_recipe_smoke(tmp_path):
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_train.sh"), str(tmp_path), "--smoke"],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "frontier" / "report.json").read_text())
    assert [row["decoder"] for row in report["rows"]] == [
        "reference (taef2_decoder.pth)", "latent preview", "slim", "plus", "efficientvit-taef2"]
    assert len(report["images"]) == 2 and report["size"] == [320, 480]
    assert (tmp_path / "frontier" / "frontier.png").is_file()
    assert json.loads((tmp_path / "slim" / "student" / "config.json").read_text())["width"] == [64, 64, 48, 32]
    assert (tmp_path / "plus" / "decoder" / "model.safetensors").is_file()
