"""The main job, ``fastdec bench --quick``, and an honest picture: one decoder of each kind, progress with an ETA,
threads chosen from the machine's load, one fastdec row where fused and reference are the same code, other-model
baselines labelled as such, no "not met" from noise, a plot that fits a screen and names the machine and load."""

from __future__ import annotations

import argparse
import os

import pytest
import torch

from fastdec import bench
from fastdec.bench import cases, goals, render
from fastdec.bench.decoders import DEFAULT_DECODERS, ENTRIES, QUICK_DECODERS
from fastdec.bench.environment import auto_threads, busy_cores
from fastdec.bench.run import Progress
from fastdec.bench.timing import variant_label


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


def test_quick_runs_one_decoder_of_each_kind_at_cpu_sizes():
    kinds = [ENTRIES[name].kind for name in QUICK_DECODERS]
    assert sorted(kinds) == sorted(["exact image VAE", "tiny image decoder", "exact video VAE",
                                    "tiny video decoder", "paper decoder (EfficientViT, DC-AE configuration)"])
    settings = bench.settings_from(parse("--quick", "--device", "cpu"))
    assert settings.decoders == QUICK_DECODERS
    assert settings.resolutions == (64,) and settings.batches == (1,) and not settings.compile
    assert not settings.reference_variant and settings.warmup == 0


def test_all_keeps_the_full_list_and_conflicts_with_decoders():
    assert bench.settings_from(parse("--quick", "--all", "--device", "cpu")).decoders == DEFAULT_DECODERS
    assert bench.settings_from(parse("--device", "cpu")).decoders == DEFAULT_DECODERS
    with pytest.raises(ValueError, match="--all and --decoders"):
        bench.settings_from(parse("--quick", "--all", "--decoders", "taesd"))


def test_progress_lines_carry_elapsed_time_and_an_eta(capsys):
    progress = Progress(3)
    progress.step("first")
    progress.advance()
    progress.step("second")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("[1/3] first (") and "ETA after the first step" in lines[0]
    assert lines[1].startswith("[2/3] second (") and "s elapsed, ETA " in lines[1] and lines[1].endswith(" s)")


@pytest.mark.parametrize(("busy", "threads", "expected"), [
    (None, 2, 2), (0.0, 2, 2), (0.4, 2, 2), (1.0, 2, 1), (2.0, 2, 1), (7.5, 2, 1), (0.0, 1, 1),
])
def test_threads_follow_the_idle_cores(monkeypatch, busy, threads, expected):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert auto_threads(busy, threads) == expected


def test_busy_cores_reads_the_current_cpu_use():
    busy = busy_cores(0.05)
    assert busy is None or 0.0 <= busy <= os.cpu_count()


def cpu_row(low: float, median: float, high: float) -> dict:
    return {"decoder": "sd-vae", "variant": "fastdec", "resolution": 64, "batch": 1, "device": "cpu",
            "ratio_vs_diffusers": median, "ratio_q25": low, "ratio_q75": high, "median_ms": 10.0,
            "backend": "eager-reference ops"}


@pytest.mark.parametrize(("spread", "busy", "status"), [
    ((1.20, 1.25, 1.30), False, "not met"),
    ((1.20, 1.25, 1.30), True, "inconclusive"),  # a busy machine never proves "slower"
    ((1.02, 1.04, 1.06), False, "inconclusive"),  # within the noise of two runs of the same code
    ((0.90, 0.95, 0.99), True, "met"),
])
def test_slower_than_diffusers_needs_a_clear_margin_on_an_idle_machine(spread, busy, status):
    assert goals.cpu_ratio_verdict(cpu_row(*spread), busy) == status
    rows = [cpu_row(*spread), {**cpu_row(*spread), "variant": "diffusers"}]
    cpu_goal = bench.evaluate_goals(rows, "cpu", "float32", busy=busy)[-1]
    assert cpu_goal["status"] == status and f"not slower than diffusers: {status}" in bench.goal_for_row(
        rows[0], [cpu_goal])


