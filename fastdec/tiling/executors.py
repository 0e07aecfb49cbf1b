"""Executors: where slabs live and how halos, statistics and gathers travel (one device here; many ranks in
fastdec.parallel)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from fastdec.tiling.slab import Bounds, SlabTensor, zeros_rows


class Executor:
    """Where slabs live and how they meet: the part of tiling that differs between one device and many ranks."""

    device: torch.device

    def local(self, tiles: int) -> list[int]:
        """The slab indices held here."""
        raise NotImplementedError

    def load(self, part: Tensor) -> Tensor:
        """A held slab, on the compute device."""
        return part

    def keep(self, tensor: Tensor) -> Tensor:
        """A computed slab, to where slabs are held."""
        return tensor

    def rows(self, x: SlabTensor, needs: list[tuple[int, int]]) -> Iterator[tuple[int, Tensor]]:
        """For each held slab t, rows ``needs[t]`` of x on the compute device (zeros outside the image)."""
        raise NotImplementedError

    def settle(self) -> None:
        """Held slabs may be read by host code from here on (one device: copies still in flight are waited for)."""

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """Sum over executors (one device: the tensor itself)."""
        return tensor

    def gather(self, x: SlabTensor) -> Tensor:
        """The whole tensor on the compute device."""
        raise NotImplementedError


def assemble_rows(pieces: dict[int, Tensor], bounds: Bounds, hdim: int, start: int, stop: int,
                  fetch: Callable[[Tensor], Tensor]) -> Tensor:
    """Rows [start, stop) of a slabbed tensor from the slabs in ``pieces`` (each moved by ``fetch``); rows outside
    [0, total) are zeros (the zero padding of the true image border)."""
    total, chunks = bounds[-1], []
    any_piece = next(iter(pieces.values()))
    if start < 0:
        chunks.append(zeros_rows(fetch(any_piece.narrow(hdim, 0, 0)), hdim, -start))
    for t, part in pieces.items():
        lo, hi = max(start, bounds[t]), min(stop, bounds[t + 1])
        if lo < hi:
            chunks.append(fetch(part.narrow(hdim, lo - bounds[t], hi - lo)))
    if stop > total:
        chunks.append(zeros_rows(fetch(any_piece.narrow(hdim, 0, 0)), hdim, stop - total))
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, hdim)


class HostTiles(Executor):
    """One device: every slab is held in host memory and moved to ``device`` only while it is computed on, so
    device memory holds one slab (plus halo) at a time.

    From a CUDA device, slabs are held in pinned host memory and both copies are asynchronous (the pageable
    ``.to()`` staged every byte through a bounce buffer and stopped the host until it was done). The copies run in
    stream order with the kernels, so a slab reaches the device after it reached the host; host code that reads a
    held slab (a reshape that copies) first waits for the copies still in flight (``settle``)."""

    def __init__(self, device: torch.device):
        self.device = resolved_device(device)
        self.peak_slab_bytes = 0  # largest slab input + output moved to the device at once (bench accounting)
        self.copies_in_flight = False

    def local(self, tiles: int) -> list[int]:
        return list(range(tiles))

    def load(self, part: Tensor) -> Tensor:
        return part.to(self.device, non_blocking=part.device.type == "cpu" and self.device.type == "cuda")

    def keep(self, tensor: Tensor) -> Tensor:
        if tensor.device.type != "cuda":
            return tensor.to("cpu")
        held = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True, memory_format=_layout(tensor))
        held.copy_(tensor, non_blocking=True)
        self.copies_in_flight = True
        return held

    def settle(self) -> None:
        if self.copies_in_flight:
            torch.cuda.current_stream(self.device).synchronize()
            self.copies_in_flight = False

    def rows(self, x: SlabTensor, needs: list[tuple[int, int]]) -> Iterator[tuple[int, Tensor]]:
        for t, (start, stop) in enumerate(needs):
            yield t, assemble_rows(x.parts, x.bounds, x.hdim, start, stop, self.load)

    def gather(self, x: SlabTensor) -> Tensor:
        return torch.cat([self.load(x.parts[t]) for t in range(len(x.bounds) - 1)], x.hdim)

    def note(self, *tensors: Tensor) -> None:
        self.peak_slab_bytes = max(self.peak_slab_bytes, sum(t.numel() * t.element_size() for t in tensors))


def resolved_device(device: torch.device | str) -> torch.device:
    """``device`` with its index: ``cuda`` means the current CUDA device, as a tensor created there reports it
    (``cuda:0``), so that slabs report the device their decoder's weights are on."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _layout(tensor: Tensor) -> torch.memory_format:
    """The memory format a held copy keeps (channels_last slabs stay channels_last; anything else is packed)."""
    for fmt, ndim in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if tensor.dim() == ndim and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=fmt):
            return fmt
    return torch.contiguous_format
