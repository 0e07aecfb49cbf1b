"""The local engine: one process, three overlapped stages joined by bounded queues.

* a reader thread reads sources into units (``reader.read_source``) and drops units already finished;
* one decode thread per device (every GPU, or the CPU) decodes units while the previous ones are encoded;
* ``workers`` encode+write threads turn pixels into image files through the Writer (PIL and zlib release the GIL).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable

import torch

from fastdec.batch.reader import Source, read_source
from fastdec.batch.work import OutputFormat, decode_unit
from fastdec.batch.writer import BatchReport, Progress, Writer
from fastdec.models.base import Decoder

_END = object()


class _Stopped(Exception):
    """Another thread failed: this one stops too."""


class _Stages:
    """Busy seconds per stage and the first error of any thread (which stops the job)."""

    def __init__(self) -> None:
        self.seconds = {"read": 0.0, "decode": 0.0, "write": 0.0}
        self.error: BaseException | None = None
        self.lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self.lock:
            self.seconds[stage] += seconds

    def run(self, body: Callable[[], None]) -> Callable[[], None]:
        def guarded() -> None:
            try:
                body()
            except _Stopped:
                pass
            except BaseException as error:  # noqa: BLE001 - handed to the main thread, which re-raises it
                with self.lock:
                    self.error = self.error or error
        return guarded

    # queue operations that give up once any thread failed, so that no thread waits forever on a dead one
    def put(self, channel: queue.Queue, item: object) -> None:
        while self.error is None:
            try:
                return channel.put(item, timeout=0.2)
            except queue.Full:
                pass
        raise _Stopped

    def get(self, channel: queue.Queue) -> object:
        while self.error is None:
            try:
                return channel.get(timeout=0.2)
            except queue.Empty:
                pass
        raise _Stopped


def run_local(sources: list[Source], writer: Writer, decoders: list[tuple[torch.device, Decoder]],
              output_format: OutputFormat, batch_size: int, report: BatchReport, progress: Progress,
              workers: int = 2, fail_after: int | None = None) -> None:
    """Decodes every source into ``writer``, filling ``report``; ``fail_after`` k: the process exits (as if killed)
    after writing k items, to test resuming."""
    stages = _Stages()
    units: queue.Queue = queue.Queue(maxsize=2 * len(decoders) + 1)
    images: queue.Queue = queue.Queue(maxsize=2 * workers)
    written = [0]

    def read() -> None:
        for source in sources:
            for unit in read_source(source, batch_size):
                stages.add("read", unit.read_seconds)
                if unit.error is not None:
                    for item_id in unit.ids:
                        writer.fail(item_id, unit.error)
                    progress.update(failed=len(unit.ids))
                elif all(writer.is_done(item_id) for item_id in unit.ids):
                    progress.update(skipped=len(unit.ids))
                else:
                    stages.put(units, unit)  # decoded whole even when partly finished: same batch, same bytes
        for _ in decoders:
            stages.put(units, _END)

    def decode(device: torch.device, decoder: Decoder) -> None:
        while (unit := stages.get(units)) is not _END:
            start = time.perf_counter()
            with torch.inference_mode():
                ids, pixels, failures = decode_unit(decoder, unit, device)
            stages.add("decode", time.perf_counter() - start)
            for item_id, reason in failures:
                writer.fail(item_id, reason)
            progress.update(failed=len(failures))
            if ids:
                stages.put(images, (ids, pixels, list(unit.latents.shape[1:])))

    def write() -> None:
        while (work := stages.get(images)) is not _END:
            ids, pixels, shape = work
            for item_id, image in zip(ids, pixels, strict=True):
                if writer.is_done(item_id):
                    progress.update(skipped=1)
                    continue
                start = time.perf_counter()
                writer.write(item_id, output_format.encode(image), shape, output_format.suffix_of(image))
                stages.add("write", time.perf_counter() - start)
                progress.update(done=1)
                with stages.lock:
                    written[0] += 1
                    if fail_after is not None and written[0] >= fail_after:
                        os._exit(3)  # fault injection: die like a killed process, no cleanup

    threads = [threading.Thread(target=stages.run(read), name="fastdec-read", daemon=True)]
    threads += [threading.Thread(target=stages.run(lambda d=device, m=model: decode(d, m)),
                                 name=f"fastdec-decode-{device}", daemon=True) for device, model in decoders]
    writers = [threading.Thread(target=stages.run(write), name=f"fastdec-write-{i}", daemon=True)
               for i in range(workers)]
    for thread in threads + writers:
        thread.start()
    try:
        for thread in threads:
            thread.join()
        try:
            for _ in writers:
                stages.put(images, _END)
        except _Stopped:
            pass
        for thread in writers:
            thread.join()
    except KeyboardInterrupt as interrupt:
        # Ctrl-C: every thread stops at its next queue operation, after the unit it holds (its files are whole);
        # joined here, so that none is still in torch or PIL when the interpreter exits (SIGABRT otherwise).
        with stages.lock:
            stages.error = interrupt
        for thread in threads + writers:
            thread.join()
    if stages.error is not None:
        raise stages.error
    report.read_seconds, report.decode_seconds, report.write_seconds = (
        stages.seconds["read"], stages.seconds["decode"], stages.seconds["write"])
    report.workers = [str(device) for device, _ in decoders]
