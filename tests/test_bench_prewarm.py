"""``python -m fastdec.bench.prewarm`` compiles what a later ``fastdec bench`` with the same options compiles, with the
same inputs and options, so that the bench's compiles hit torch's caches (bench/gpu_run.sh runs it in the background
while it builds and tests)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdec import bench
from fastdec.bench import cases, prewarm

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--resolution", "32", "--batch", "1", "--repeats", "2", "--warmup", "0"]


def settings_of(*argv: str) -> bench.Settings:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return bench.settings_from(parser.parse_args([*TINY, *argv]))


def record_compiles(monkeypatch) -> list[tuple]:
    """torch.compile in the bench's cases records (what, options, the input's shape, dtype and strides) on each
    compiled call, then runs the function uncompiled."""
    calls: list[tuple] = []

    def recording_compile(fn, **options):
        what = type(fn).__name__ if isinstance(fn, torch.nn.Module) else fn.__qualname__

        def compiled(latents):
            calls.append((what, tuple(sorted(options.items())), tuple(latents.shape), latents.dtype,
                          latents.stride()))
            return fn(latents)

        return compiled

    monkeypatch.setattr(cases.torch, "compile", recording_compile)
    return calls


def test_prewarm_compiles_what_the_bench_compiles(monkeypatch):
    settings = settings_of("--decoders", "taesd", "--resolution", "32,48", "--compile-backend", "inductor")
    calls = record_compiles(monkeypatch)
    done = prewarm.prewarm(settings)
    warmed = list(calls)
    assert len(done) == len(warmed) == 4  # diffusers and fastdec at two sizes
    calls.clear()
    contender = bench.build_contender("taesd", None, settings.seed)
    for side in settings.resolutions:
        bench.bench_decoder(contender, side, 1, settings)
    benched = list(dict.fromkeys(calls))  # the bench calls each compiled function many times
    assert warmed == benched
    assert {what for what, *_ in warmed} == {"_variants.<locals>.twin_decode", "TAESDDecoder"}
    assert all(dict(options)["backend"] == "inductor" and dict(options)["dynamic"] is False
               for _, options, *_ in warmed)


def test_prewarm_refuses_options_that_compile_nothing(capsys):
    assert prewarm.main([*TINY, "--decoders", "taesd", "--no-compile"]) == 2
    assert "nothing to prewarm" in capsys.readouterr().err
    assert prewarm.main([*TINY, "--decoders", "no-such-decoder"]) == 2
    assert prewarm.main([*TINY, "--decoders", "taesd", "--tiling", "--out", "x"]) == 2
    assert "--tiling, --out: not a compile this prewarms" in capsys.readouterr().err


COUNT_HITS = """
import argparse, json, sys
from torch._dynamo.utils import counters
from fastdec import bench
parser = argparse.ArgumentParser()
bench.add_arguments(parser)
settings = bench.settings_from(parser.parse_args(sys.argv[1:]))
rows = bench.bench_decoder(bench.build_contender("taesd", None, settings.seed), 32, 1, settings)
assert all(row["status"] == "ok" for row in rows), rows
print(json.dumps(dict(counters["inductor"])))
"""


@pytest.mark.slow
def test_a_bench_after_prewarm_takes_every_compiled_graph_from_the_cache(tmp_path):
    """With Inductor for real (on the CPU): the bench process compiles nothing that the prewarm process did not."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
           "TRITON_CACHE_DIR": str(tmp_path / "triton")}
    options = [*TINY, "--decoders", "taesd"]
    warm = subprocess.run([sys.executable, "-m", "fastdec.bench.prewarm", *options], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert warm.returncode == 0, warm.stderr[-3000:]
    done = subprocess.run([sys.executable, "-c", COUNT_HITS, *options], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    inductor = json.loads(done.stdout.strip().splitlines()[-1])
    assert inductor.get("fxgraph_cache_hit", 0) >= 2 and inductor.get("fxgraph_cache_miss", 0) == 0, inductor
