"""The slab tensor: a tensor held as row slabs of its height axis, and the small helpers every tiling module uses."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

Bounds = tuple[int, ...]  # slab boundaries along the height axis: 0 = b_0 < b_1 < ... < b_n = rows


class TileError(ValueError):
    """A tiling that cannot be exact: slabs smaller than an op's halo, or a bad tile size / world size."""


def even_bounds(rows: int, tiles: int) -> Bounds:
    """``tiles`` slabs of ``rows`` rows, as equal as possible (sizes differ by at most one)."""
    if not 1 <= tiles <= rows:
        raise TileError(f"cannot split {rows} latent rows into {tiles} slabs: need 1 <= slabs <= rows")
    return tuple(i * rows // tiles for i in range(tiles + 1))


class SlabTensor(Tensor):
    """A tensor split into row slabs along axis ``hdim``: ``parts[t]`` holds rows ``bounds[t]:bounds[t+1]`` (only
    the slabs this executor holds). Reports the global shape, dtype and the compute device; its ops run only inside
    a ``TiledRun``."""

    parts: dict[int, Tensor]
    bounds: Bounds
    hdim: int

    @staticmethod
    def __new__(cls, parts: dict[int, Tensor], bounds: Bounds, hdim: int, shape, dtype, device):
        self = Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device, requires_grad=False)
        self.parts, self.bounds, self.hdim = parts, tuple(bounds), hdim
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __repr__(self) -> str:
        return f"SlabTensor(shape={tuple(self.shape)}, bounds={self.bounds}, hdim={self.hdim})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(
            f"{func} on a SlabTensor outside its tiling run: slab tensors exist only inside tiled_decode / "
            "fastdec.parallel.decode, which return plain tensors"
        )


def is_slab(x) -> bool:
    """True for a SlabTensor (a tensor held as slabs), False for a whole tensor or any other value."""
    return isinstance(x, SlabTensor)


def zeros_rows(like: Tensor, hdim: int, count: int) -> Tensor:
    """``count`` rows of zeros shaped like ``like`` along ``hdim`` (the zero padding beyond the image border)."""
    shape = list(like.shape)
    shape[hdim] = count
    return like.new_zeros(shape)


def meta_like(x):
    """An empty meta tensor shaped like x (other values as they are)."""
    return torch.empty(x.shape, dtype=x.dtype, device="meta") if isinstance(x, Tensor) else x


def meta_run(func, args, kwargs):
    """func on meta tensors shaped like its arguments: the output's shape and dtype, nothing computed."""
    return func(*tree_map(meta_like, args), **tree_map(meta_like, kwargs))

