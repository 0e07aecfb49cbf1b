"""The tiled run: a dispatch mode (TiledRun) that sends every op on slabs to its rule (or runs it locally, or whole)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from itertools import pairwise

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from fastdec import wording
from fastdec.tiling.executors import Executor, HostTiles
from fastdec.tiling.local_rules import LOCAL_OPS, LOCAL_RULES, local_op
from fastdec.tiling.norm_rules import NORM_RULES
from fastdec.tiling.slab import Bounds, SlabTensor, TileError, is_slab
from fastdec.tiling.spatial_rules import SPATIAL_RULES

logger = logging.getLogger("fastdec")
RULES: dict = {**LOCAL_RULES, **SPATIAL_RULES, **NORM_RULES}  # op -> rule(run, func, args, kwargs)

_ACTIVE: list[TiledRun | None] = []  # None: an untiled() block


def tiling_active() -> bool:
    """True inside a tiled or parallel decode (so a Decoder does not tile again)."""
    return bool(_ACTIVE)


class TiledRun(TorchDispatchMode):
    """Runs a module's ops on slabs (see the fastdec.tiling docstring). ``latent_bounds`` is the slab split at latent
    resolution; whole tensors whose height is a multiple or divisor of the latent height are split the same way."""

    def __init__(self, executor: Executor, latent_rows: int, latent_bounds: Bounds):
        super().__init__()
        self.executor, self.latent_rows, self.latent_bounds = executor, latent_rows, tuple(latent_bounds)
        self.gathers: list[tuple[str, tuple[int, ...]]] = []  # (op, shape) of every gathered tensor

    def __enter__(self):
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = RULES.get(func)
        if rule is not None:
            return rule(self, func, args, kwargs)
        flat, _ = tree_flatten((args, kwargs))
        if not any(is_slab(a) for a in flat):
            return func(*args, **kwargs)
        if torch.Tag.pointwise in func.tags or func in LOCAL_OPS:
            return local_op(self, func, args, kwargs)
        return self.gathered(func, args, kwargs)

    # -- building blocks used by the rules --

    def slab(self, parts: dict[int, Tensor], bounds: Bounds, hdim: int, shape, dtype) -> SlabTensor:
        return SlabTensor(parts, bounds, hdim, shape, dtype, self.executor.device)

    def gather(self, x: SlabTensor, why: str) -> Tensor:
        self.gathers.append((why, tuple(x.shape)))
        logger.debug("tiling: gathering %s for %s", tuple(x.shape), why)
        return self.executor.gather(x)

    def gathered(self, func, args, kwargs):
        """Fallback: run ``func`` on whole tensors."""
        args, kwargs = tree_map(lambda a: self.gather(a, str(func)) if is_slab(a) else a, (args, kwargs))
        return func(*args, **kwargs)

    def scatter(self, whole: Tensor, bounds: Bounds, hdim: int) -> SlabTensor:
        """A whole tensor (the same on every executor) split into slabs."""
        parts = {t: self.executor.keep(whole.narrow(hdim, bounds[t], bounds[t + 1] - bounds[t]).clone())
                 for t in self.executor.local(len(bounds) - 1)}
        return self.slab(parts, bounds, hdim, whole.shape, whole.dtype)

    def bounds_for(self, rows: int, align: int = 1) -> Bounds | None:
        """The latent split scaled to a tensor of ``rows`` rows (boundaries on multiples of ``align``), or None."""
        h = self.latent_rows
        if rows % h and h % rows:
            return None
        bounds = (*(round(b * rows / h / align) * align for b in self.latent_bounds[:-1]), rows)
        return None if any(lo >= hi for lo, hi in pairwise(bounds)) else bounds

    def as_slab(self, x, hdim: int, align: int = 1):
        """x itself if it is a slab; a whole tensor split like the latents when its height allows, else None."""
        if is_slab(x):
            return x
        if isinstance(x, Tensor) and x.dim() > hdim:
            bounds = self.bounds_for(x.shape[hdim], align)
            if bounds is not None:
                return self.scatter(x, bounds, hdim)
        return None

    def check_halo(self, x: SlabTensor, needs: list[tuple[int, int]], what: str) -> None:
        """Every slab's needed rows (clipped to the image) must lie in itself and its two neighbours."""
        bounds, total = x.bounds, x.bounds[-1]
        tiles = len(bounds) - 1
        for t, (start, stop) in enumerate(needs):
            lo, hi = max(start, 0), min(stop, total)
            first, last = bounds[max(t - 1, 0)], bounds[min(t + 2, tiles)]
            if lo < first or hi > last:
                smallest = min(b - a for a, b in pairwise(bounds))
                raise TileError(
                    f"tiles too small for {what}: slab {t} of its input (rows {bounds[t]}:{bounds[t + 1]} of "
                    f"{total}, the smallest slab has {smallest} rows) needs rows {start}:{stop}, beyond its "
                    f"neighbouring slabs: use a larger {wording.tile_size_option()} (or fewer ranks) so that every "
                    "slab is at least as tall as the op's halo"
                )

    def stencil(self, x: SlabTensor, out_bounds: Bounds, needs: list[tuple[int, int]], compute, shape, dtype,
                what: str) -> SlabTensor:
        """Slab t of the output = compute(rows needs[t] of x, t)."""
        if any(lo >= hi for lo, hi in pairwise(out_bounds)):
            raise TileError(
                f"tiles too small for {what}: an output slab would be empty (slab bounds {out_bounds}); use a "
                f"larger {wording.tile_size_option()} or fewer ranks"
            )
        self.check_halo(x, needs, what)
        parts = {}
        for t, rows in self.executor.rows(x, needs):
            out = compute(rows, t)
            if isinstance(self.executor, HostTiles):
                self.executor.note(rows, out)
            parts[t] = self.executor.keep(out)
        return self.slab(parts, out_bounds, x.hdim, shape, dtype)


@contextlib.contextmanager
def untiled() -> Iterator[None]:
    """Inside this block Decoder.decode ignores its ``tile_size`` attribute (an explicit tile_size=0)."""
    _ACTIVE.append(None)
    try:
        yield
    finally:
        _ACTIVE.pop()
