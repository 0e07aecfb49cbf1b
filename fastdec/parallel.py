"""Exact patch-parallel decoding across the ranks of a torch.distributed process group.

The decomposition is fastdec.tiling's (one rule per op, the same for every decoder family); only the executor
differs: rank r holds slab r of every activation (rows of the height axis), takes its convolution halos from ranks
r - 1 and r + 1 by send/recv, all-reduces the GroupNorm statistics, and all-gathers the few tensors that must be
seen whole (attention at latent resolution). The result equals the single-process decode up to float reduction
order. NCCL on GPUs (one GPU per rank), gloo on CPU.

Launch one process per GPU with torchrun; every rank passes the same decoder and the same latents::

    torchrun --nproc-per-node 4 -m fastdec.parallel latents.safetensors --decoder flux -o out/

or from your own script (after ``torch.distributed.init_process_group``)::

    images = fastdec.parallel.decode(decoder, latents)   # the image on rank 0, None on the others
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastdec.pixels import to_uint8_hwc
from fastdec.tiling import Executor, SlabTensor, TiledRun, TileError, even_bounds, run_decode, zeros_rows
from fastdec.tiling.executors import assemble_rows
from fastdec.validate import check_latents, weights_device_and_dtype

OUTPUTS = ("rank0", "all", "sharded")


@dataclass
class Shard:
    """This rank's rows ``rows[0]:rows[1]`` of the decoded image (``output="sharded"``)."""

    image: Tensor
    rows: tuple[int, int]
    height: int


