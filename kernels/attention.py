"""Scaled dot-product attention, softmax(q k^T * scale) v, for (B, H, N, D) tensors: a Triton flash-attention
forward kernel, the eager reference and the backward.

Kernel design (one launch, plus a small combine launch when the keys are split):

* Online softmax in base 2 with fp32 statistics and an fp32 accumulator. The softmax scale times log2(e) is applied
  to the fp32 scores inside the exponent, ``exp2(s * c - m)``, which compiles to one FMA per score, the same work as
  the max subtraction alone. Folding it into q instead would round q * c to fp16/bf16 before the dot (a relative
  error of up to 2^-9 per bf16 element in every logit); applying it in fp32 costs nothing extra and keeps the
  logits as exact as the fp32 accumulation.
* Any N: the query tail is masked once on load/store; the key tail is one extra masked iteration after an
  unmasked main loop. Any head_dim from 1 to 512: D is padded to the next power of two (at least 16, the smallest
  ``tl.dot`` size) with masked loads; HEAD_DIM is a compile-time constant, so the masks vanish when D is a power of 2.
* Large head_dim (512, the SD-VAE mid-block: batch 1, one head, 4096 to 16384 tokens) has two problems: the
  accumulator is BLOCK_M x D fp32 and there are few query blocks (4096 / 64 = 64 programs for 132 SMs). The grid
  therefore has two more axes besides (batch*head, query block):
    - output D chunks (BLOCK_DV < D): each program recomputes q k^T over the full D but accumulates only its chunk
      of v. It shrinks the accumulator (registers) and doubles the programs, at the cost of recomputing q k^T
      (1.5x the FLOPs for two chunks), so it is a fallback candidate, not the default.
    - key splits (flash-decoding): each program handles one slice of the keys and writes a normalized partial
      output plus its log-sum-exp; ``_combine_splits_kernel`` merges them. No FLOPs are repeated; the extra
      traffic is splits * N * D fp32, microseconds next to the N^2 * D work. Used when the other axes do not fill
      the GPU.
  The D=512 first candidate is BLOCK_M=64, BLOCK_N=32 and the whole D in one program with 8 warps: the two
  warpgroups split the 512 accumulator columns (64x512 fp32 = 128 registers per thread; ptxas: 255, no spills);
  q stays in shared memory (64 KiB) next to two stages of the 32x512 k and v tiles (2 x 64 KiB): 192 KiB of
  Hopper's 228 KiB. Its cost is shared-memory bandwidth: both warpgroups read all of q for q k^T. The second,
  BLOCK_M=128 with a 256-wide D chunk, gives each warpgroup its own 64 query rows (q read once) but computes
  q k^T twice. Which wins depends on the GPU, hence the tuner.
* On CUDA the launcher times a few candidate configurations per (shape, dtype, device) on first use and caches the
  fastest (``_candidate_configs``); candidates that do not fit the GPU's shared memory are skipped. It is a small
  hand-rolled tuner rather than ``triton.autotune`` because the candidates change the grid, the number of key
  splits and the scratch buffers, not only the kernel's constexprs.
* fp32 inputs use ``input_precision="ieee"`` so fp32 stays fp32 (tl.dot would otherwise run TF32 on GPU). That is
  FMA math without tensor cores, whose full-D q k^T tile does not fit in registers, so fp32 sums q k^T over
  32-wide D chunks (reloading the q chunks from L1/L2) and uses small tiles and 64-128 wide output-D chunks: exact
  but several times slower than bf16 (and "tf32x3" spilled more in Triton). fp16 and bf16 run on tensor cores with
  p rounded to the input dtype for the p @ v product, as in FlashAttention.
* Under triton's CPU interpreter (INTERPRET), bf16 arithmetic and bf16 ``tl.dot`` are wrong, so every tile is
  converted to fp32 right after its load; on GPU the fp16/bf16 operands stay 16-bit for the tensor cores.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastdec.kernels._cases import CompileCase, GpuCase, cuda_empty, shape_label
from fastdec.kernels._dispatch import cpu_kernel, cuda_kernel
from fastdec.kernels._triton import tl, triton, triton_interpreting

MAX_HEAD_DIM = 512
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2_E = 1.4426950408889634
_FP32_QK_CHUNK = 32  # fp32 inputs sum q k^T over D chunks of this size (see _online_softmax_step, _qk_chunk)
_PRE_HOPPER_QK_CHUNK = 64  # fp16/bf16 at head_dim >= 256 before Hopper (see _qk_chunk)


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
    if not (q.shape[:2] == k.shape[:2] == v.shape[:2]):
        raise ValueError(
            "fastdec.attention: batch and heads must match, got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.shape[3] == k.shape[3] == v.shape[3]):
        raise ValueError(
            "fastdec.attention: head_dim must match across q, k, v, got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[2] != v.shape[2]:
        raise ValueError(
            "fastdec.attention: k and v must have the same number of tokens, "
            f"got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
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


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Eager reference: F.scaled_dot_product_attention computed in fp32, returned contiguous in q.dtype."""
    check_attention(q, k, v, scale)
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
    return out.to(q.dtype).contiguous()


def attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) by recomputing the fp32 reference under autograd.

    Decoding never needs it, so there is no fused backward kernel: this materializes the N_q x N_kv fp32 attention
    matrix per head (1 GiB at 16384 tokens), which is fine for tests and fine-tuning at moderate sizes.
    """
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out = attention_reference(*inputs, scale)
        dq, dk, dv = torch.autograd.grad(out, inputs, grad_out)
    return dq, dk, dv


# --- Triton kernels ----------------------------------------------------------------------------------------------


@triton.jit
def _online_softmax_step(
    acc,
    l_i,
    m_i,
    q,
    q_row_valid,
    k_base,
    v_base,
    start_n,
    seq_kv,
    offs_n,
    offs_d,
    offs_dv,
    stride_qd,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    QK_CHUNK: tl.constexpr,
    EVEN_DV: tl.constexpr,
    MASK_KV: tl.constexpr,
    INTERPRET: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One BLOCK_N slice of keys: scores, running max/sum update, acc += p @ v[:, dv chunk].

    With QK_CHUNK == BLOCK_D, q is the resident (BLOCK_M, BLOCK_D) tile. Otherwise q is a (BLOCK_M, QK_CHUNK)
    pointer tile and q k^T is summed over D chunks, reloading the q chunks (L1/L2 hits): the fp32 path, whose
    full-D "ieee" dot would not fit in registers.
    """
    offs_kv = start_n + offs_n
    kv_valid = offs_kv < seq_kv
    if QK_CHUNK == BLOCK_D:
        k_ptrs = k_base + offs_kv[None, :] * stride_kn + offs_d[:, None] * stride_kd
        if MASK_KV:
            k = tl.load(k_ptrs, mask=kv_valid[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
        elif HEAD_DIM == BLOCK_D:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
        if INTERPRET:
            k = k.to(tl.float32)
        scores = tl.dot(q, k, input_precision=DOT_PRECISION)
    else:
        scores = tl.zeros([q.shape[0], offs_n.shape[0]], dtype=tl.float32)
        for d_start in tl.static_range(0, BLOCK_D, QK_CHUNK):
            offs_chunk = d_start + offs_d
            q_chunk = tl.load(
                q + d_start * stride_qd, mask=q_row_valid[:, None] & (offs_chunk[None, :] < HEAD_DIM), other=0.0
            )
            k_chunk = tl.load(
                k_base + offs_kv[None, :] * stride_kn + offs_chunk[:, None] * stride_kd,
                mask=kv_valid[None, :] & (offs_chunk[:, None] < HEAD_DIM),
                other=0.0,
            )
            if INTERPRET:
                q_chunk = q_chunk.to(tl.float32)
                k_chunk = k_chunk.to(tl.float32)
            scores = tl.dot(q_chunk, k_chunk, scores, input_precision=DOT_PRECISION)
    v_ptrs = v_base + offs_kv[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    if MASK_KV:
        v = tl.load(v_ptrs, mask=kv_valid[:, None] & (offs_dv[None, :] < HEAD_DIM), other=0.0)
    elif EVEN_DV:
        v = tl.load(v_ptrs)
    else:
        v = tl.load(v_ptrs, mask=offs_dv[None, :] < HEAD_DIM, other=0.0)
    if INTERPRET:
        v = v.to(tl.float32)
    if MASK_KV:
        scores = tl.where(kv_valid[None, :], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1) * qk_scale)
    p = tl.exp2(scores * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attention_forward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_out_split,
    stride_out_bh,
    stride_out_m,
    stride_lse_split,
    num_heads,
    seq_q,
    seq_kv,
    kv_per_split,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    QK_CHUNK: tl.constexpr,
    NUM_DV_CHUNKS: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    INTERPRET: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program = (batch*head, query block, key split, output D chunk); the last two vary fastest so that
    programs sharing a q tile run together. With NUM_SPLITS > 1 it writes fp32 partials and their base-2 lse."""
    pid = tl.program_id(0)
    chunk = pid % (NUM_DV_CHUNKS * NUM_SPLITS)
    rest = pid // (NUM_DV_CHUNKS * NUM_SPLITS)
    dv_chunk = chunk % NUM_DV_CHUNKS
    split = chunk // NUM_DV_CHUNKS
    num_m_blocks = tl.cdiv(seq_q, BLOCK_M)
    block_m = rest % num_m_blocks
    bh = (rest // num_m_blocks).to(tl.int64)
    batch = bh // num_heads
    head = bh % num_heads

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, QK_CHUNK)
    offs_dv = dv_chunk * BLOCK_DV + tl.arange(0, BLOCK_DV)
    EVEN_DV: tl.constexpr = HEAD_DIM % BLOCK_DV == 0

    q_ptrs = q_ptr + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q_row_valid = offs_m < seq_q
    if QK_CHUNK == BLOCK_D:
        q = tl.load(q_ptrs, mask=q_row_valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        if INTERPRET:
            q = q.to(tl.float32)
    else:
        q = q_ptrs
    k_base = k_ptr + batch * stride_kb + head * stride_kh
    v_base = v_ptr + batch * stride_vb + head * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    kv_start = split * kv_per_split
    kv_stop = tl.minimum(kv_start + kv_per_split, seq_kv)
    kv_full_stop = kv_start + (kv_stop - kv_start) // BLOCK_N * BLOCK_N
    for start_n in range(kv_start, kv_full_stop, BLOCK_N):
        acc, l_i, m_i = _online_softmax_step(
            acc, l_i, m_i, q, q_row_valid, k_base, v_base, start_n, seq_kv, offs_n, offs_d, offs_dv,
            stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
            HEAD_DIM, BLOCK_D, QK_CHUNK, EVEN_DV, False, INTERPRET, DOT_PRECISION,
        )  # fmt: skip
    if kv_full_stop < kv_stop:
        acc, l_i, m_i = _online_softmax_step(
            acc, l_i, m_i, q, q_row_valid, k_base, v_base, kv_full_stop, seq_kv, offs_n, offs_d, offs_dv,
            stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
            HEAD_DIM, BLOCK_D, QK_CHUNK, EVEN_DV, True, INTERPRET, DOT_PRECISION,
        )  # fmt: skip

    out = acc / l_i[:, None]
    out_ptrs = out_ptr + split * stride_out_split + bh * stride_out_bh
    out_ptrs += offs_m[:, None] * stride_out_m + offs_dv[None, :]
    out_mask = q_row_valid[:, None] & (offs_dv[None, :] < HEAD_DIM)
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)
    if NUM_SPLITS > 1:
        if dv_chunk == 0:
            lse = m_i + tl.log2(l_i)
            tl.store(lse_ptr + split * stride_lse_split + bh * seq_q + offs_m, lse, mask=q_row_valid)


@triton.jit
def _combine_splits_kernel(
    partial_ptr,
    lse_ptr,
    out_ptr,
    seq_q,
    num_splits,
    stride_partial_split,
    stride_lse_split,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out = sum_s w_s * partial_s with w_s = 2^(lse_s - lse) / sum: merges the normalized per-split outputs."""
    pid = tl.program_id(0)
    num_m_blocks = tl.cdiv(seq_q, BLOCK_M)
    block_m = pid % num_m_blocks
    bh = (pid // num_m_blocks).to(tl.int64)
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_valid = offs_m < seq_q
    tile_mask = row_valid[:, None] & (offs_d[None, :] < HEAD_DIM)
    lse_rows = lse_ptr + bh * seq_q + offs_m
    tile_offsets = bh * seq_q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]

    lse_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for split in range(num_splits):
        lse_max = tl.maximum(lse_max, tl.load(lse_rows + split * stride_lse_split, mask=row_valid, other=0.0))
    weight_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for split in range(num_splits):
        weight = tl.exp2(tl.load(lse_rows + split * stride_lse_split, mask=row_valid, other=0.0) - lse_max)
        partial = tl.load(partial_ptr + split * stride_partial_split + tile_offsets, mask=tile_mask, other=0.0)
        weight_sum += weight
        acc += weight[:, None] * partial
    out = acc / weight_sum[:, None]
    tl.store(out_ptr + tile_offsets, out.to(out_ptr.dtype.element_ty), mask=tile_mask)


# --- launcher ----------------------------------------------------------------------------------------------------


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


def _padded_head_dim(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


# (block_m, block_n, block_dv, num_warps, num_stages) candidates for fp16/bf16 per padded head_dim; block_dv 512
# means "all of D". Picked by compiling for sm_90a and reading ptxas's register/spill/shared-memory report
# (none spills more than 24 bytes); the tuner times them on the actual GPU.
#   <=64:  128x64 tiles, 4 warps, 3 stages: the classic FA2 shape; 128x128/8 warps for long sequences.
#   128:   128x64, 8 warps (acc 64 regs/thread), 3 stages = 128 KiB smem; 128x128 2 stages = 160 KiB.
#   256:   128x64, 8 warps, 2 stages = 192 KiB smem; 64x32, 4 warps for ~100 KiB parts.
#   512:   64x32 whole D, 8 warps (2 warpgroups split the 512 columns: 128 acc regs/thread, q in smem) =
#          192 KiB smem, no repeated FLOPs; or 128x32 with a 256-wide D chunk (each warpgroup owns 64 rows, so q
#          is read from smem once per row instead of twice, but q k^T is computed twice: 1.5x FLOPs).
_CANDIDATES: dict[int, tuple[tuple[int, int, int, int, int], ...]] = {
    16: ((128, 64, 512, 4, 3), (128, 128, 512, 8, 3), (64, 64, 512, 4, 3)),
    32: ((128, 64, 512, 4, 3), (128, 128, 512, 8, 3), (64, 64, 512, 4, 3)),
    64: ((128, 64, 512, 4, 3), (128, 128, 512, 8, 3), (64, 64, 512, 4, 3)),
    128: ((128, 64, 512, 8, 3), (128, 128, 512, 8, 2), (64, 64, 512, 4, 3)),
    256: ((128, 64, 512, 8, 2), (64, 64, 512, 4, 2), (64, 32, 512, 4, 2)),
    512: ((64, 32, 512, 8, 2), (128, 32, 256, 8, 2), (128, 32, 256, 8, 1), (64, 32, 256, 8, 2)),
}
# fp32 runs tl.dot as exact fp32 FMAs ("ieee"): no tensor cores and large register tiles, so small tiles and a
# 64/128-wide D chunk (ptxas: no spills for the first two at any head_dim).
_FP32_CANDIDATES = ((32, 32, 64, 4, 2), (64, 32, 64, 8, 2), (32, 32, 128, 4, 2))
# Spill more than a kilobyte before Hopper (ptxas, sm_80: 1276 bytes), so the tuner skips them there.
_SPILL_BEFORE_HOPPER = {(128, 32, 256, 8, 1)}
# Tried only when no candidate fits the GPU: ~75 KiB of shared memory at any head_dim and dtype (spills a little).
_FALLBACK_CANDIDATE = (32, 16, 128, 4, 1)

# Under the interpreter: small tiles (the interpreter's cost grows with tile size), and at head_dim 512 the
# output-D split, so the CPU tests run that path too.
_INTERPRETER_CONFIG = AttentionConfig(block_m=32, block_n=32, block_dv=256)


def _kv_splits(programs: int, seq_kv: int, block_n: int, num_sms: int) -> int:
    """Key splits that bring the grid up to about one program per SM, keeping >= 4 key blocks per split."""
    if programs >= num_sms:
        return 1
    return max(1, min(num_sms // programs, triton.cdiv(seq_kv, 4 * block_n)))


def _candidate_configs(
    q: torch.Tensor, k: torch.Tensor, tiles: tuple[tuple[int, int, int, int, int], ...]
) -> list[AttentionConfig]:
    batch, heads, seq_q, head_dim = q.shape
    num_sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    configs = []
    hopper = _is_hopper_or_newer(q.device)
    for tile in tiles:
        if not hopper and tile in _SPILL_BEFORE_HOPPER:
            continue
        block_m, block_n, block_dv, num_warps, num_stages = tile
        block_dv = min(block_dv, _padded_head_dim(head_dim))
        programs = batch * heads * triton.cdiv(seq_q, block_m) * triton.cdiv(head_dim, block_dv)
        for kv_splits in sorted({1, _kv_splits(programs, k.shape[2], block_n, num_sms)}):
            configs.append(AttentionConfig(block_m, block_n, block_dv, kv_splits, num_warps, num_stages))
    return configs


def _qk_chunk(q: torch.Tensor, block_d: int, block_m: int) -> int:
    """D chunk of the q k^T sum; block_d keeps the whole q tile resident. fp32 (FMA dot) always chunks. mma.sync
    takes q from registers, where a 256+ wide tile spills (ptxas: 1.3 KB), so large head_dims chunk by 64 there:
    before Hopper, and on Hopper for tiles under 64 rows, which wgmma (64 rows per warpgroup) does not take.
    Hopper's wgmma reads q from shared memory and keeps it whole."""
    if q.dtype == torch.float32:
        return min(_FP32_QK_CHUNK, block_d)
    if q.is_cuda and block_d >= 256 and (not _is_hopper_or_newer(q.device) or block_m < 64):
        return _PRE_HOPPER_QK_CHUNK
    return block_d


def _is_hopper_or_newer(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, config: AttentionConfig):
    batch, heads, seq_q, head_dim = q.shape
    seq_kv = k.shape[2]
    block_d = _padded_head_dim(head_dim)
    block_dv = min(config.block_dv, block_d)
    num_dv_chunks = triton.cdiv(head_dim, block_dv)
    kv_per_split = triton.cdiv(triton.cdiv(seq_kv, config.kv_splits), config.block_n) * config.block_n
    kv_splits = triton.cdiv(seq_kv, kv_per_split)  # no empty splits
    interpret = triton_interpreting()
    out = q.new_empty((batch, heads, seq_q, head_dim))
    if kv_splits > 1:
        target = torch.empty((kv_splits, batch * heads, seq_q, head_dim), device=q.device, dtype=torch.float32)
        lse = torch.empty((kv_splits, batch * heads, seq_q), device=q.device, dtype=torch.float32)
    else:
        target, lse = out.view(1, batch * heads, seq_q, head_dim), out
    qk_scale = (head_dim**-0.5 if scale is None else scale) * _LOG2_E
    grid = (batch * heads * triton.cdiv(seq_q, config.block_m) * num_dv_chunks * kv_splits,)
    _attention_forward_kernel[grid](
        q, k, v, target, lse,
        *q.stride(), *k.stride(), *v.stride(),
        target.stride(0), target.stride(1), target.stride(2), lse.stride(0) if kv_splits > 1 else 0,
        heads, seq_q, seq_kv, kv_per_split, qk_scale,
        HEAD_DIM=head_dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
        QK_CHUNK=_qk_chunk(q, block_d, config.block_m),
        NUM_DV_CHUNKS=num_dv_chunks, NUM_SPLITS=kv_splits, INTERPRET=interpret,
        DOT_PRECISION="ieee" if interpret or q.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if kv_splits > 1:
        combine_block_m = 16
        _combine_splits_kernel[(batch * heads * triton.cdiv(seq_q, combine_block_m),)](
            target, lse, out, seq_q, kv_splits, target.stride(0), lse.stride(0),
            HEAD_DIM=head_dim, BLOCK_M=combine_block_m, BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
    return out


_tuned: dict[tuple, AttentionConfig] = {}


def _tuned_config(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> AttentionConfig:
    """Fastest candidate for this (device, dtype, shape, unit-stride pattern), timed once per process, cached."""
    key = (q.device, q.dtype, *q.shape, k.shape[2], *(t.stride(-1) == 1 for t in (q, k, v)))
    if key not in _tuned:
        tiles = _FP32_CANDIDATES if q.dtype == torch.float32 else _CANDIDATES[_padded_head_dim(q.shape[-1])]
        timings = {}
        for candidates in (tiles, (_FALLBACK_CANDIDATE,)):
            for config in _candidate_configs(q, k, candidates):
                try:
                    timings[config] = triton.testing.do_bench(lambda c=config: _launch(q, k, v, scale, c), 5, 25)
                except triton.runtime.errors.OutOfResources:
                    continue  # needs more shared memory or registers than this GPU has
            if timings:
                break
        if not timings:
            raise RuntimeError(f"fastdec.attention: no kernel configuration fits this GPU for q {tuple(q.shape)}")
        _tuned[key] = min(timings, key=timings.get)
    return _tuned[key]


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Triton flash attention (see the module docstring); any strides in, contiguous (B, H, N_q, D) out."""
    check_attention(q, k, v, scale)
    if triton_interpreting():
        return _launch(q, k, v, scale, _INTERPRETER_CONFIG)
    with torch.cuda.device(q.device):  # triton launches (and the tuner times) on the current device
        return _launch(q, k, v, scale, _tuned_config(q, k, v, scale))


# --- registration: torch.ops.fastdec.attention ------------------------------------------------------------------

FUSED = "triton"  # what runs the fused path; fastdec.ops.backends() says where it runs, and why not


@torch.library.custom_op("fastdec::attention", mutates_args=(), device_types="cpu")
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v for (B, H, N, D) tensors, head_dim up to 512; scale defaults to D ** -0.5."""
    return cpu_kernel(attention_triton, attention_reference)(q, k, v, scale)


@attention.register_kernel("cuda")
def _(q, k, v, scale=None):
    return cuda_kernel(attention_triton, attention_reference)(q, k, v, scale)


@attention.register_fake
def _(q, k, v, scale=None):
    check_attention(q, k, v, scale)
    return q.new_empty(q.shape[:-1] + v.shape[-1:])


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v)
    ctx.scale = scale


def _backward(ctx, grad_out):
    return (*attention_backward(grad_out, *ctx.saved_tensors, ctx.scale), None)


attention.register_autograd(_backward, setup_context=_setup_context)


# --- the calls its checks and benchmarks make -----------------------------------------------------------------

# (B, H, N, D): the SD-VAE mid-block (one head of 512 channels) at 512 and 1024 px, multi-head transformer decoders
# (gpu_check, bench/). compile_check: ViT-S at 512 px (6 heads of 64), 96/128-wide heads at the same length, the
# SD-VAE mid-block at 512 px; on an H100 each is short of one program per SM with the larger query tiles, so the
# tuner's key-split configs (and the combine kernel) compile too.
BENCH_SHAPES = ((1, 1, 4096, 512), (1, 1, 16384, 512), (1, 8, 4096, 64), (1, 2, 9216, 96))
COMPILE_SHAPES = ((1, 6, 1024, 64), (1, 8, 1024, 96), (1, 8, 1024, 128), (1, 1, 4096, 512))
GPU_DTYPE = torch.bfloat16  # the dtype its speed goal is stated in


def check_call(r) -> tuple:
    """``fastdec check``'s call; ``r(*shape)`` is a random tensor on the device checked."""
    return r(1, 2, 33, 64), r(1, 2, 33, 64), r(1, 2, 33, 64), None


def compile_cases(quick: bool) -> list[CompileCase]:
    """Every candidate of the tuner's table (and its fallback) with each key-split count the tuner tries; called
    where the GPU's properties are those compiled for."""
    cases = itertools.product(("bf16", "fp16", "fp32"), COMPILE_SHAPES)
    if quick:
        cases = (("bf16", (1, 1, 4096, 512)), ("fp16", (1, 8, 1024, 128)), ("fp32", (1, 6, 1024, 64)))

    def run(shape, dtype, config):
        _launch(*(cuda_empty(shape, dtype) for _ in range(3)), None, config)

    found = []
    for dtype, shape in cases:
        q = cuda_empty(shape, dtype)
        tiles = _FP32_CANDIDATES if dtype == "fp32" else _CANDIDATES[_padded_head_dim(shape[-1])]
        candidates = _candidate_configs(q, q, tiles[:1] if quick else tiles)
        if not quick:
            candidates += _candidate_configs(q, q, (_FALLBACK_CANDIDATE,))
        found += [CompileCase(f"{dtype} {shape_label(shape)}", functools.partial(run, shape, dtype, config), tuned=True)
                  for config in candidates]
    return found


def gpu_cases(device: torch.device, dtype: torch.dtype, smoke: bool) -> list[GpuCase]:
    """Against every SDPA backend that takes the shape (and the torch.compile'd reference)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend, q, k, v, scale):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)

    def make(shape):
        return *(torch.randn(shape, device=device, dtype=dtype) for _ in range(3)), None

    backends = (SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION)
    peers = {f"sdpa:{backend.name.lower()}": functools.partial(sdpa, backend) for backend in backends}
    return [GpuCase(str(shape), functools.partial(make, shape), peers, flops=4 * math.prod(shape) * shape[2])
            for shape in ([(1, 1, 64, 512), (1, 2, 33, 64)] if smoke else BENCH_SHAPES)]