def test_other_model_baseline_is_never_called_a_speed_up():
    row = {"variant": "fastdec", "speedup_vs_diffusers": 23.4, "comparison": cases.OTHER_MODEL}
    assert render._speedup(row) == "23.40x (tiny vs full VAE, not the same model)"
    assert render._speedup({**row, "comparison": "same model"}) == "23.40x"
    assert ENTRIES["taew2_1"].twin_is_other_model and not ENTRIES["taesd"].twin_is_other_model


def tiny_settings(**overrides) -> bench.Settings:
    settings = bench.settings_from(parse("--device", "cpu", "--resolution", "32", "--repeats", "2", "--warmup", "0",
                                         "--no-compile", "--decoders", "taesd"))
    for key, value in overrides.items():
        setattr(settings, key, value)
    return settings


def test_one_fastdec_row_when_fused_and_reference_are_the_same_code(monkeypatch):
    """taesd calls fastdec's pixel_shuffle (C++ here, F.pixel_shuffle in its reference): two code paths, two rows.
    Where every op it calls runs its reference in both, one row, labelled with what ran, compared to itself."""
    contender = bench.build_contender("taesd")
    rows = {row["variant"]: row for row in bench.bench_decoder(contender, 32, 1, tiny_settings())}
    assert "fastdec-reference" in rows and "pixel_shuffle" in rows["fastdec"]["backend"]
    monkeypatch.setattr(cases, "fused_differs_from_reference", lambda op_names, device: False)
    rows = {row["variant"]: row for row in bench.bench_decoder(contender, 32, 1, tiny_settings())}
    assert set(rows) == {"fastdec", "diffusers"}
    assert rows["fastdec"]["label"] == "fastdec (eager-reference ops)"
    assert "the same code as fastdec-reference" in rows["fastdec"]["backend"]
    assert rows["fastdec"]["max_abs_error"] == 0.0


def test_quick_without_the_reference_row_still_measures_fidelity_against_the_reference():
    contender = bench.build_contender("taesd")
    rows = bench.bench_decoder(contender, 32, 1, tiny_settings(reference_variant=False))
    fastdec_row = next(row for row in rows if row["variant"] == "fastdec")
    assert [row["variant"] for row in rows] == ["fastdec", "diffusers"]
    assert fastdec_row["max_abs_error"] is not None and fastdec_row["max_abs_error"] < 1e-5


def synthetic_result(decoders: list[str], busy: bool) -> dict:
    rows = []
    for decoder in decoders:
        for variant in ("fastdec", "fastdec-reference", "diffusers"):
            rows.append({"decoder": decoder, "variant": variant, "label": variant, "resolution": 64, "batch": 1,
                         "median_ms": 10.0, "q25_ms": 9.0, "q75_ms": 11.0, "peak_memory_bytes": 2**20,
                         "comparison": cases.OTHER_MODEL if decoder == "taew2_1" else "same model"})
    return {"rows": rows, "settings": {"dtype": "float32"}, "date": "2026-12-03T00:00:00+00:00",
            "device": {"type": "cpu", "name": "Test CPU", "cpu_count": 2},
            "load_average": {"start": [0.5, 0, 0], "end": [3.2, 0, 0], "torch_threads": 2, "busy": busy}}


def test_plot_fits_a_screen_and_names_the_machine_and_load():
    import matplotlib.pyplot as plt

    figure = bench.figure_of(synthetic_result(list(DEFAULT_DECODERS), busy=True))
    width_px = figure.get_size_inches()[0] * render.PLOT_DPI
    title = figure._suptitle.get_text()
    ticks = [label.get_text() for label in figure.axes[0].get_xticklabels()]
    plt.close(figure)
    assert width_px <= 1600, width_px
    assert "Test CPU (2 cores)" in title and "0.50 at the start, 3.20 at the end" in title and "busy" in title
    assert any("taew2_1" in tick and "tiny vs full VAE" in tick for tick in ticks)


def test_the_fastdec_variant_is_labelled_with_the_backend_that_ran():
    label = variant_label("fastdec", torch.device("cpu"))
    assert label.startswith("fastdec (") and "fused" not in label
    assert bench.fused_backend(torch.device("cpu"), short=True) in label
