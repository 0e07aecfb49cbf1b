"""The one writer of both engines: atomic output files, ``manifest.jsonl`` (what is finished), ``failures.jsonl``
(what failed in the latest run, and why); plus progress lines and the end-of-job report.

Resume: an item is finished when the manifest lists it and its file exists. Files are written to a temporary name
and renamed into place, and the manifest line is appended after the rename, so a job killed at any point leaves only
whole files; a file without its manifest line is written again (same bytes) on the next run. failures.jsonl is
started afresh by each run: a rerun retries what failed before.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastdec.files import write_atomically

MANIFEST, FAILURES = "manifest.jsonl", "failures.jsonl"


def resumed_batch_size(output_dir: str | Path) -> int | None:
    """The batch size of the job whose outputs ``output_dir`` holds (its manifest's), or None for a new job."""
    path = Path(output_dir).expanduser() / MANIFEST
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    for line in lines:
        try:
            size = json.loads(line).get("batch_size")
        except json.JSONDecodeError:  # a cut last line; a damaged manifest is reported by Writer
            continue
        if size is not None:
            return size
    return None


class Writer:
    """Writes outputs into ``output_dir``, thread-safe; at most one manifest line per id."""

    def __init__(self, output_dir: str | Path, suffix: str, decoder: str, job: str, batch_size: int):
        """``decoder``: the decoder as the user named it (shown); ``job``: work.job_identity, what a resumed run
        must match (the decoder's content, the output settings and the batch size, not the decoder's name)."""
        self.output_dir = Path(output_dir).expanduser()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.suffix, self.decoder, self.job, self.batch_size = suffix, decoder, job, batch_size
        self._lock = threading.Lock()
        self.done: dict[str, dict] = self._read_manifest()
        self._manifest = open(self.output_dir / MANIFEST, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._failures = open(self.output_dir / FAILURES, "w", encoding="utf-8")  # noqa: SIM115
        self.failed: dict[str, str] = {}

    def _read_manifest(self) -> dict[str, dict]:
        path = self.output_dir / MANIFEST
        if not path.is_file():
            return {}
        records, lines = {}, path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                if number == len(lines):  # the last line of a killed run, cut mid-write
                    continue
                raise ValueError(
                    f"{path} line {number} is not JSON: the manifest is damaged; use a new output folder") from error
            if record.get("batch_size", self.batch_size) != self.batch_size:
                raise ValueError(
                    f"{self.output_dir} holds outputs decoded with --batch-size {record['batch_size']}, this run asks "
                    f"for {self.batch_size}: the batch a latent is decoded in can change a pixel by one level, so a "
                    "job keeps its batch size; leave --batch-size out to resume with the job's own, or use a new "
                    "output folder"
                )
            if record.get("job", self.job) != self.job:
                raise ValueError(
                    f"{self.output_dir} holds outputs of another decoder or other output settings (decoder "
                    f"{record.get('decoder')!r}, job {record['job']}; this job: {self.decoder!r}, job {self.job}; "
                    "a job is a hash of the weights, config and output settings): resume with the same weights and "
                    "settings, or use a new output folder"
                )
            if "job" not in record and record.get("decoder") != self.decoder:  # a manifest from before job ids
                raise ValueError(
                    f"{self.output_dir} holds outputs of decoder {record.get('decoder')!r}, this job decodes with "
                    f"{self.decoder!r}: pass the same --decoder to resume, or use a new output folder"
                )
            if Path(record.get("path", "")).suffix not in (self.suffix, ".mp4"):
                raise ValueError(
                    f"{self.output_dir} holds {Path(record.get('path', '')).suffix} outputs, this job writes "
                    f"{self.suffix}: pass the same --format to resume, or use a new output folder"
                )
            if (self.output_dir / record["path"]).is_file():
                records[record["id"]] = record
        kept = "".join(json.dumps(record) + "\n" for record in records.values())
        if kept != "".join(line + "\n" for line in lines):  # drop a cut line and entries whose file is gone
            self._replace(path, kept.encode())
        return records

    def is_done(self, item_id: str) -> bool:
        return item_id in self.done

    def write(self, item_id: str, data: bytes, shape: list[int], suffix: str) -> bool:
        """Writes one output (``suffix``: the image format's, or .mp4 for a video) atomically and records it;
        False (nothing written) when the id is finished already, e.g. a result a retried worker delivered twice."""
        with self._lock:
            if item_id in self.done:
                return False
            self.done[item_id] = {}  # claimed: a concurrent duplicate stops here
        path = self.output_dir / f"{item_id}{suffix}"
        self._replace(path, data)
        record = {"id": item_id, "path": path.name, "decoder": self.decoder, "job": self.job,
                  "batch_size": self.batch_size, "shape": list(shape),
                  "sha256": hashlib.sha256(data).hexdigest()}
        with self._lock:
            self.done[item_id] = record
            self._manifest.write(json.dumps(record) + "\n")
            self._manifest.flush()
        return True

    def fail(self, item_id: str, reason: str) -> None:
        with self._lock:
            self.failed[item_id] = reason
            self._failures.write(json.dumps({"id": item_id, "reason": reason}) + "\n")
            self._failures.flush()

    def close(self) -> None:
        self._manifest.close()
        self._failures.close()

    @staticmethod
    def _replace(path: Path, data: bytes) -> None:
        # No fsync: the manifest, written after the output, is what a rerun trusts; a killed process leaves no
        # partial file either way.
        write_atomically(path, lambda tmp: tmp.write_bytes(data), durable=False)


@dataclass
class BatchReport:
    """What a job did: counts, wall time, throughput and where the time went (seconds of each stage, summed over
    the threads or workers that ran it, so they can exceed the wall time when stages overlap)."""

    engine: str
    decoder: str
    total: int
    done: int = 0
    skipped: int = 0
    failed: int = 0
    wall_seconds: float = 0.0
    read_seconds: float = 0.0
    decode_seconds: float = 0.0
    write_seconds: float = 0.0
    first_output_seconds: float | None = None  # start-up: from the start of the job to the first output written
    workers: list[str] = field(default_factory=list)

    @property
    def items_per_second(self) -> float:
        return self.done / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def steady_items_per_second(self) -> float | None:
        """Items/s after the first output: the throughput without start-up (decoder load, Ray actor start)."""
        if self.first_output_seconds is None or self.done < 4 or self.wall_seconds <= self.first_output_seconds:
            return None  # too few items: outputs arrive in bursts (Ray delivers blocks), the rate would be noise
        return (self.done - 1) / (self.wall_seconds - self.first_output_seconds)

    def to_json(self) -> dict:
        return {**asdict(self), "items_per_second": self.items_per_second,
                "steady_items_per_second": self.steady_items_per_second}

    def summary(self) -> str:
        stages = self.read_seconds + self.decode_seconds + self.write_seconds
        split = ", ".join(f"{name} {seconds:.1f} s ({100 * seconds / stages:.0f}%)" for name, seconds in
                          (("read", self.read_seconds), ("decode", self.decode_seconds),
                           ("encode+write", self.write_seconds))) if stages > 0 else "no work"
        return (f"fastdec batch ({self.engine}, {self.decoder} on {', '.join(self.workers) or '-'}): "
                f"{self.done} done, {self.skipped} skipped (finished before), {self.failed} failed, of {self.total}; "
                f"{self.wall_seconds:.1f} s, {self.items_per_second:.2f} items/s; busy time: {split}")


class Progress:
    """Items finished (done, skipped or failed) of the total, items/s and ETA: a line to stderr at most every
    ``interval`` seconds, and one at the end."""

    def __init__(self, total: int, enabled: bool = True, interval: float = 2.0, stream=None):
        self.total, self.enabled, self.interval = total, enabled, interval
        self.stream = stream or sys.stderr
        self.start = self._last = time.perf_counter()
        self.done = self.skipped = self.failed = 0
        self.first_done_at: float | None = None
        self._printed: tuple[int, int, int] | None = None  # the counts of the last line, so the end is not repeated
        self._lock = threading.Lock()

    def update(self, done: int = 0, skipped: int = 0, failed: int = 0) -> None:
        with self._lock:
            self.done, self.skipped, self.failed = self.done + done, self.skipped + skipped, self.failed + failed
            now = time.perf_counter()
            if done and self.first_done_at is None:
                self.first_done_at = now
            if self.enabled and now - self._last >= self.interval:
                self._last = now
                self._print(now)

    def finish(self) -> None:
        if self.enabled and self._printed != (self.done, self.skipped, self.failed):
            self._print(time.perf_counter())

    def _print(self, now: float) -> None:
        self._printed = (self.done, self.skipped, self.failed)
        finished = self.done + self.skipped + self.failed
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = max(0, self.total - finished)
        eta = f"ETA {left / rate:.0f} s" if rate > 0 and left else ("ETA -" if left else "")
        print(f"[fastdec batch] {finished}/{self.total} items ({self.done} done, {self.skipped} skipped, "
              f"{self.failed} failed)  {rate:.2f} items/s  {eta}".rstrip(), file=self.stream, flush=True)
