"""The Ray engine: Ray Data reads the sources into units (the same ``reader.read_source`` as the local engine),
``map_batches`` decodes and encodes them on an actor pool (one GPU per actor on a GPU cluster, CPU actors otherwise),
and the driver writes the encoded images through the same Writer.

Fault tolerance comes from Ray: a decoder actor that dies is restarted and its unit retried (Ray Data's actor
pools retry by default); the driver writes each id at most once (``Writer.write``), so a result delivered twice
is dropped and the manifest lists every output exactly once. Outputs are written by the driver: the output folder
needs to be on the driver's machine only; the input must be readable from every node (a shared filesystem).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from fastdec import wording
from fastdec.batch.reader import PARQUET_DTYPES, Source, Unit, read_source
from fastdec.batch.work import OutputFormat, decode_unit, load_decoder
from fastdec.batch.writer import BatchReport, Progress, Writer
from fastdec.models.base import Decoder

FAULT_MARKER = ".fastdec-fault-injected"


def _unit_rows(row: dict, batch_size: int, finished: frozenset[str]) -> list[dict]:
    """flat_map: a source -> one row per unit (latent bytes + shape + dtype, or the read error)."""
    rows = []
    for unit in read_source(Source.from_json(row["source"]), batch_size):
        status = "failed" if unit.error else "skipped" if all(i in finished for i in unit.ids) else "decode"
        latents = unit.latents.contiguous() if status == "decode" else None
        rows.append({
            "ids": unit.ids, "status": status, "error": unit.error or "", "read_seconds": unit.read_seconds,
            "latents": b"" if latents is None else latents.view(torch.uint8).numpy().tobytes(),
            "shape": [] if latents is None else list(latents.shape),
            "dtype": "" if latents is None else str(latents.dtype).removeprefix("torch."),
        })
    return rows


class DecodeActor:
    """A decoder on one device (the actor's GPU, else the CPU): units in, encoded images out, one row per item."""

    def __init__(self, decoder: str | Decoder, dtype: torch.dtype | None, output_format: OutputFormat,
                 threads: int, fail_after: int | None = None, fault_marker: str | None = None,
                 cli_words: bool = False):
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.decoder = load_decoder(decoder, self.device, dtype)
        self.output_format = output_format
        self.fail_after, self.fault_marker, self.decoded = fail_after, fault_marker, 0
        self.cli_words = cli_words  # the driver's: failure reasons in the words of `fastdec batch` or of Python

    def __call__(self, batch):
        with wording.cli_words(self.cli_words):
            return self._decode_batch(batch)

    def _decode_batch(self, batch):
        import pyarrow as pa

        out: dict[str, list] = {key: [] for key in ("id", "status", "data", "suffix", "shape", "reason",
                                                    "read_seconds", "decode_seconds", "write_seconds", "worker")}

        def emit(item_id, status, data=b"", suffix="", shape=(), reason="", read=0.0, decode=0.0, write=0.0):
            for key, value in zip(out, (item_id, status, data, suffix, list(shape), reason, read, decode, write,
                                        str(self.device)), strict=True):
                out[key].append(value)

        for row in batch.to_pylist():
            ids, share = row["ids"], row["read_seconds"] / max(1, len(row["ids"]))
            if row["status"] != "decode":
                for item_id in ids:
                    emit(item_id, row["status"], reason=row["error"], read=share)
                continue
            latents = torch.frombuffer(bytearray(row["latents"]), dtype=PARQUET_DTYPES[row["dtype"]])
            unit = Unit(ids, latents.reshape(row["shape"]))
            start = time.perf_counter()
            with torch.inference_mode():
                decoded, pixels, failures = decode_unit(self.decoder, unit, self.device)
            decode = (time.perf_counter() - start) / max(1, len(ids))
            for item_id, reason in failures:
                emit(item_id, "failed", reason=reason, read=share, decode=decode)
            for item_id, image in zip(decoded, [] if pixels is None else pixels, strict=True):
                start = time.perf_counter()
                data = self.output_format.encode(image)
                emit(item_id, "done", data, self.output_format.suffix_of(image), row["shape"][1:], read=share,
                     decode=decode, write=time.perf_counter() - start)
            self._maybe_fail(len(ids))
        schema = pa.schema([("id", pa.string()), ("status", pa.string()), ("data", pa.binary()),
                            ("suffix", pa.string()), ("shape", pa.list_(pa.int64())), ("reason", pa.string()),
                            ("read_seconds", pa.float64()), ("decode_seconds", pa.float64()),
                            ("write_seconds", pa.float64()), ("worker", pa.string())])
        return pa.table(out, schema=schema)

    def _maybe_fail(self, items: int) -> None:
        """Fault injection (tests): after ``fail_after`` items the actor's process exits, before its results are
        returned, once per job (a marker file in the output folder)."""
        self.decoded += items
        if self.fail_after is None or self.decoded < self.fail_after:
            return
        try:
            with open(self.fault_marker, "x"):
                pass
        except FileExistsError:
            return
        os._exit(3)


def init_ray(address: str | None, num_cpus: int | None = None, object_store_mb: int = 256) -> bool:
    """Joins the cluster at ``address`` or starts a local instance (small object store, no dashboard); True when
    this call started Ray (and the job should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, object_store_memory=object_store_mb * 2**20, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    return True


def run_ray(sources: list[Source], writer: Writer, decoder: str | Decoder, dtype: torch.dtype | None,
            output_format: OutputFormat, batch_size: int, report: BatchReport, progress: Progress,
            actors: int | None = None, actor_cpus: float | None = None, fail_after: int | None = None) -> None:
    """Decodes every source on the running Ray cluster into ``writer``, filling ``report``."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), resources.get("CPU", 1)
    actor_cpus = 1.0 if actor_cpus is None else actor_cpus
    if actors is None:  # every GPU, or all CPUs but one (left to the read tasks)
        actors = gpus if gpus else max(1, int((cpus - 1) // actor_cpus))
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    finished = frozenset(writer.done)
    dataset = ray.data.from_items([{"source": source.to_json()} for source in sources],
                                  override_num_blocks=max(1, min(len(sources), 10 * actors)))
    dataset = dataset.flat_map(_unit_rows, fn_kwargs={"batch_size": batch_size, "finished": finished},
                               num_cpus=0.5)
    dataset = dataset.map_batches(
        DecodeActor, batch_size=1, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if gpus else 0, num_cpus=actor_cpus,
        fn_constructor_kwargs={"decoder": decoder, "dtype": dtype, "output_format": output_format,
                               "threads": max(1, int(actor_cpus)), "fail_after": fail_after,
                               "fault_marker": str(Path(writer.output_dir) / FAULT_MARKER),
                               "cli_words": wording.speaking_cli()},
    )
    workers = set()
    seen: set[str] = set()
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in batch.to_pylist():
            if row["id"] in seen:  # a retried unit delivered twice: written once already
                continue
            seen.add(row["id"])
            report.read_seconds += row["read_seconds"]
            report.decode_seconds += row["decode_seconds"]
            report.write_seconds += row["write_seconds"]
            if row["status"] == "done":
                workers.add(row["worker"])
                start = time.perf_counter()
                wrote = writer.write(row["id"], row["data"], row["shape"], row["suffix"])
                report.write_seconds += time.perf_counter() - start
                progress.update(done=int(wrote), skipped=int(not wrote))
            elif row["status"] == "skipped":
                progress.update(skipped=1)
            else:
                writer.fail(row["id"], row["reason"])
                progress.update(failed=1)
    report.workers = [f"{actors} Ray actor(s) on {', '.join(sorted(workers)) or '-'}"]
