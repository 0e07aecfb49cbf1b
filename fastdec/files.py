"""Writing files so that a killed process never leaves a partial one behind (checkpoints, latent caches, batch
outputs, manifests)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[Path], None], durable: bool = True) -> None:
    """``write(tmp)`` then rename over ``path``: readers see the old file or the whole new one, never a partial one.

    ``durable`` also fsyncs the data before the rename, so the file survives a power loss, not only a killed
    process. The temporary name is unique per process and thread, so threads may write side by side."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