class RankSlabs(Executor):
    """Rank r of the group holds slab r; halos travel to the neighbouring ranks, statistics are all-reduced."""

    def __init__(self, group: dist.ProcessGroup | None, device: torch.device):
        self.group, self.device = group, torch.device(device)
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)

    def _peer(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def local(self, tiles: int) -> list[int]:
        if tiles != self.world:
            raise TileError(f"{tiles} slabs for {self.world} ranks: a parallel decode has one slab per rank")
        return [self.rank]

    def rows(self, x: SlabTensor, needs: list[tuple[int, int]]) -> Iterator[tuple[int, Tensor]]:
        r, b, hdim = self.rank, x.bounds, x.hdim
        part, last = x.parts[r], self.world - 1
        start, stop = needs[r]
        ops, received = [], {}  # first row -> the rows received from a neighbour

        def rows_of_mine(lo: int, hi: int) -> Tensor:
            return part.narrow(hdim, lo - b[r], hi - lo).contiguous()

        # Halos are within the neighbouring slabs (TiledRun.check_halo): send what each neighbour needs from me.
        if r > 0 and needs[r - 1][1] > b[r]:
            ops.append(dist.P2POp(dist.isend, rows_of_mine(b[r], min(needs[r - 1][1], b[r + 1])), self._peer(r - 1),
                                  self.group))
        if r < last and needs[r + 1][0] < b[r + 1]:
            ops.append(dist.P2POp(dist.isend, rows_of_mine(max(needs[r + 1][0], b[r]), b[r + 1]), self._peer(r + 1),
                                  self.group))
        for peer, lo, hi in ((r - 1, max(start, b[r - 1] if r else 0), b[r]),
                             (r + 1, b[r + 1], min(stop, b[min(r + 2, last + 1)]))):
            if 0 <= peer <= last and lo < hi:
                shape = list(part.shape)
                shape[hdim] = hi - lo
                received[lo] = part.new_empty(shape)
                ops.append(dist.P2POp(dist.irecv, received[lo], self._peer(peer), self.group))
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        # The rows held here now, top to bottom, as slabs of their own (zeros beyond the image, as on one device).
        held = sorted({**received, b[r]: part}.items())
        bounds = (*(lo for lo, _ in held), held[-1][0] + held[-1][1].shape[hdim])
        yield r, assemble_rows(dict(enumerate(rows for _, rows in held)), bounds, hdim, start, stop, lambda t: t)

    def all_reduce(self, tensor: Tensor) -> Tensor:
        dist.all_reduce(tensor, group=self.group)
        return tensor

    def _padded(self, x: SlabTensor) -> Tensor:
        """This rank's slab padded to the tallest slab's rows (collectives need equal shapes)."""
        tallest = max(hi - lo for lo, hi in pairwise(x.bounds))
        part = x.parts[self.rank]
        pad = tallest - part.shape[x.hdim]
        if pad:
            part = torch.cat([part, zeros_rows(part, x.hdim, pad)], x.hdim)
        return part.contiguous()

    def _joined(self, x: SlabTensor, padded: list[Tensor]) -> Tensor:
        return torch.cat([p.narrow(x.hdim, 0, hi - lo) for p, (lo, hi) in zip(padded, pairwise(x.bounds),
                                                                              strict=True)], x.hdim)

    def gather(self, x: SlabTensor) -> Tensor:
        part = self._padded(x)
        padded = [torch.empty_like(part) for _ in range(self.world)]
        dist.all_gather(padded, part, group=self.group)
        return self._joined(x, padded)

    def gather_to(self, x: SlabTensor, dst: int) -> Tensor | None:
        part = self._padded(x)
        padded = [torch.empty_like(part) for _ in range(self.world)] if self.rank == dst else None
        dist.gather(part, padded, dst=self._peer(dst), group=self.group)
        return self._joined(x, padded) if self.rank == dst else None


def decode(
    decoder: nn.Module,
    latents: Tensor,
    group: dist.ProcessGroup | None = None,
    output: str = "rank0",
    check_finite: bool | None = None,
) -> Tensor | Shard | None:
    """``decoder.decode(latents)`` split across the ranks of ``group`` (default: the world), one slab of latent
    rows per rank. Every rank calls it with the same decoder and latents, on its own device (NCCL: one GPU each).

    ``output``: "rank0" returns the image on rank 0 and None elsewhere; "all" returns it on every rank; "sharded"
    returns each rank's ``Shard`` (its rows of the image) without any gather."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "fastdec.parallel.decode needs an initialised torch.distributed process group: launch with torchrun "
            "and call torch.distributed.init_process_group (nccl on GPUs, gloo on CPU) first"
        )
    if output not in OUTPUTS:
        raise ValueError(f"unknown output {output!r}: choose one of {OUTPUTS}")
    check_latents(latents, decoder, check_finite)
    world, rows = dist.get_world_size(group), latents.shape[-2]
    if world > rows:
        raise TileError(
            f"world size {world} is larger than the number of latent rows {rows}: every rank needs at least one "
            f"latent row; run on at most {rows} ranks"
        )
    device, _ = weights_device_and_dtype(decoder)
    executor = RankSlabs(group, device)
    run = TiledRun(executor, rows, even_bounds(rows, world))
    image = run_decode(decoder, latents, run)
    if not isinstance(image, SlabTensor):  # the decoder's last op was whole (replicated on every rank)
        image = run.scatter(image, run.bounds_for(image.shape[-2]) or even_bounds(image.shape[-2], world),
                            image.dim() - 2)
    if output == "sharded":
        r = executor.rank
        return Shard(image.parts[r], (image.bounds[r], image.bounds[r + 1]), image.bounds[-1])
    if output == "all":
        return executor.gather(image)
    return executor.gather_to(image, 0)


def main(argv: list[str] | None = None) -> int:
    """torchrun entry point: decode a latents file across the ranks; rank 0 writes the PNGs."""
    import fastdec
    from fastdec.api import default_decoder_name, default_dtype
    from fastdec.latents_io import read_latents

    parser = argparse.ArgumentParser(prog="python -m fastdec.parallel", description=main.__doc__)
    parser.add_argument("latents", help="latents file (.safetensors, .pt, .npy, .npz), (C, h, w) or (B, C, h, w)")
    parser.add_argument("--decoder", help="name or path (default: the TAESD decoder for the channel count)")
    parser.add_argument("--key", help="the tensor to decode in a file holding several")
    parser.add_argument("-o", "--output-dir", default=".", help="folder for <stem>_000.png, ... (default: .)")
    parser.add_argument("--backend", help="nccl or gloo (default: nccl with CUDA, else gloo)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    owns_group = not dist.is_initialized()  # torchrun: we start the group; a caller may have started it already
    if owns_group:
        dist.init_process_group(args.backend or ("nccl" if cuda else "gloo"))
    try:
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(device)
        latents = read_latents(Path(args.latents), args.key)
        latents = latents.unsqueeze(0) if latents.dim() == 3 else latents
        dtype = default_dtype(device)
        decoder = fastdec.load(args.decoder or default_decoder_name(latents.shape[1]), device=device, dtype=dtype)
        images = decode(decoder, latents.to(device, dtype))
        if images is not None:
            output_dir = Path(args.output_dir)
            output_dir.mkdir(parents=True, exist_ok=True)
            pixels = to_uint8_hwc(images).cpu().numpy()
            from PIL import Image

            for index, array in enumerate(pixels):
                path = output_dir / f"{Path(args.latents).stem}_{index:03d}.png"
                Image.fromarray(array).save(path)
                print(path)
    finally:
        if owns_group:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
