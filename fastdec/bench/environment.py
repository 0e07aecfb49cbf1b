"""Device, driver and library versions of a run."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

import fastdec
from fastdec import ops
from fastdec.machine import cpu_name


def environment(device: torch.device) -> dict:
    """Device, driver and library versions, for comparing runs."""
    from fastdec.kernels.support.triton_import import TRITON_IMPORT_ERROR, triton

    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    info = {"type": device.type, "torch_threads": torch.get_num_threads(), "cpu": cpu_name(),
            "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(name=properties.name, capability=f"{properties.major}.{properties.minor}",
                    memory_bytes=properties.total_memory, driver=nvidia_driver(), cuda=torch.version.cuda,
                    cudnn_benchmark=torch.backends.cudnn.benchmark)
    else:
        info.update(name=info["cpu"], driver=None, cuda=None)
    return {
        "device": info,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "triton": triton.__version__ if TRITON_IMPORT_ERROR is None else None,
                     "diffusers": diffusers_version, "fastdec": fastdec.__version__},
        "fastdec_backends": ops.backends(),
        "interpreter": {"FASTDEC_TRITON_INTERPRET": os.environ.get("FASTDEC_TRITON_INTERPRET"),
                        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET")},
    }


def nvidia_driver() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10, check=True)
        return next(iter(result.stdout.split()), None)  # the first GPU's; None when nvidia-smi prints nothing
    return None


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (None where the OS has none)."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_load(start: list[float] | None, end: list[float] | None, threads: int,
                 busy_at_start: float | None = None) -> dict:
    """The load during a run and whether the machine was busy: other processes held half a core or more at the
    start (``busy_at_start``, from busy_cores; else a load average of 1 or more, which trails by a minute), or the
    load at the end exceeds what this run's own threads account for by a core."""
    busy = None
    if start is not None and end is not None:
        before = busy_at_start >= 0.5 if busy_at_start is not None else start[0] >= 1.0
        busy = before or end[0] - threads >= 1.0
    return {"start": start, "end": end, "cpu_count": os.cpu_count(), "torch_threads": threads, "busy": busy,
            "busy_cores_at_start": None if busy_at_start is None else round(busy_at_start, 2)}


def busy_cores(seconds: float = 0.5) -> float | None:
    """How many cores other processes keep busy right now: /proc/stat's busy share over ``seconds`` (this process
    sleeps meanwhile), times the core count. None where there is no /proc/stat. Unlike the load average, which
    trails by a minute, it sees a job that just ended as ended and one that just started as running."""
    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    return None if total <= 0 else (os.cpu_count() or 1) * (1 - (idle1 - idle0) / total)


def auto_threads(busy: float | None, threads: int) -> int:
    """torch CPU threads for a run that starts while other processes keep ``busy`` cores busy: the idle cores, at
    least 1, at most ``threads``. More threads than idle cores make OpenMP's threads spin at barriers, waiting for a
    thread the OS has descheduled: a run at load 3-5 on 2 cores took 6.7x its idle time with 2 threads."""
    if busy is None:
        return threads
    idle = (os.cpu_count() or 1) - busy
    return max(1, min(threads, int(idle + 0.5)))
