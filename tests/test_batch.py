"""``fastdec batch`` on the local engine: the same bytes as ``fastdec decode``, manifest and failures, Parquet input,
image formats, interrupt-then-resume (a process that dies mid-job), and its errors. The Ray engine: test_batch_ray.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import BATCH_FAILED as FAILED
from helpers import BATCH_ITEMS as ITEMS
from helpers import batch_failures as failures
from helpers import batch_images as images
from helpers import batch_manifest as manifest
from helpers import save_tiny_taesd
from PIL import Image

from fastdec.batch import decode_dataset, write_parquet
from fastdec.batch.reader import read_latents
from fastdec.cli import main

REPO = Path(__file__).resolve().parents[1]
def test_outputs_are_the_bytes_of_fastdec_decode_of_each_file(batch_dataset, batch_local_run, tmp_path):
    folder, decoder = batch_dataset
    files = sorted(folder.glob("sample*"))[:12]  # every file type, batch size (1, 2, 3) and latent size
    for file in files:
        assert main(["decode", str(file), "--decoder", str(decoder), "-o", str(tmp_path), "--device", "cpu"]) == 0
    expected = images(tmp_path)
    assert len(expected) == 24
    assert {name: data for name, data in images(batch_local_run).items() if name in expected} == expected


def test_manifest_lists_each_output_once_with_its_hash_and_failures_say_why(batch_dataset, batch_local_run):
    records = manifest(batch_local_run)
    assert len(records) == ITEMS and set(images(batch_local_run)) == {record["path"] for record in records.values()}
    for item_id, record in records.items():
        data = (batch_local_run / record["path"]).read_bytes()
        assert record["sha256"] == hashlib.sha256(data).hexdigest()
        assert record["decoder"] == str(batch_dataset[1])
        assert record["path"] == f"{item_id}.png"
        side = record["shape"][-1]
        assert record["shape"] == [4, side, side]
        assert Image.open(batch_local_run / record["path"]).size == (2 * side, 2 * side)
    reasons = failures(batch_local_run)
    assert set(reasons) == FAILED
    assert "could not read latents" in reasons["corrupt"]
    assert "16 channels" in reasons["channels16_000"]
    assert "NaN" in reasons["nan_batch_001"]
    assert {"nan_batch_000", "nan_batch_002"} <= set(records)  # the rest of that batch decoded


def test_bytes_do_not_depend_on_threads_workers_or_the_mix_of_shapes(batch_dataset, batch_local_run, tmp_path):
    """The dataset mixes three latent sizes and batches of 1-3. One torch thread and one writer, against the
    fixture's run (torch's default threads, two writers): the same bytes (the Ray engine: test_batch_ray.py)."""
    folder, decoder = batch_dataset
    assert len({record["shape"][-1] for record in manifest(batch_local_run).values()}) == 3
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        decode_dataset(folder, tmp_path / "out", str(decoder), batch_size=3, workers=1, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert images(tmp_path / "out") == images(batch_local_run)
    assert manifest(tmp_path / "out") == manifest(batch_local_run)


def test_a_job_keeps_its_batch_size(batch_dataset, batch_local_run, tmp_path, capsys):
    """The batch an item is decoded in may change a pixel by one level, so a resumed job decodes in its own batch
    size: left out, it is the manifest's; another one is refused with what to do."""
    folder, decoder = batch_dataset
    job = tmp_path / "job"
    shutil.copytree(batch_local_run, job)
    (job / "sample001_001.png").unlink()
    report = decode_dataset(folder, job, str(decoder), progress=False)  # batch size 3, from the manifest
    assert (report.done, report.skipped) == (1, ITEMS - 1)
    assert images(job) == images(batch_local_run)
    assert main(["batch", str(folder), str(job), "--decoder", str(decoder), "--batch-size", "4", "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "decoded with --batch-size 3, this run asks for 4" in error and "leave --batch-size out" in error


def test_interrupted_job_resumes_to_the_same_outputs(batch_dataset, batch_local_run, tmp_path):
    folder, decoder = batch_dataset
    out = tmp_path / "out"
    command = [sys.executable, "-m", "fastdec.cli", "batch", str(folder), str(out), "--decoder", str(decoder),
               "--batch-size", "3", "--fail-after", "20", "--quiet"]
    killed = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert killed.returncode == 3, killed.stderr  # os._exit(3): died mid-job, no cleanup
    partial = manifest(out)
    assert 20 <= len(partial) < ITEMS
    with open(out / "manifest.jsonl", "a") as handle:  # as if killed while appending a line
        handle.write('{"id": "sample039_002", "pa')
    report = decode_dataset(folder, out, str(decoder), batch_size=3, progress=False)
    assert report.skipped == len(partial) and report.done == ITEMS - len(partial)
    assert manifest(out) == manifest(batch_local_run)
    assert images(out) == images(batch_local_run)
    assert set(failures(out)) == FAILED
    assert not [path.name for path in out.iterdir() if path.name.endswith(".tmp")]
    again = decode_dataset(folder, out, str(decoder), batch_size=3, progress=False)
    assert (again.done, again.skipped, again.failed) == (0, ITEMS, len(FAILED))


def test_an_output_deleted_after_the_run_is_written_again(batch_dataset, batch_local_run, tmp_path):
    folder, decoder = batch_dataset
    out = tmp_path / "out"
    shutil.copytree(batch_local_run, out)
    (out / "sample001_001.png").unlink()
    report = decode_dataset(folder, out, str(decoder), batch_size=3, progress=False)
    assert (report.done, report.skipped) == (1, ITEMS - 1)
    assert images(out) == images(batch_local_run) and manifest(out) == manifest(batch_local_run)


def test_parquet_input_decodes_like_the_files(batch_dataset, batch_local_run, tmp_path):
    folder, decoder = batch_dataset
    latents = {f"{file.stem}_{i:03d}": latent
               for file in sorted(folder.glob("sample00*")) for i, latent in enumerate(_batch(file))}
    rows = list(latents.items())
    rows.insert(3, ("bad_dtype", torch.zeros(4, 6, 6, dtype=torch.float64)))
    with pytest.raises(ValueError, match="float64"):
        write_parquet(tmp_path / "x.parquet", rows)
    path = write_parquet(tmp_path / "latents.parquet", latents, row_group_size=7)
    out = tmp_path / "out"
    report = decode_dataset(path, out, str(decoder), batch_size=1, progress=False)
    assert (report.done, report.failed) == (len(latents), 0)
    assert sorted(images(out)) == sorted(f"{item_id}.png" for item_id in latents)
    # batch size 1 here; a file holding one latent decodes alone too: the same batch, the same bytes
    singles = [f"{file.stem}_000.png" for file in sorted(folder.glob("sample00*")) if _batch(file).shape[0] == 1]
    assert singles and all(images(out)[name] == images(batch_local_run)[name] for name in singles)


def test_parquet_rows_with_bad_bytes_fail_alone(batch_dataset, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, decoder = batch_dataset
    good = torch.randn(4, 6, 6)
    table = pa.table({"id": ["good", "short", "dtype"],
                      "latent": [good.numpy().tobytes(), b"\x00" * 12, good.numpy().tobytes()],
                      "shape": [[4, 6, 6]] * 3, "dtype": ["float32", "float32", "int8"]})
    pq.write_table(table, tmp_path / "rows.parquet")
    report = decode_dataset(tmp_path / "rows.parquet", tmp_path / "out", str(decoder), progress=False)
    assert (report.done, report.failed) == (1, 2)
    reasons = failures(tmp_path / "out")
    assert "needs 576 bytes" in reasons["short"] and "int8" in reasons["dtype"]


@pytest.mark.parametrize(("fmt", "suffix", "kind"), [("webp", ".webp", "WEBP"), ("jpeg", ".jpg", "JPEG")])
def test_lossy_formats_with_quality(batch_dataset, tmp_path, fmt, suffix, kind):
    folder, decoder = batch_dataset
    small = tmp_path / "in"
    small.mkdir()
    shutil.copy(folder / "sample001.pt", small)
    sizes = {}
    for quality in (10, 95):
        out = tmp_path / f"q{quality}"
        assert main(["batch", str(small), str(out), "--decoder", str(decoder), "--format", fmt,
                     "--quality", str(quality), "--quiet"]) == 0
        written = sorted(out.glob(f"*{suffix}"))
        assert [path.name for path in written] == [f"sample001_000{suffix}", f"sample001_001{suffix}"]
        assert Image.open(written[0]).format == kind
        sizes[quality] = sum(path.stat().st_size for path in written)
    assert sizes[10] < sizes[95]


def test_errors_say_what_to_do(batch_dataset, batch_local_run, tmp_path, capsys):
    folder, decoder = batch_dataset
    cases = [
        (["--format", "png", "--quality", "80"], "lossless"),
        (["--format", "webp", "--quality", "0"], "1 (smallest) to 100"),
        (["--engine", "local", "--address", "auto"], "engine='ray'"),
        (["--batch-size", "0"], "at least 1"),
    ]
    for extra, message in cases:
        assert main(["batch", str(folder), str(tmp_path / "o"), "--decoder", str(decoder), *extra]) == 2
        assert message in capsys.readouterr().err
    other = tmp_path / "other-decoder"  # the same architecture, other weights
    save_tiny_taesd(other, seed=123)
    assert main(["batch", str(folder), str(batch_local_run), "--decoder", str(other), "--quiet"]) == 2
    assert "another decoder or other output settings" in capsys.readouterr().err
    assert main(["batch", str(folder / "sample000.safetensors"), str(tmp_path / "o"), "--decoder", "x"]) == 2
    assert "fastdec decode" in capsys.readouterr().err
    assert main(["batch", str(tmp_path / "missing"), str(tmp_path / "o"), "--decoder", "x"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["batch", str(folder), str(tmp_path / "o2"), "--decoder", str(decoder), "--quiet"]) == 1  # failures
    assert "3 failed" in capsys.readouterr().out


def _batch(file: Path) -> torch.Tensor:
    latents = read_latents(file)
    return latents.unsqueeze(0) if latents.dim() == 3 else latents


def test_video_latents_become_the_mp4_of_fastdec_decode(tmp_path):
    pytest.importorskip("av", reason="mp4 output needs PyAV (pip install av)")
    from fastdec.models.taehv import TAEHVDecoder

    torch.manual_seed(0)
    TAEHVDecoder("taew2_1").save_pretrained(tmp_path / "video_decoder")
    folder = tmp_path / "latents"
    folder.mkdir()
    torch.save(torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(1)), folder / "clip.pt")
    expected = tmp_path / "expected"
    assert main(["decode", str(folder / "clip.pt"), "--decoder", str(tmp_path / "video_decoder"), "-o",
                 str(expected), "--device", "cpu", "--no-progress"]) == 0
    out = tmp_path / "out"
    report = decode_dataset(folder, out, str(tmp_path / "video_decoder"), progress=False)
    assert (report.done, report.failed) == (1, 0)
    assert (out / "clip.mp4").read_bytes() == (expected / "clip.mp4").read_bytes()
    assert manifest(out)["clip"]["path"] == "clip.mp4" and manifest(out)["clip"]["shape"] == [16, 2, 4, 4]


def test_throughput_bench_reports_items_per_second_and_the_projection(tmp_path, monkeypatch):
    from fastdec.bench import batch_throughput as bench

    assert bench.main(["--decoders", "taesd", "--side", "64", "--items", "taesd=3", "--engines", "local",
                       "--threads", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    (row,) = result["rows"]
    assert (row["decoder"], row["engine"], row["side"], row["done"]) == ("taesd", "local", 64, 3)
    assert row["items_per_second"] == pytest.approx(3 / row["wall_seconds"])
    (projection,) = result["projection"]
    assert projection["projected_seconds"] == pytest.approx(100_000 * 256 / row["items_per_second"])
    assert "100K × 1024²" in (tmp_path / "bench.md").read_text() and result["device"]["type"] == "cpu"
    forwarded = []
    monkeypatch.setattr(bench, "main", lambda argv: forwarded.append(argv) or 0)
    assert main(["bench", "--batch-throughput", "--decoders", "taesd,sd-vae", "--resolution", "256",
                 "--out", str(tmp_path / "b")]) == 0
    assert forwarded == [["--side", "256", "--out", str(tmp_path / "b"), "--decoders", "taesd,sd-vae"]]


def test_resume_knows_the_decoder_by_its_content_not_its_name(batch_dataset, batch_local_run, tmp_path, capsys,
                                                               monkeypatch):
    """The same weights by a relative path, or copied elsewhere, resume the job (all skipped); other weights
    under the same folder name are refused, and so is another output setting."""
    folder, decoder = batch_dataset
    job = tmp_path / "job"
    shutil.copytree(batch_local_run, job)
    monkeypatch.chdir(decoder.parent)
    assert main(["batch", str(folder), str(job), "--decoder", decoder.name]) == 1  # the 3 bad files fail again
    assert f"0 done, {ITEMS} skipped" in capsys.readouterr().out
    copy = tmp_path / "elsewhere" / decoder.name
    shutil.copytree(decoder, copy)
    assert main(["batch", str(folder), str(job), "--decoder", str(copy), "--quiet"]) == 1
    assert f"0 done, {ITEMS} skipped" in capsys.readouterr().out
    save_tiny_taesd(copy, seed=7)  # same name, other weights
    assert main(["batch", str(folder), str(job), "--decoder", str(copy), "--quiet"]) == 2
    assert "another decoder or other output settings" in capsys.readouterr().err
    assert main(["batch", str(folder), str(job), "--decoder", decoder.name, "--fps", "8", "--quiet"]) == 2
    assert "another decoder or other output settings" in capsys.readouterr().err


def test_ctrl_c_stops_cleanly_and_the_same_command_resumes(batch_dataset, tmp_path):
    """SIGINT mid-job: the message says how far it got and how to resume, the exit status is 130 (no traceback, no
    SIGABRT from a thread still in torch), every listed file is whole, and rerunning finishes the job exactly."""
    import signal
    import time

    _, decoder = batch_dataset
    latents = tmp_path / "latents"
    latents.mkdir()
    g = torch.Generator().manual_seed(0)
    # 768x768 PNGs: slow enough that the job is still running when the signal comes, even on a loaded machine (at
    # 512x512 the last 58 took about 3 s, and a test process descheduled that long saw the job finish: exit 0)
    for index in range(60):
        torch.save(torch.randn(4, 96, 96, generator=g), latents / f"z{index:03d}.pt")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "fastdec.cli", "batch", str(latents), str(out), "--decoder", str(decoder),
               "--batch-size", "1", "--workers", "1", "--device", "cpu", "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not ((out / "manifest.jsonl").is_file() and (out / "manifest.jsonl").read_text().count("\n") >= 2):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "terminate called" not in stderr
    finished = re.search(r"interrupted after (\d+) of 60; run the same command to resume", stderr)
    assert finished, stderr
    listed = manifest(out)
    assert 2 <= len(listed) < 60 and int(finished.group(1)) == len(listed)
    for record in listed.values():
        assert hashlib.sha256((out / record["path"]).read_bytes()).hexdigest() == record["sha256"]
    assert subprocess.run(command, capture_output=True, text=True, timeout=600).returncode == 0
    assert len(manifest(out)) == 60


def test_file_messages_speak_the_commands_own_options(batch_dataset, tmp_path, capsys):
    """batch has no --key: a file of several tensors is a failure that says what batch reads; a nested dict is
    named as such, not "holds 0 tensors"."""
    from safetensors.torch import save_file

    _, decoder = batch_dataset
    folder = tmp_path / "in"
    folder.mkdir()
    save_file({"a": torch.randn(4, 2, 2), "b": torch.randn(4, 2, 2)}, str(folder / "two.safetensors"))
    torch.save({"outer": {"latents": torch.randn(4, 2, 2)}}, folder / "nested.pt")
    assert main(["batch", str(folder), str(tmp_path / "out"), "--decoder", str(decoder), "--quiet"]) == 1
    reasons = failures(tmp_path / "out")
    assert len(reasons) == 2, reasons
    two, nested = (next(r for i, r in reasons.items() if i.startswith(stem)) for stem in ("two", "nested"))
    assert "one tensor per file" in two and "with --key" not in two.replace("decode --key", "")
    assert "a dict without a tensor at its top level (keys: ['outer'])" in nested
    assert main(["decode", str(folder / "nested.pt"), "--decoder", str(decoder), "-o", str(tmp_path)]) == 2
    assert "without a tensor at its top level" in capsys.readouterr().err


def test_a_job_that_fails_to_start_leaves_no_files(batch_dataset, tmp_path, capsys):
    folder, _ = batch_dataset
    out = tmp_path / "out"
    assert main(["batch", str(folder), str(out), "--decoder", str(tmp_path / "none.pth"), "--quiet"]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert not (out / "manifest.jsonl").exists() and not (out / "failures.jsonl").exists()


def test_progress_prints_its_last_line_once():
    import io

    from fastdec.batch.writer import Progress

    stream = io.StringIO()
    progress = Progress(2, interval=0.0, stream=stream)
    progress.update(done=1)
    progress.update(done=1)  # printed: 2/2
    progress.finish()  # nothing new to say
    assert [line.split(" items")[0] for line in stream.getvalue().splitlines()] == [
        "[fastdec batch] 1/2", "[fastdec batch] 2/2"]
    stream = io.StringIO()
    progress = Progress(1, interval=60.0, stream=stream)
    progress.update(done=1)  # within the interval: not printed
    progress.finish()
    assert stream.getvalue().count("1/1 items") == 1
