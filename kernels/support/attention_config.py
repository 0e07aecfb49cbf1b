"""What the attention launcher decides before it launches: whether the call is valid (``check_attention``), the
fp32 precision, and the launch configuration, with no timing in the decode path.

A call's configuration comes from, in order:

1. the committed table ``kernels/support/attention_table.py`` (``TABLE[arch][bucket]``), which only the explicit command
   ``python bench/tune_attention.py`` writes, after timing every candidate on the GPU it runs on;
2. otherwise the heuristic: the first candidate of the padded head_dim's list whose shared memory fits the GPU
   (estimated from the tile sizes; pre-Hopper parts skip the candidates that spill there), with key splits when the
   grid would leave SMs idle (flash-decoding).

Either way the choice is a dict lookup per (device, dtype, precision, shape bucket) after the first call: no
device syncs, no compiles of rejected candidates, nothing that breaks ``torch.cuda.graph`` capture once a shape
has run. If a chosen configuration still fails to compile for lack of resources (an estimate that was off), the
launcher moves to the next candidate once and remembers it (``demote``).

Shape buckets: batch*heads, query tokens and key tokens rounded up to powers of two; so Wan's chunk lengths, the
tiling slab heights and nearby resolutions share an entry with the shape tuned for.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from fastdec.kernels.support.triton_import import cdiv, next_power_of_2

MAX_HEAD_DIM = 512
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> None:
    """Raises ValueError naming the problem when (q, k, v, scale) is not a valid attention call."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"fastdec.attention: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"fastdec.attention: {name} must be 4-D (batch, heads, tokens, head_dim), "
                f"got {t.dim()}-D with shape {tuple(t.shape)}"
            )
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"fastdec.attention: {name} has dtype {t.dtype}; use float16, bfloat16 or float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"fastdec.attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one dtype"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"fastdec.attention: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    for problem, ok in (("batch and heads must match", q.shape[:2] == k.shape[:2] == v.shape[:2]),
                        ("head_dim must match across q, k, v", q.shape[3] == k.shape[3] == v.shape[3]),
                        ("k and v must have the same number of tokens", k.shape[2] == v.shape[2])):
        if not ok:
            raise ValueError(f"fastdec.attention: {problem}, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                             f"v {tuple(v.shape)}")
    if not 1 <= q.shape[3] <= MAX_HEAD_DIM:
        raise ValueError(f"fastdec.attention: head_dim must be in [1, {MAX_HEAD_DIM}], got {q.shape[3]}")
    if q.numel() == 0 or k.numel() == 0:
        raise ValueError(
            f"fastdec.attention: empty input (q {tuple(q.shape)}, k {tuple(k.shape)}); every dimension must be >= 1"
        )
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ValueError(
            f"fastdec.attention: scale must be a finite number > 0 (or None for head_dim**-0.5), got {scale}"
        )


@dataclass(frozen=True)
class AttentionConfig:
    """Tile sizes and grid shape of one launch. block_dv < padded head_dim splits the output D across programs;
    kv_splits > 1 splits the keys across programs and adds the combine launch."""

    block_m: int
    block_n: int
    block_dv: int = MAX_HEAD_DIM
    kv_splits: int = 1
    num_warps: int = 4
    num_stages: int = 2


Tile = tuple[int, int, int, int, int]  # (block_m, block_n, block_dv, num_warps, num_stages)

# (block_m, block_n, block_dv, num_warps, num_stages) candidates for fp16/bf16 per padded head_dim; block_dv 512
# means "all of D". Picked by compiling for sm_90a and reading ptxas's register/spill/shared-memory report
# (bench/results/*compile-check*); the first that fits is the heuristic's choice, the tuner times them all.
#   <=64:  128x64 tiles, 4 warps, 3 stages: the classic FA2 shape; 128x128/8 warps for long sequences.
#   128:   128x64, 8 warps (acc 64 regs/thread), 3 stages = 128 KiB smem; 128x128 2 stages = 160 KiB.
#   256:   128x64, 8 warps, 2 stages = 192 KiB smem; 64x32, 4 warps for ~100 KiB parts.
#   512:   64x32 whole D, 8 warps (2 warpgroups split the 512 columns: 128 acc regs/thread, q in smem) =
#          192 KiB smem, no repeated FLOPs; or 128x32 with a 256-wide D chunk (each warpgroup owns 64 rows, so q
#          is read from smem once per row instead of twice, but q k^T is computed twice: 1.5x FLOPs).
#          head_dim 384 (Wan) runs the same tiles on 256 + 128 columns, not padded to 512 (144 KiB whole D).
CANDIDATES: dict[int, tuple[Tile, ...]] = {
    16: ((128, 64, 512, 4, 3), (128, 128, 512, 8, 3), (64, 64, 512, 4, 3)),
    32: ((128, 64, 512, 4, 3), (128, 128, 512, 8, 3), (64, 64, 512, 4, 3)),
    64: ((128, 64, 512, 4, 3), (128, 128, 512, 8, 3), (64, 64, 512, 4, 3)),
    128: ((128, 64, 512, 8, 3), (128, 128, 512, 8, 2), (64, 64, 512, 4, 3)),
    256: ((128, 64, 512, 8, 2), (64, 64, 512, 4, 2), (64, 32, 512, 4, 2)),
    512: ((64, 32, 512, 8, 2), (128, 32, 256, 8, 2), (128, 32, 256, 8, 1), (64, 32, 256, 8, 2)),
}
# fp32 with TF32 off runs tl.dot as exact fp32 FMAs ("ieee"): no tensor cores and large register tiles, so small
# tiles and a 64/128-wide D chunk (ptxas: no spills for the first two at any head_dim).
FP32_CANDIDATES: tuple[Tile, ...] = ((32, 32, 64, 4, 2), (64, 32, 64, 8, 2), (32, 32, 128, 4, 2))
# fp32 with TF32 on (torch.backends.cuda.matmul.allow_tf32, as SDPA follows): tensor cores on fp32 operands, twice
# the bytes of fp16 tiles. Up to head_dim 128 q stays resident (64x64: wgmma, 80 KiB, no spills); beyond, q k^T is
# summed over 64-wide D chunks whose loads Triton buffers per chunk (64-row tiles needed 288-448 KiB of shared
# memory at head_dim 512), so small tiles, one stage (74 KiB at 512, no spills on sm_90 or sm_80).
TF32_CANDIDATES: tuple[Tile, ...] = ((64, 64, 512, 4, 2), (64, 32, 512, 4, 2), (32, 32, 512, 4, 2))
TF32_WIDE_CANDIDATES: tuple[Tile, ...] = ((32, 16, 128, 4, 1), (32, 32, 64, 4, 2))
# Spill before Hopper at every head_dim (ptxas, sm_80: 1276 and 24 bytes), so the heuristic skips them there.
SPILL_BEFORE_HOPPER = {(128, 32, 256, 8, 1), (128, 64, 512, 4, 3)}
# (Hopper or newer, operands, head_dim) -> tiles ptxas spilled with there (bench/results/*compile-check*): skipped
# by the heuristic and the tuner. Operands: "16bit", "tf32" or "ieee".
SPILLS: dict[tuple[bool, str, int], frozenset[Tile]] = {
    (False, "16bit", 384): frozenset({(128, 32, 256, 8, 2)}),  # 452 bytes
    (False, "ieee", 384): frozenset({(32, 32, 64, 4, 2), (32, 32, 128, 4, 2)}),  # 96, 192 bytes
    (False, "ieee", 512): frozenset({(32, 32, 128, 4, 2)}),  # 104 bytes
    (True, "ieee", 384): frozenset({(32, 32, 128, 4, 2)}),  # 196 bytes
}
# Tried when no candidate fits the GPU: ~75 KiB of shared memory at any head_dim and dtype (spills a little).
FALLBACK: Tile = (32, 16, 128, 4, 1)

FP32_QK_CHUNK = 32  # "ieee" fp32 sums q k^T over D chunks of this size (see _qk_chunk)
TF32_QK_CHUNK = 64  # TF32 beyond head_dim 128
PRE_HOPPER_QK_CHUNK = 64  # fp16/bf16 at head_dim >= 256 before Hopper

# Opt-in shared memory per block by compute capability, for devices whose properties do not say.
_SHARED_MEMORY = {(8, 0): 163 * 1024, (8, 7): 163 * 1024, (9, 0): 227 * 1024, (10, 0): 227 * 1024}
_SMALL_SHARED_MEMORY = 99 * 1024  # sm_86/89/120 and anything unknown


def padded_head_dim(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


def split_head_dim(head_dim: int) -> tuple[int, int]:
    """(main, tail): D as a power of two plus a power-of-two tail (0: none) when that is less padding than one
    power of two: 384 = 256 + 128 (not 512), 96 = 64 + 32, 80 = 64 + 16; each part at least 16 (tl.dot)."""
    padded = padded_head_dim(head_dim)
    main = padded // 2
    if main < 16 or head_dim <= main:
        return padded, 0
    tail = max(16, next_power_of_2(head_dim - main))
    return (main, tail) if main + tail < padded else (padded, 0)


def dot_precision(dtype: torch.dtype, interpreting: bool) -> str:
    """The kernel's tl.dot input_precision: fp16/bf16 ignore it; fp32 follows torch's TF32 switch as SDPA's fp32
    math path does ("tf32" when torch.backends.cuda.matmul.allow_tf32, which torch.set_float32_matmul_precision("high")
    sets, else "ieee"); the CPU interpreter computes in fp32 either way."""
    if interpreting:
        return "ieee"
    return "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"


def qk_chunk(dtype: torch.dtype, precision: str, head_dim: int, block_m: int, capability: tuple[int, int] | None
             ) -> int:
    """D chunk of the q k^T sum; split_head_dim's main part keeps the whole q tile resident. "ieee" fp32 (FMA dot)
    always chunks; TF32 beyond head_dim 128 (fp32 q tiles are large). mma.sync takes q from registers, where a
    256+ wide tile spills (ptxas: 1.3 KB), so large head_dims chunk by 64 there: before Hopper, and on Hopper for
    tiles under 64 rows, which wgmma (64 rows per warpgroup) does not take. Hopper's wgmma reads q from shared
    memory and keeps it whole. capability None: the CPU interpreter."""
    main, _ = split_head_dim(head_dim)
    if dtype == torch.float32:
        if precision == "tf32" and padded_head_dim(head_dim) <= 128:
            return main
        return min(TF32_QK_CHUNK if precision == "tf32" else FP32_QK_CHUNK, main)
    if capability is not None and padded_head_dim(head_dim) >= 256 and (capability[0] < 9 or block_m < 64):
        return PRE_HOPPER_QK_CHUNK
    return main


def key_tail_unverified(dtype: torch.dtype, precision: str, head_dim: int, seq_kv: int, block_m: int, block_n: int,
                        capability: tuple[int, int]) -> bool:
    """Whether a GPU call would take the kernel path that gave wrong outputs on an H200 (triton 3.6.0, torch 2.11,
    2026-12-04): D split into D_MAIN + D_TAIL with q resident, and a masked key-tail step (keys not a multiple of
    block_n). head_dim 96 (fp16, bf16) and Wan's 384 (bf16), with 45 and 517 keys, were far off SDPA at most tiles
    (some raised an illegal memory access), while the interpreter runs the same tiles right, the same head_dims
    without a key tail passed, and D padded to one power of two passed in each of these calls at the dispatch's tile
    (bench/results/2026-12-04-gpu-run-h200-call5-7/). The cause is not found: these calls pad D (128, 512)."""
    main, tail = split_head_dim(head_dim)
    return tail > 0 and seq_kv % block_n != 0 and qk_chunk(dtype, precision, head_dim, block_m, capability) == main


def shared_memory_estimate(tile: Tile, dtype: torch.dtype, precision: str, head_dim: int,
                           capability: tuple[int, int]) -> int:
    """Bytes of shared memory the tile needs, fitted to the compile report (bench/results/*compile-check*; within
    ~16 KiB, or over): 16-bit operands keep the q tile whole plus num_stages buffers of the k and v tiles; a q k^T
    summed over D chunks gets a q and a k buffer per chunk (unrolled), per stage on tensor cores (TF32)."""
    block_m, block_n, block_dv, _, stages = tile
    item = 4 if dtype == torch.float32 else 2
    main, tail = split_head_dim(head_dim)
    chunk = qk_chunk(dtype, precision, head_dim, block_m, capability)
    dv = main + tail if block_dv >= padded_head_dim(head_dim) else block_dv
    v = max(1, stages) * block_n * dv * item
    if dtype == torch.float32 and chunk < main:
        chunks = cdiv(head_dim, chunk)
        buffers = 1 if precision == "ieee" else max(1, stages)
        return chunks * buffers * (block_m + block_n) * chunk * item + v
    width = main + tail if chunk == main else chunk
    return block_m * (main + tail) * item + max(1, stages) * block_n * width * item + v


@functools.cache
def device_facts(index: int) -> tuple[tuple[int, int], int, int]:
    """(compute capability, SM count, opt-in shared memory per block) of CUDA device ``index``, read once."""
    props = torch.cuda.get_device_properties(index)
    capability = tuple(torch.cuda.get_device_capability(index))
    shared = getattr(props, "shared_memory_per_block_optin", None) or _SHARED_MEMORY.get(capability,
                                                                                        _SMALL_SHARED_MEMORY)
    return capability, props.multi_processor_count, int(shared)


def kv_splits(programs: int, seq_kv: int, block_n: int, num_sms: int) -> int:
    """Key splits that bring the grid up to about one program per SM, keeping >= 4 key blocks per split."""
    if programs >= num_sms:
        return 1
    return max(1, min(num_sms // programs, cdiv(seq_kv, 4 * block_n)))


def programs(tile: Tile, batch_heads: int, seq_q: int, head_dim: int) -> int:
    block_m, _, block_dv, _, _ = tile
    dv_chunks = 1 if block_dv >= padded_head_dim(head_dim) else cdiv(head_dim, block_dv)
    return batch_heads * cdiv(seq_q, block_m) * dv_chunks


def bucket(dtype: torch.dtype, precision: str, batch_heads: int, seq_q: int, seq_kv: int, head_dim: int) -> str:
    """The table key of a call: 'bf16 d512 bh1 q4096 kv4096' (fp32: 'fp32-tf32' or 'fp32-ieee'), counts rounded
    up to powers of two."""
    name = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: f"fp32-{precision}"}[dtype]
    pow2 = next_power_of_2
    return f"{name} d{head_dim} bh{pow2(batch_heads)} q{pow2(seq_q)} kv{pow2(seq_kv)}"


def arch_key(capability: tuple[int, int]) -> str:
    return f"sm_{capability[0]}{capability[1]}"


def usable_tiles(dtype: torch.dtype, precision: str, head_dim: int, capability: tuple[int, int],
                 shared_memory: int) -> list[Tile]:
    """The candidates in preference order that fit this GPU, then the fallback."""
    operands = precision if dtype == torch.float32 else "16bit"
    if operands == "tf32":
        candidates = TF32_CANDIDATES if padded_head_dim(head_dim) <= 128 else TF32_WIDE_CANDIDATES
    else:
        candidates = FP32_CANDIDATES if operands == "ieee" else CANDIDATES[padded_head_dim(head_dim)]
    spills = SPILLS.get((capability[0] >= 9, operands, head_dim), frozenset())
    tiles = [tile for tile in candidates
             if not (capability[0] < 9 and tile in SPILL_BEFORE_HOPPER) and tile not in spills
             and shared_memory_estimate(tile, dtype, precision, head_dim, capability) <= shared_memory]
    return tiles + ([FALLBACK] if FALLBACK not in tiles else [])


def config_of(tile: Tile, splits: int) -> AttentionConfig:
    block_m, block_n, block_dv, num_warps, num_stages = tile
    return AttentionConfig(block_m, block_n, block_dv, splits, num_warps, num_stages)


def heuristic_configs(dtype: torch.dtype, precision: str, batch_heads: int, seq_q: int, seq_kv: int, head_dim: int,
                      capability: tuple[int, int], num_sms: int, shared_memory: int) -> list[AttentionConfig]:
    """The heuristic's choices in order: each usable tile with the key splits that fill the GPU."""
    return [config_of(tile, kv_splits(programs(tile, batch_heads, seq_q, head_dim), seq_kv, tile[1], num_sms))
            for tile in usable_tiles(dtype, precision, head_dim, capability, shared_memory)]


def table_config(table: dict, capability: tuple[int, int], key: str) -> AttentionConfig | None:
    entry = table.get(arch_key(capability), {}).get(key)
    return None if entry is None else config_of(tuple(entry["tile"]), entry["kv_splits"])


_chosen: dict[tuple, list[AttentionConfig]] = {}


def forget() -> None:
    """Drops what was read from the devices and chosen (for bench/compile_check.py, which fakes several GPUs)."""
    device_facts.cache_clear()
    _chosen.clear()


def choose(table: dict, device_index: int, dtype: torch.dtype, precision: str, batch_heads: int, seq_q: int,
           seq_kv: int, head_dim: int) -> AttentionConfig:
    """The configuration of a call (table entry, else heuristic), cached per (device, bucket)."""
    key = (device_index, bucket(dtype, precision, batch_heads, seq_q, seq_kv, head_dim))
    if key not in _chosen:
        capability, num_sms, shared = device_facts(device_index)
        order = heuristic_configs(dtype, precision, batch_heads, seq_q, seq_kv, head_dim, capability, num_sms, shared)
        tabled = table_config(table, capability, key[1])
        _chosen[key] = ([tabled] if tabled is not None else []) + [c for c in order if c != tabled]
    return _chosen[key][0]


def demote(device_index: int, dtype: torch.dtype, precision: str, batch_heads: int, seq_q: int, seq_kv: int,
           head_dim: int) -> bool:
    """Drops the current choice of a bucket after it failed for lack of resources; False when none is left."""
    remaining = _chosen.get((device_index, bucket(dtype, precision, batch_heads, seq_q, seq_kv, head_dim)), [])
    if len(remaining) <= 1:
        return False
    remaining.pop(0)
    return True


@contextlib.contextmanager
def tf32(on: bool) -> Iterator[None]:
    """torch.backends.cuda.matmul.allow_tf32 set for a block (the compile and GPU checks of either fp32 mode)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def wan_qkv(shape: tuple[int, int, int, int], make: Callable) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of a (B, H, N, D) call as Wan's attention block hands them over: chunks of one (B*H, 1, N, 3D) view
    of a 1x1 conv's output, so head_dim has stride N and tokens stride 1 (models/wan.py AttentionBlock).
    ``make(shape)`` allocates the conv output."""
    batch, heads, tokens, head_dim = shape
    qkv = make((batch * heads, 3 * head_dim, tokens)).transpose(1, 2).unsqueeze(1)
    return tuple(qkv.chunk(3, dim=-1))
