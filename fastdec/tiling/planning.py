"""Planning a tiled decode: the decoder probed on the meta device for its pixels per latent row and its peak
memory, the slab height for a tile size, and the automatic tile size when an untiled decode would not fit."""

from __future__ import annotations

import contextlib
import logging
import weakref
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fastdec import wording
from fastdec.tiling.slab import TileError
from fastdec.validate import weights_device_and_dtype

logger = logging.getLogger("fastdec")
_FACTORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PEAK_PER_LATENT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _meta_decode(decoder: nn.Module, shape: tuple[int, ...], dtype: torch.dtype,
                 mode: TorchDispatchMode | None = None) -> Tensor:
    """The decoder's output for latents of this shape, run on the meta device (nothing is computed), inside
    ``mode`` when given."""
    from torch.func import functional_call

    # Out of inference mode (fastdec batch decodes in it): functional_call swaps tensors in, which needs the
    # version counters that inference tensors lack.
    with torch.inference_mode(False), torch.no_grad():
        state = {name: torch.empty_like(v, device="meta") for name, v in decoder.state_dict().items()}
        meta = torch.empty(shape, dtype=dtype, device="meta")
        with mode or contextlib.nullcontext():
            return functional_call(decoder, state, (meta,))


def spatial_factor(decoder: nn.Module, latents: Tensor) -> int:
    """Pixels per latent row: the decoder run on the meta device at the latents' shape (nothing is computed)."""
    key = (tuple(latents.shape[1:]), latents.dtype)
    cached = _FACTORS.setdefault(decoder, {})
    if key not in cached:
        out = _meta_decode(decoder, latents.shape, latents.dtype)
        rows_in, rows_out = latents.shape[-2], out.shape[-2]
        if rows_out % rows_in:
            raise TileError(f"{type(decoder).__name__} maps {rows_in} latent rows to {rows_out}: not a whole factor")
        cached[key] = rows_out // rows_in
    return cached[key]


def latent_tile_rows(decoder: nn.Module, latents: Tensor, tile_size: int) -> int:
    """Latent rows per slab for a tile of ``tile_size`` pixel rows (a multiple of the decoder's pixel factor)."""
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1:
        raise TileError(f"tile_size must be a positive number of pixel rows, got {tile_size!r}")
    factor = spatial_factor(decoder, latents)
    if tile_size % factor:
        raise TileError(
            f"tile_size {tile_size} is not a multiple of {type(decoder).__name__}'s latent-to-pixel factor {factor}:"
            f" use a multiple of {factor}, e.g. {max(factor, tile_size // factor * factor)}"
        )
    return tile_size // factor


class _PeakBytes(TorchDispatchMode):
    """Live bytes of the tensors ops create (meta tensors: nothing is computed), and their peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and not func._schema.is_mutable:
            for t in tree_flatten(out)[0]:
                if isinstance(t, Tensor):
                    nbytes = t.numel() * t.element_size()
                    self.live += nbytes
                    weakref.finalize(t, self._free, nbytes)
            self.peak = max(self.peak, self.live)
        return out


def estimate_decode_bytes(decoder: nn.Module, latents: Tensor) -> int:
    """Estimated peak extra memory of an untiled decode of ``latents``: the decoder is run once on the meta device
    at a small size per latent shape (cached), and the peak of live activations scaled by the latent area."""
    probe_rows = 16
    key = (tuple(latents.shape[1:-2]), latents.dtype)
    cached = _PEAK_PER_LATENT.setdefault(decoder, {})
    if key not in cached:
        counter = _PeakBytes()
        _meta_decode(decoder, (1, *latents.shape[1:-2], probe_rows, probe_rows), latents.dtype, counter)
        cached[key] = counter.peak / probe_rows**2
    return int(cached[key] * latents.shape[0] * latents.shape[-2] * latents.shape[-1])


def free_device_bytes(device: torch.device) -> int | None:
    """Free memory on a CUDA device (free + cached by torch's allocator), or on the CPU the host memory this process
    may still take (MemAvailable, and the cgroup's limit where one is set: a container's); None where unknown. On
    the CPU slabs lower the peak too: the activations of one slab are far larger than its share of the image."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return host_available_bytes() if device.type == "cpu" else None


def host_available_bytes() -> int | None:
    """Host memory available to this process: /proc/meminfo's MemAvailable, capped by the cgroup v2 limit
    (memory.max - memory.current) when there is one; None without /proc."""
    available = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            left = int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = left if available is None else min(available, left)
    return available


def auto_tile_size(decoder: nn.Module, latents: Tensor, free_bytes: int | None = None) -> int | None:
    """A tile size (pixel rows) when the untiled decode would not fit in ``free_bytes`` (default: the free memory
    of the decoder's device), else None. Says so in a log line."""
    if torch.compiler.is_compiling():  # host-side planning is not traced: a compiled decode is never auto-tiled
        return None
    device, _ = weights_device_and_dtype(decoder)
    need = estimate_decode_bytes(decoder, latents)  # cached per latent shape: host arithmetic only
    if free_bytes is None and device.type == "cuda":
        # What torch's allocator already holds free is known without asking the driver: a repeated decode fits
        # there, so only a decode larger than that pays for torch.cuda.mem_get_info.
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        if need <= 0.9 * cached:
            return None
    free_bytes = free_device_bytes(device) if free_bytes is None else free_bytes
    if free_bytes is None or need <= 0.9 * free_bytes:
        return None
    h = latents.shape[-2]
    rows = int(h * 0.5 * free_bytes / need)
    factor = spatial_factor(decoder, latents)
    if rows < 1:
        raise TileError(
            f"decoding latents {tuple(latents.shape)} needs about {need / 2**30:.2f} GiB untiled and "
            f"{need / h / 2**30:.2f} GiB even in slabs of {factor} pixel rows, with {free_bytes / 2**30:.2f} GiB free "
            f"on {device}: decode fewer latents at a time (a smaller batch or image), or free memory"
        )
    logger.warning(
        "fastdec: an untiled decode of latents %s needs about %.2f GiB, %.2f GiB free on %s: decoding exactly in "
        "slabs of %d pixel rows (%s=...) instead", tuple(latents.shape), need / 2**30, free_bytes / 2**30,
        device, rows * factor, wording.tile_size_option(),
    )
    return rows * factor

