"""Decode a whole dataset of latents: ``fastdec batch INPUT OUTPUT --decoder NAME|PATH`` and ``decode_dataset``.

INPUT is a folder of latent files (.safetensors, .pt, .npy, .npz; each one latent (C, h, w) or a batch) or Parquet
(``write_parquet`` writes the schema, documented in ``fastdec.batch.reader``). OUTPUT gets one image per latent,
named after its id (``<file stem>_000.png``, ... as ``fastdec decode`` names them; the row id for Parquet), plus
``manifest.jsonl`` and ``failures.jsonl``. Two engines, the same bytes: ``local`` (threads on this machine, one
decoder per GPU or one on the CPU) and ``ray`` (Ray Data on a local instance or the cluster at ``address``).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from fastdec.batch.reader import count_items, list_sources, write_parquet
from fastdec.batch.work import OutputFormat, job_identity, load_decoder, resolve_device
from fastdec.batch.writer import BatchReport, Progress, Writer, resumed_batch_size
from fastdec.models.base import Decoder

ENGINES = ("local", "ray")
__all__ = ["BatchReport", "JobInterrupted", "decode_dataset", "write_parquet"]


class JobInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a job cleanly: every file written is whole and listed; rerunning the same call resumes."""

    def __init__(self, finished: int, total: int):
        super().__init__(f"interrupted after {finished} of {total}; run the same command to resume")
        self.finished, self.total = finished, total


DEFAULT_BATCH_SIZE = 16


def decode_dataset(
    input: str | Path,
    output: str | Path,
    decoder: str | Decoder,
    *,
    engine: str = "local",
    image_format: str = "png",
    quality: int | None = None,
    fps: float = 16.0,
    batch_size: int | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    workers: int = 2,
    address: str | None = None,
    actors: int | None = None,
    actor_cpus: float | None = None,
    ray_num_cpus: int | None = None,
    fail_after: int | None = None,
    progress: bool = True,
) -> BatchReport:
    """Decodes every latent under ``input`` into images in ``output``; returns the report (also printed by the CLI).

    ``decoder``: a name or path (anything ``fastdec.load`` takes), or a Decoder; a video decoder for video latents
    (C, T, h, w), each written as an mp4 at ``fps`` through ``fastdec.save_video``. ``batch_size``: the most latents
    of one shape decoded together (default: the resumed job's, else 16); a file holding up to ``batch_size``
    latents decodes as one batch, as ``fastdec decode`` does. The bytes written depend on the input, the decoder,
    the output settings, the batch size and the kind of device, never on the engine, its workers, actors or
    threads, or the order and mix of shapes. ``device``/``dtype`` (local engine): default every GPU (one decoder
    each) in bf16, else the CPU in float32; ``workers``: encode+write threads. Ray: ``address`` of a cluster
    (default: start a local instance with ``ray_num_cpus``), ``actors`` decoders (default: one per GPU, else one per
    CPU but one) with ``actor_cpus`` each. ``fail_after`` k (tests): a worker exits after k items, once (the local
    engine's process; a Ray actor, which Ray restarts).

    Rerunning the same call resumes: finished outputs are skipped; what failed is retried.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: choose one of {ENGINES}")
    if batch_size is None:
        batch_size = resumed_batch_size(output) or DEFAULT_BATCH_SIZE
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if engine == "local" and (address or actors or actor_cpus or ray_num_cpus):
        raise ValueError("address, actors, actor_cpus and ray_num_cpus are options of engine='ray'")
    output_format = OutputFormat(image_format, quality, fps)
    sources, _ = list_sources(input)
    name = decoder if isinstance(decoder, str) else type(decoder).__name__
    devices = _local_devices(device) if engine == "local" else [torch.device("cpu")]  # ray: the driver's copy
    if engine == "ray" and device is not None:
        raise ValueError("device is chosen by Ray (an actor's GPU, else the CPU): drop --device")
    decoders = [(d, load_decoder(decoder, d, dtype)) for d in devices]
    writer = Writer(output, output_format.suffix, name, job_identity(decoders[0][1], output_format, batch_size),
                    batch_size)
    total = sum(count_items(source) or 1 for source in sources)
    report = BatchReport(engine=engine, decoder=name, total=total)
    meter = Progress(total, enabled=progress)
    start = time.perf_counter()
    try:
        if engine == "local":
            from fastdec.batch.local import run_local

            run_local(sources, writer, decoders, output_format, batch_size, report, meter, workers, fail_after)
        else:
            from fastdec.batch.ray_engine import init_ray, run_ray

            del decoders  # the actors load their own
            started = init_ray(address, ray_num_cpus)
            try:
                run_ray(sources, writer, decoder, dtype, output_format, batch_size, report, meter, actors,
                        actor_cpus, fail_after)
            finally:
                if started:
                    import ray

                    ray.shutdown()
    except KeyboardInterrupt:
        raise JobInterrupted(meter.done + meter.skipped, total) from None
    finally:
        writer.close()
    meter.finish()
    report.wall_seconds = time.perf_counter() - start
    report.first_output_seconds = None if meter.first_done_at is None else meter.first_done_at - start
    report.done, report.skipped, report.failed = meter.done, meter.skipped, meter.failed
    report.total = max(report.total, meter.done + meter.skipped + meter.failed)
    return report


def _local_devices(device: str | None) -> list[torch.device]:
    if device is None and torch.cuda.is_available():
        return [torch.device("cuda", index) for index in range(torch.cuda.device_count())]
    return [resolve_device(device)]
