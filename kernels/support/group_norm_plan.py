"""How group_norm_act splits a call into programs (kernels/group_norm_act.py runs the plan): the tile shape, long
along the axis contiguous in memory, and the spatial chunks that give batch-1 calls (32 groups) enough programs to
fill the GPU. Pure Python, no kernels: the launcher, tests and bench/compile_check.py read the same plan."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from fastdec.kernels.support.norm import group_tile_shape
from fastdec.kernels.support.triton_import import cdiv, next_power_of_2

MIN_CHUNK_ELEMENTS = 4096  # a split-path program handles at least this many elements (amortizes the combine)
COMBINE_GROUPS, COMBINE_CHUNKS = 16, 64  # combine pass: groups per program, partials per step
_CPU_PROGRAM_TARGET = 4  # the interpreter runs programs one after another: a few large ones are fastest


class LaunchPlan(NamedTuple):
    """Tile shape and split of one call: programs = batch * num_group_blocks * num_chunks per pass."""

    block_g: int
    block_cg: int
    block_s: int
    num_group_blocks: int
    chunk_size: int  # spatial positions per program
    num_chunks: int


@functools.lru_cache(maxsize=1024)  # pure in its int arguments; a decode asks again for the same few shapes
def plan_launch(
    batch: int,
    groups: int,
    group_channels: int,
    spatial: int,
    channels_contiguous: bool,
    target_programs: int,
    chunk_size: int | None = None,
) -> LaunchPlan:
    """Splits each group's positions into chunks until about `target_programs` programs exist (batch 1 has only
    32 groups), keeping at least MIN_CHUNK_ELEMENTS per program; chunks are whole tiles where possible."""
    block_g, block_cg, block_s = group_tile_shape(groups, group_channels, spatial, channels_contiguous)
    num_group_blocks = cdiv(groups, block_g)
    if chunk_size is None:
        wanted = cdiv(target_programs, batch * num_group_blocks)
        most = max(1, spatial * block_g * group_channels // MIN_CHUNK_ELEMENTS)
        chunk_size = cdiv(spatial, min(wanted, most))
        if chunk_size < block_s:
            chunk_size = next_power_of_2(chunk_size)
        else:
            chunk_size = cdiv(chunk_size, block_s) * block_s
    chunk_size = min(chunk_size, spatial)
    if chunk_size < block_s:  # short chunks: narrower, taller tiles over the same groups
        _, block_cg, block_s = group_tile_shape(block_g, group_channels, chunk_size, channels_contiguous)
    return LaunchPlan(block_g, block_cg, block_s, num_group_blocks, chunk_size, cdiv(spatial, chunk_size))


def program_target(device: torch.device) -> int:
    if device.type != "cuda":
        return _CPU_PROGRAM_TARGET
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count
