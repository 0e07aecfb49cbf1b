"""``fastdec batch --engine ray`` on a real local Ray instance (2 CPUs, one for the whole module): the same bytes
and manifest as the local engine, bad files in failures.jsonl, a decoder actor killed mid-job, resuming a job that a
local run left half done. Two Ray jobs in all: each starts its actors (a process importing torch)."""

from __future__ import annotations

import shutil

import pytest
from helpers import BATCH_FAILED, BATCH_ITEMS, batch_failures, batch_images, batch_manifest

from fastdec.batch import decode_dataset
from fastdec.batch.ray_engine import FAULT_MARKER

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data", reason="the Ray engine needs ray[data] (pandas, pyarrow): pip install 'fastdec[ray]'")


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    """One local Ray for the module: 2 CPUs, a small object store, no dashboard."""
    ray.init(num_cpus=2, object_store_memory=128 * 2**20, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()


def same_outputs(out, reference) -> None:
    assert batch_manifest(out) == batch_manifest(reference)
    assert batch_images(out) == batch_images(reference)
    assert batch_failures(out) == batch_failures(reference)


def test_ray_writes_the_local_engines_bytes_even_when_an_actor_is_killed(batch_dataset, batch_local_run, tmp_path):
    """One job for three checks (each Ray job pays for starting actors): the outputs, manifest and failures
    (corrupt file, wrong channels, NaN) equal the local engine's, byte for byte, although the decoder actor exited
    after 12 items and Ray restarted it and retried its batch."""
    folder, decoder = batch_dataset
    out = tmp_path / "out"
    report = decode_dataset(folder, out, str(decoder), engine="ray", batch_size=3, fail_after=12, progress=False)
    assert (out / FAULT_MARKER).is_file()  # written by the actor just before it exited
    assert (report.done, report.skipped, report.failed) == (BATCH_ITEMS, 0, len(BATCH_FAILED))
    same_outputs(out, batch_local_run)


def test_ray_resumes_a_half_finished_job(batch_dataset, batch_local_run, tmp_path):
    folder, decoder = batch_dataset
    out = tmp_path / "out"
    shutil.copytree(batch_local_run, out)
    lines = (out / "manifest.jsonl").read_text().splitlines(keepends=True)
    kept, dropped = lines[:30], lines[30:]
    (out / "manifest.jsonl").write_text("".join(kept) + dropped[0][:17])  # cut mid-line, as a kill leaves it
    for record in batch_manifest(batch_local_run).values():
        if f'"{record["id"]}"' not in "".join(kept) and record["id"] != "sample005_000":
            (out / record["path"]).unlink()  # sample005_000.png stays: written, but not in the manifest
    report = decode_dataset(folder, out, str(decoder), engine="ray", batch_size=3, progress=False)
    assert (report.done, report.skipped, report.failed) == (BATCH_ITEMS - 30, 30, len(BATCH_FAILED))
    same_outputs(out, batch_local_run)
