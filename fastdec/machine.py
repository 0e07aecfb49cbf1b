"""The machine a run is on, named for reports and model cards: the CPU's model, the device's name."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU's marketing name (Linux: /proc/cpuinfo), else what the platform module knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """A CUDA device's name; for the CPU its model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_name()}, {os.cpu_count()} cores)"
