"""Scaled dot-product attention, softmax(q k^T * scale) v, for (B, H, N, D) tensors: a Triton flash-attention
forward kernel, the eager reference and the backward.

Kernel design (one launch, plus a small combine launch when the keys are split):

* Online softmax in base 2 with fp32 statistics and an fp32 accumulator. The softmax scale times log2(e) is applied
  to the fp32 scores inside the exponent, ``exp2(s * c - m)`` (one FMA per score); folding it into q would round
  q * c to fp16/bf16 before the dot (up to 2^-9 relative error per bf16 element in every logit).
* Any N: the query tail is masked once on load/store; the key tail is one extra masked iteration after an
  unmasked main loop. Any head_dim from 1 to 512: D is a power of two (at least 16, the smallest ``tl.dot``) or,
  where that pads less, a power of two plus a power-of-two tail (D_MAIN + D_TAIL: Wan's 384 = 256 + 128, not
  512; 96 = 64 + 32), with masked loads only where a part overhangs D. On GPUs a split D with a key tail pads D
  to one power of two instead (wrong on an H200: kernels/support/attention_config.py ``key_tail_unverified``).
* Large head_dim (512, the SD-VAE mid-block: batch 1, one head, 4096 to 16384 tokens): the accumulator is
  BLOCK_M x D fp32 and there are few query blocks (4096 / 64 = 64 programs for 132 SMs). The grid therefore has
  two more axes besides (batch*head, query block):
    - output D chunks (BLOCK_DV < D): each program recomputes q k^T over the full D but accumulates only its chunk
      of v: a smaller accumulator, twice the programs, 1.5x the FLOPs for two chunks (a candidate, not the default).
    - key splits (flash-decoding): each program handles one slice of the keys and writes a normalized partial
      output plus its log-sum-exp; ``_combine_splits_kernel`` merges them. No FLOPs are repeated; used when the
      other axes do not fill the GPU.
* The configuration of a call comes from a committed table per GPU architecture and shape bucket, else a
  heuristic over each head_dim's tiles (kernels/support/attention_config.py ``CANDIDATES``, and why); no timing.
* fp32 follows torch's TF32 switch as SDPA does: with ``torch.backends.cuda.matmul.allow_tf32`` (or
  ``torch.set_float32_matmul_precision("high")``) the dots run TF32 on tensor cores; otherwise ``"ieee"``, exact fp32
  FMAs, summing q k^T over 32-wide D chunks with small tiles (several times slower than bf16). fp16 and bf16 run
  on tensor cores with p rounded to the input dtype for the p @ v product, as in FlashAttention.
* Under triton's CPU interpreter (INTERPRET), bf16 arithmetic and bf16 ``tl.dot`` are wrong, so every tile is
  converted to fp32 right after its load; on GPU the fp16/bf16 operands stay 16-bit for the tensor cores.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.nn.functional as F

from fastdec.kernels.support import attention_config as _config
from fastdec.kernels.support.attention_config import AttentionConfig, check_attention
from fastdec.kernels.support.attention_table import TABLE
from fastdec.kernels.support.cases import DTYPES, CompileCase, GpuCase, cuda_empty, shape_label
from fastdec.kernels.support.dispatch import cpu_kernel, cuda_kernel, register_backward
from fastdec.kernels.support.triton_import import cdiv, tl, triton, triton_interpreting

_LOG2_E = 1.4426950408889634


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
        return torch.autograd.grad(attention_reference(*inputs, scale), inputs, grad_out)


# --- Triton kernels ----------------------------------------------------------------------------------------------


@triton.jit
def _online_softmax_step(
    acc, acc_tail, l_i, m_i, q, q_tail, q_row_valid, k_base, v_base, start_n, seq_kv, offs_n, offs_d, offs_dv,
    offs_t, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
    HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr, QK_CHUNK: tl.constexpr,
    EVEN_DV: tl.constexpr, DV_TAIL: tl.constexpr, MASK_KV: tl.constexpr, INTERPRET: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One BLOCK_N slice of keys: scores, running max/sum update, acc += p @ v[:, dv chunk] (and the tail
    columns D_MAIN.. into acc_tail when DV_TAIL).

    With QK_CHUNK == D_MAIN, q is the resident (BLOCK_M, D_MAIN) tile plus q_tail (BLOCK_M, D_TAIL) when D is split
    (384 = 256 + 128). Otherwise q is a (BLOCK_M, QK_CHUNK) pointer tile and q k^T is summed over D chunks,
    reloading the q chunks (L1/L2 hits): the fp32 path, whose full-D dot would not fit in registers.
    """
    offs_kv = start_n + offs_n
    kv_valid = offs_kv < seq_kv
    if QK_CHUNK == D_MAIN:
        k_ptrs = k_base + offs_kv[None, :] * stride_kn + offs_d[:, None] * stride_kd
        if MASK_KV:
            k = tl.load(k_ptrs, mask=kv_valid[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
        elif D_MAIN <= HEAD_DIM:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
        if INTERPRET:
            k = k.to(tl.float32)
        scores = tl.dot(q, k, input_precision=DOT_PRECISION)
        if D_TAIL > 0:
            k_tail = tl.load(k_base + offs_kv[None, :] * stride_kn + offs_t[:, None] * stride_kd,
                             mask=kv_valid[None, :] & (offs_t[:, None] < HEAD_DIM), other=0.0)
            if INTERPRET:
                k_tail = k_tail.to(tl.float32)
            scores = tl.dot(q_tail, k_tail, scores, input_precision=DOT_PRECISION)
    else:
        scores = tl.zeros([q.shape[0], offs_n.shape[0]], dtype=tl.float32)
        for d_start in tl.static_range(0, HEAD_DIM, QK_CHUNK):
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
    if DV_TAIL:
        v_tail = tl.load(v_base + offs_kv[:, None] * stride_vn + offs_t[None, :] * stride_vd,
                         mask=kv_valid[:, None] & (offs_t[None, :] < HEAD_DIM), other=0.0)
        if INTERPRET:
            v_tail = v_tail.to(tl.float32)
        acc_tail = tl.dot(p.to(v_tail.dtype), v_tail, acc_tail * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, acc_tail, l_i, m_new


@triton.jit
def _attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_out_split, stride_out_bh, stride_out_m, stride_lse_split,
    num_heads, seq_q, seq_kv, kv_per_split, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_MAIN: tl.constexpr,
    D_TAIL: tl.constexpr, BLOCK_DV: tl.constexpr, QK_CHUNK: tl.constexpr, NUM_DV_CHUNKS: tl.constexpr,
    DV_TAIL: tl.constexpr, EVEN_DV: tl.constexpr, NUM_SPLITS: tl.constexpr, INTERPRET: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PEEL_KEY_TAIL: tl.constexpr,
):
    """One program = (batch*head, query block, key split, output D chunk); the last two vary fastest so that
    programs sharing a q tile run together. With NUM_SPLITS > 1 it writes fp32 partials and their base-2 lse.
    D_TAIL > 0: D is D_MAIN + D_TAIL columns (not padded to a power of two); DV_TAIL: this program also owns the
    output columns D_MAIN.. (whole D in one program)."""
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
    if D_TAIL > 0:
        offs_t = D_MAIN + tl.arange(0, D_TAIL)
    else:
        offs_t = tl.arange(0, 16)  # placeholder: no tail columns

    q_base = q_ptr + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qm
    q_row_valid = offs_m < seq_q
    q_tail = q_row_valid  # placeholder when D has no tail
    if QK_CHUNK == D_MAIN:
        q = tl.load(q_base + offs_d[None, :] * stride_qd, mask=q_row_valid[:, None] & (offs_d[None, :] < HEAD_DIM),
                    other=0.0)
        if INTERPRET:
            q = q.to(tl.float32)
        if D_TAIL > 0:
            q_tail = tl.load(q_base + offs_t[None, :] * stride_qd,
                             mask=q_row_valid[:, None] & (offs_t[None, :] < HEAD_DIM), other=0.0)
            if INTERPRET:
                q_tail = q_tail.to(tl.float32)
    else:
        q = q_base + offs_d[None, :] * stride_qd
    k_base = k_ptr + batch * stride_kb + head * stride_kh
    v_base = v_ptr + batch * stride_vb + head * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if DV_TAIL:
        acc_tail = tl.zeros([BLOCK_M, D_TAIL], dtype=tl.float32)
    else:
        acc_tail = l_i  # placeholder, never updated

    kv_start = split * kv_per_split
    kv_stop = tl.minimum(kv_start + kv_per_split, seq_kv)
    # PEEL_KEY_TAIL=False: one loop, every step masked (the probe's test of whether the peeled step after a
    # pipelined loop is what goes wrong on an H200)
    kv_full_stop = kv_start + (kv_stop - kv_start) // BLOCK_N * BLOCK_N if PEEL_KEY_TAIL else kv_stop
    for start_n in range(kv_start, kv_full_stop, BLOCK_N):
        acc, acc_tail, l_i, m_i = _online_softmax_step(
            acc, acc_tail, l_i, m_i, q, q_tail, q_row_valid, k_base, v_base, start_n, seq_kv, offs_n, offs_d,
            offs_dv, offs_t, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
            HEAD_DIM, D_MAIN, D_TAIL, QK_CHUNK, EVEN_DV, DV_TAIL, not PEEL_KEY_TAIL, INTERPRET, DOT_PRECISION,
        )  # fmt: skip
    if kv_full_stop < kv_stop:
        acc, acc_tail, l_i, m_i = _online_softmax_step(
            acc, acc_tail, l_i, m_i, q, q_tail, q_row_valid, k_base, v_base, kv_full_stop, seq_kv, offs_n, offs_d,
            offs_dv, offs_t, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
            HEAD_DIM, D_MAIN, D_TAIL, QK_CHUNK, EVEN_DV, DV_TAIL, True, INTERPRET, DOT_PRECISION,
        )  # fmt: skip

    out_rows = out_ptr + split * stride_out_split + bh * stride_out_bh + offs_m[:, None] * stride_out_m
    out = acc / l_i[:, None]
    tl.store(out_rows + offs_dv[None, :], out.to(out_ptr.dtype.element_ty),
             mask=q_row_valid[:, None] & (offs_dv[None, :] < HEAD_DIM))
    if DV_TAIL:
        out_tail = acc_tail / l_i[:, None]
        tl.store(out_rows + offs_t[None, :], out_tail.to(out_ptr.dtype.element_ty),
                 mask=q_row_valid[:, None] & (offs_t[None, :] < HEAD_DIM))
    if NUM_SPLITS > 1:
        if dv_chunk == 0:
            lse = m_i + tl.log2(l_i)
            tl.store(lse_ptr + split * stride_lse_split + bh * seq_q + offs_m, lse, mask=q_row_valid)


@triton.jit
def _combine_splits_kernel(
    partial_ptr, lse_ptr, out_ptr, seq_q, num_splits, stride_partial_split, stride_lse_split,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
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

# Under the interpreter: small tiles (the interpreter's cost grows with tile size), and at head_dim 512 the
# output-D split, so the CPU tests run that path too.
_INTERPRETER_CONFIG = AttentionConfig(block_m=32, block_n=32, block_dv=256)


def _qk_chunk(q: torch.Tensor, block_d: int, block_m: int) -> int:
    """The launch's q k^T D chunk (kernels/support/attention_config.py qk_chunk; block_d: D's main part, which keeps q
    resident) for q's device and dtype."""
    capability = _config.device_facts(_device_index(q.device))[0] if q.is_cuda else None
    return _config.qk_chunk(q.dtype, _config.dot_precision(q.dtype, triton_interpreting()), q.shape[-1], block_m,
                            capability)


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else 0  # CUDA tensors carry their index (fake ones may not)


def launch_with_config(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
                       config: AttentionConfig, split_head_dim: bool = True, peel_key_tail: bool = True):
    """The kernel at an explicit configuration, no routing (the tuner, the GPU probe and tests call it).
    split_head_dim=False pads D to one power of two even where two parts would pad less; peel_key_tail=False
    masks every key step instead of one peeled step after the loop (bench/attention_key_tail_probe.py compares
    them on a GPU)."""
    batch, heads, seq_q, head_dim = q.shape
    seq_kv = k.shape[2]
    padded = _config.padded_head_dim(head_dim)
    d_main, d_tail = _config.split_head_dim(head_dim)
    qk_chunk = _qk_chunk(q, d_main, config.block_m)
    if not split_head_dim and d_tail:
        d_main, d_tail, qk_chunk = padded, 0, padded if qk_chunk == d_main else qk_chunk  # q stays resident
    whole_d = config.block_dv >= padded
    block_dv = d_main if whole_d else config.block_dv
    num_dv_chunks = 1 if whole_d else cdiv(head_dim, block_dv)
    dv_tail = whole_d and d_tail > 0
    kv_per_split = cdiv(cdiv(seq_kv, config.kv_splits), config.block_n) * config.block_n
    kv_splits = cdiv(seq_kv, kv_per_split)  # no empty splits
    interpret = triton_interpreting()
    out = q.new_empty((batch, heads, seq_q, head_dim))
    if kv_splits > 1:
        target = torch.empty((kv_splits, batch * heads, seq_q, head_dim), device=q.device, dtype=torch.float32)
        lse = torch.empty((kv_splits, batch * heads, seq_q), device=q.device, dtype=torch.float32)
    else:
        target, lse = out.view(1, batch * heads, seq_q, head_dim), out
    qk_scale = (head_dim**-0.5 if scale is None else scale) * _LOG2_E
    grid = (batch * heads * cdiv(seq_q, config.block_m) * num_dv_chunks * kv_splits,)
    _attention_forward_kernel[grid](
        q, k, v, target, lse,
        *q.stride(), *k.stride(), *v.stride(),
        target.stride(0), target.stride(1), target.stride(2), lse.stride(0) if kv_splits > 1 else 0,
        heads, seq_q, seq_kv, kv_per_split, qk_scale,
        HEAD_DIM=head_dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n, D_MAIN=d_main, D_TAIL=d_tail,
        BLOCK_DV=block_dv, QK_CHUNK=qk_chunk, NUM_DV_CHUNKS=num_dv_chunks, DV_TAIL=dv_tail,
        EVEN_DV=dv_tail or head_dim % block_dv == 0, NUM_SPLITS=kv_splits, INTERPRET=interpret,
        PEEL_KEY_TAIL=peel_key_tail,
        DOT_PRECISION=_config.dot_precision(q.dtype, interpret),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if kv_splits > 1:
        combine_block_m = 16
        _combine_splits_kernel[(batch * heads * cdiv(seq_q, combine_block_m),)](
            target, lse, out, seq_q, kv_splits, target.stride(0), lse.stride(0),
            HEAD_DIM=head_dim, BLOCK_M=combine_block_m, BLOCK_D=padded, num_warps=4,
        )  # fmt: skip
    return out


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Triton flash attention (see the module docstring); any strides in, contiguous (B, H, N_q, D) out."""
    check_attention(q, k, v, scale)
    if triton_interpreting():
        return launch_with_config(q, k, v, scale, _INTERPRETER_CONFIG)
    index = _device_index(q.device)
    call = (index, q.dtype, _config.dot_precision(q.dtype, False), q.shape[0] * q.shape[1], q.shape[2], k.shape[2],
            q.shape[3])
    with torch.cuda.device(q.device):  # triton launches on the current device
        while True:
            config = _config.choose(TABLE, *call)
            split = not _config.key_tail_unverified(q.dtype, call[2], q.shape[3], k.shape[2], config.block_m,
                                                    config.block_n, _config.device_facts(index)[0])
            try:
                return launch_with_config(q, k, v, scale, config, split_head_dim=split)
            except triton.runtime.errors.OutOfResources:
                if not _config.demote(*call):  # the estimate was off: the next candidate, once per bucket
                    raise


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


register_backward("attention", attention_backward)


# --- the calls its checks and benchmarks make -----------------------------------------------------------------

# (B, H, N, D): the SD-VAE mid-block (one head of 512 channels) at 512 and 1024 px, multi-head transformer decoders
# (gpu_check, bench/).
BENCH_SHAPES = ((1, 1, 4096, 512), (1, 1, 16384, 512), (1, 8, 4096, 64), (1, 2, 9216, 96))
# The attention calls of each family's decode (issue 21), (B, H, N_q = N_kv, D): the mid-block of SD/SDXL at 512
# and 1024 px (FLUX.1 and FLUX.2 at 1024 px are the same call), Wan 2.1 per frame at 480x832 and 720x1280 (one
# latent frame per chunk: the mid-block sees the chunk's latent frames as the batch; 1 and 4 bound the chunks),
# SVD's 14 frames at 576x1024, and fastdec's ViT-S/ViT-B decoders at 512 px. DC-AE and the tiny decoders have none.
DECODE_SHAPES = {
    "SD 512": (1, 1, 4096, 512), "SD/FLUX 1024": (1, 1, 16384, 512),
    "Wan 480p": (1, 1, 6240, 384), "Wan 480p x4": (4, 1, 6240, 384), "Wan 720p": (1, 1, 14400, 384),
    "SVD 576x1024": (14, 1, 9216, 512), "ViT-S 512": (1, 6, 1024, 64), "ViT-B 512": (1, 12, 1024, 64),
}
GPU_DTYPE = torch.bfloat16  # the dtype its speed goal is stated in


def check_call(r) -> tuple:
    return r(1, 2, 33, 64), r(1, 2, 33, 64), r(1, 2, 33, 64), None


def compile_cases(quick: bool) -> list[CompileCase]:
    """Every family's decode call in each dtype and fp32 precision (Wan's in its strided layout): the config the
    dispatch chooses (table or heuristic) must compile, fit and not spill; every other usable candidate (what the
    tuner may write into the table) is a tuned case, of which one must fit. Called on compile_check's fake GPU."""
    precisions = (("bf16", "tf32"), ("fp16", "tf32"), ("fp32", "tf32"), ("fp32", "ieee"))
    cases = list(itertools.product(precisions, DECODE_SHAPES.values()))
    if quick:
        cases = [(("bf16", "tf32"), DECODE_SHAPES["SD 512"]), (("fp32", "ieee"), DECODE_SHAPES["ViT-S 512"]),
                 (("bf16", "tf32"), DECODE_SHAPES["Wan 480p"])]

    def run(shape, dtype, precision, config):
        with _config.tf32(precision == "tf32"):
            if config is None:
                return attention_triton(*_inputs(shape, dtype))
            return launch_with_config(*_inputs(shape, dtype), None, config)

    found = []
    for (dtype, precision), shape in cases:
        name = f"{dtype}{'' if dtype != 'fp32' else '-' + precision} {shape_label(shape)}"
        found.append(CompileCase(name, functools.partial(run, shape, dtype, precision, None)))
        if quick:
            continue
        capability, num_sms, shared = _config.device_facts(0)
        chosen = _config.heuristic_configs(DTYPES[dtype], precision, shape[0] * shape[1], shape[2], shape[2],
                                           shape[3], capability, num_sms, shared)
        found += [CompileCase(f"{name} candidates", functools.partial(run, shape, dtype, precision, c), tuned=True)
                  for c in chosen[1:]]
    return found


def _inputs(shape, dtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if shape[3] == 384:  # Wan's layout
        return _config.wan_qkv(shape, lambda s: cuda_empty(s, dtype))
    return tuple(cuda_empty(shape, dtype) for _ in range(3))


def gpu_cases(device: torch.device, dtype: torch.dtype, smoke: bool) -> list[GpuCase]:
    """Against every SDPA backend that takes the shape (and the torch.compile'd reference): contiguous, Wan's
    strided q/k/v (head_dim 384) and (B, N, H, D)-major heads; fp32 with TF32 off (exact)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend, q, k, v, scale):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)

    def make(shape, layout):
        def randn(s):
            return torch.randn(s, device=device, dtype=dtype)
        if layout == "wan":
            return *_config.wan_qkv(shape, randn), None
        if layout == "heads_major":
            b, h, n, d = shape
            return *(randn((b, n, h, d)).transpose(1, 2) for _ in range(3)), None
        return *(randn(shape) for _ in range(3)), None

    backends = (SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION)
    peers = {f"sdpa:{backend.name.lower()}": functools.partial(sdpa, backend) for backend in backends}
    if smoke:
        shapes = [((1, 1, 64, 512), "contiguous"), ((1, 2, 33, 64), "heads_major"), ((2, 1, 40, 384), "wan")]
    else:
        shapes = [(shape, "contiguous") for shape in BENCH_SHAPES] + [
            (DECODE_SHAPES["Wan 480p"], "wan"), ((1, 8, 4096, 64), "heads_major")]
    return [GpuCase(f"{shape_label(shape)} {layout}", functools.partial(make, shape, layout), peers,
                    flops=4 * math.prod(shape) * shape[2]) for shape, layout in shapes]
