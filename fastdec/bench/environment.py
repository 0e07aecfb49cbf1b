"""Device, driver and library versions of a run."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path

import torch

import fastdec
from fastdec import ops


def environment(device: torch.device) -> dict:
    """Device, driver and library versions, for comparing runs."""
    from fastdec.kernels._triton import TRITON_IMPORT_ERROR, triton

    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    info = {"type": device.type, "torch_threads": torch.get_num_threads(), "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(name=properties.name, capability=f"{properties.major}.{properties.minor}",
                    memory_bytes=properties.total_memory, driver=_nvidia_driver(), cuda=torch.version.cuda,
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


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _nvidia_driver() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10, check=True)
        return result.stdout.strip().splitlines()[0]
    return None


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (None where the OS has none)."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_load(start: list[float] | None, end: list[float] | None, threads: int) -> dict:
    """The load during a run and whether the machine was busy: another process held about a core or more at the
    start, or the load at the end exceeds what this run's own threads account for by a core."""
    busy = None
    if start is not None and end is not None:
        busy = start[0] >= 1.0 or end[0] - threads >= 1.0
    return {"start": start, "end": end, "cpu_count": os.cpu_count(), "torch_threads": threads, "busy": busy}


def auto_threads(load: list[float] | None, threads: int) -> int:
    """torch CPU threads for a run that starts at ``load``: the cores other processes leave idle, at least 1, at most
    ``threads``. More threads than idle cores make OpenMP's threads spin at barriers, waiting for a thread the OS
    has descheduled: a run at load 3-5 on 2 cores took 6.7x its idle time with 2 threads."""
    if load is None:
        return threads
    idle = (os.cpu_count() or 1) - load[0]
    return max(1, min(threads, int(idle + 0.5)))
