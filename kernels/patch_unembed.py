"""Patch unembedding: (B, grid_h*grid_w, p*p*C) tokens -> (B, C, grid_h*p, grid_w*p) image, in one pass.

Token layout. Tokens run row-major over the patch grid (token ``n = gy * grid_w + gx``), and each token holds
its p x p patch as (p_row, p_col, C), channels fastest. So, with ``y = gy*p + py`` and ``x = gx*p + px``:

    image[b, c, y, x] = transform(tokens[b, gy*grid_w + gx, (py*p + px)*C + c] + bias[(py*p + px)*C + c])

Tiny example, p=2, C=1, grid 1x2 (two tokens, image 2x4):

    tokens[0] = [[a0, a1, a2, a3],      image[0, 0] = [[a0, a1, b0, b1],
                 [b0, b1, b2, b3]]                     [a2, a3, b2, b3]]

This is the ``unpatchify`` of DiT/ViT-style decoders:
``x.reshape(B, gh, gw, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, gh*p, gw*p)``.

The sum ``tokens + bias`` and the transform are computed in fp32, then cast once to the output dtype:

* ``out="identity"``: the value itself.
* ``out="to_unit"``: ``clamp((v + 1) / 2, 0, 1)``, mapping [-1, 1] to [0, 1]. Its derivative is 0.5 where
  ``(v + 1) / 2`` lies in [0, 1], bounds included, and 0 where it is clamped.
* ``out_dtype`` is fp32, fp16, bf16 (None = tokens.dtype), or uint8 with ``out="to_unit"`` only: then the
  pixel is ``floor(255 * clamp((v + 1) / 2, 0, 1) + 0.5)`` (round half up), an 8-bit image. uint8 is
  not differentiable.

The Triton kernel writes the output coalesced: each program owns a run of consecutive pixels of one image
(contiguous along W, wrapping over rows) for a block of channels, and gathers them from the tokens; a token's
channels are adjacent, so a [channels, pixels] tile reads whole (p_col, C) spans. Tokens may have any strides.
"""

from __future__ import annotations

import functools
import itertools

import torch
from torch import Tensor

from fastdec.kernels.support.cases import DTYPES, CompileCase, GpuCase, cuda_empty
from fastdec.kernels.support.dispatch import cpu_kernel, cuda_kernel, register_backward
from fastdec.kernels.support.triton_import import cdiv, next_power_of_2, tl, triton

OUT_MODES = ("identity", "to_unit")
TOKEN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.uint8)


def check_patch_unembed(
    tokens: Tensor,
    patch: int,
    grid_h: int,
    grid_w: int,
    bias: Tensor | None = None,
    out: str = "identity",
    out_dtype: torch.dtype | None = None,
) -> tuple[int, int, int, int]:
    """Validates the arguments (ValueError naming the problem) and returns the output shape (B, C, H, W)."""
    name = "fastdec.patch_unembed"
    if tokens.dim() != 3:
        raise ValueError(
            f"{name}: tokens must be 3-D (B, grid_h*grid_w, p*p*C), got {tokens.dim()}-D with shape "
            f"{tuple(tokens.shape)}"
        )
    if tokens.dtype not in TOKEN_DTYPES:
        raise ValueError(f"{name}: tokens dtype must be float32, float16 or bfloat16, got {tokens.dtype}")
    if patch < 1:
        raise ValueError(f"{name}: patch must be >= 1, got {patch}")
    if grid_h < 1 or grid_w < 1:
        raise ValueError(f"{name}: grid_h and grid_w must be >= 1, got grid_h={grid_h}, grid_w={grid_w}")
    batch, count, features = tokens.shape
    if count != grid_h * grid_w:
        raise ValueError(
            f"{name}: token count ({count}) must equal grid_h*grid_w = {grid_h}*{grid_w} = "
            f"{grid_h * grid_w}; pass the grid the tokens were made on"
        )
    if features == 0 or features % (patch * patch):
        raise ValueError(
            f"{name}: the last dim of tokens ({features}) must be a positive multiple of patch*patch = "
            f"{patch * patch} (each token holds a p x p x C patch)"
        )
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != features:
            raise ValueError(
                f"{name}: bias must be 1-D of length p*p*C = {features}, got shape {tuple(bias.shape)}"
            )
        if bias.device != tokens.device:
            raise ValueError(f"{name}: bias is on {bias.device} but tokens are on {tokens.device}; move it")
        if bias.dtype not in TOKEN_DTYPES:
            raise ValueError(f"{name}: bias dtype must be float32, float16 or bfloat16, got {bias.dtype}")
    if out not in OUT_MODES:
        raise ValueError(f"{name}: out must be one of {OUT_MODES}, got {out!r}")
    if out_dtype is not None and out_dtype not in OUT_DTYPES:
        raise ValueError(f"{name}: out_dtype must be None or one of {OUT_DTYPES}, got {out_dtype}")
    if out_dtype == torch.uint8 and out != "to_unit":
        raise ValueError(f"{name}: out_dtype=torch.uint8 needs out='to_unit' (values in [0, 1]), got {out!r}")
    channels = features // (patch * patch)
    return batch, channels, grid_h * patch, grid_w * patch


# --- Triton kernel ------------------------------------------------------------------------------------------


@triton.jit
def _round_to_bf16(value):
    """fp32 rounded to the nearest bf16 (ties to even), still as fp32, so the cast that follows is exact. The GPU
    cast already rounds this way; triton's CPU interpreter truncates, and this keeps both equal to torch."""
    bits = value.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(value != value, value, bits.to(tl.float32, bitcast=True))  # NaN payloads could round to inf


@triton.jit
def _patch_unembed_kernel(
    tokens_ptr,
    bias_ptr,
    out_ptr,
    channels,
    grid_w,
    width,
    pixels,  # height * width of one output image
    stride_tb,
    stride_tn,
    stride_tf,
    stride_bias,
    stride_ob,
    stride_oc,
    PATCH: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    TO_UNIT: tl.constexpr,
    TO_UINT8: tl.constexpr,
    TO_BF16: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_PIX: tl.constexpr,
):
    pid_pix = tl.program_id(0)
    pid_c = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)

    pix = pid_pix * BLOCK_PIX + tl.arange(0, BLOCK_PIX)
    chan = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    pix_ok = pix < pixels
    chan_ok = chan < channels

    # Output pixel (y, x) -> token (gy, gx) and position (py, px) inside its patch.
    y = pix // width
    x = pix - y * width
    gy = y // PATCH
    gx = x // PATCH
    py = y - gy * PATCH
    px = x - gx * PATCH
    token = gy * grid_w + gx
    feature_base = (py * PATCH + px) * channels  # feature of channel 0 at this pixel

    feature = feature_base[None, :] + chan[:, None]  # [BLOCK_C, BLOCK_PIX]
    mask = chan_ok[:, None] & pix_ok[None, :]
    token_offset = batch * stride_tb + token.to(tl.int64) * stride_tn  # int64: big or oddly strided tokens
    src = tokens_ptr + token_offset[None, :] + feature.to(tl.int64) * stride_tf
    value = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        value += tl.load(bias_ptr + feature * stride_bias, mask=mask, other=0.0).to(tl.float32)
    if TO_UNIT:
        value = (value + 1.0) * 0.5
        value = tl.maximum(value, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as in torch.clamp
        value = tl.minimum(value, 1.0, propagate_nan=tl.PropagateNan.ALL)
    if TO_UINT8:
        value = tl.floor(value * 255.0 + 0.5)
    if TO_BF16:
        value = _round_to_bf16(value)

    dst = out_ptr + batch * stride_ob + chan[:, None].to(tl.int64) * stride_oc + pix[None, :]
    tl.store(dst, value.to(out_ptr.dtype.element_ty), mask=mask)


def patch_unembed_triton(
    tokens: Tensor,
    patch: int,
    grid_h: int,
    grid_w: int,
    bias: Tensor | None = None,
    out: str = "identity",
    out_dtype: torch.dtype | None = None,
    *,
    output: Tensor | None = None,
) -> Tensor:
    """Triton launcher (one kernel). ``output``, if given, is a contiguous buffer of the output shape and
    dtype to write into (every element is written); otherwise a new tensor is returned."""
    shape = check_patch_unembed(tokens, patch, grid_h, grid_w, bias, out, out_dtype)
    dtype = out_dtype or tokens.dtype
    if output is None:
        output = torch.empty(shape, dtype=dtype, device=tokens.device)
    elif (
        tuple(output.shape) != shape
        or output.dtype != dtype
        or output.device != tokens.device
        or not output.is_contiguous()
    ):
        raise ValueError(
            f"fastdec.patch_unembed: output must be a contiguous {dtype} tensor of shape {shape} on "
            f"{tokens.device}, got {output.dtype} {tuple(output.shape)} on {output.device} "
            f"(contiguous={output.is_contiguous()})"
        )
    batch, channels, height, width = shape
    if output.numel() == 0:
        return output
    pixels = height * width
    # About 4K elements per program: a block of channels (a token's channels are adjacent) by a run of pixels.
    block_c = min(next_power_of_2(channels), 16)
    block_pix = min(max(4096 // block_c, 128), next_power_of_2(pixels))
    grid = (cdiv(pixels, block_pix), cdiv(channels, block_c), batch)
    _patch_unembed_kernel[grid](
        tokens,
        tokens if bias is None else bias,  # unused pointer when there is no bias
        output,
        channels,
        grid_w,
        width,
        pixels,
        tokens.stride(0),
        tokens.stride(1),
        tokens.stride(2),
        0 if bias is None else bias.stride(0),
        output.stride(0),
        output.stride(1),
        PATCH=patch,
        HAS_BIAS=bias is not None,
        TO_UNIT=out == "to_unit",
        TO_UINT8=dtype == torch.uint8,
        TO_BF16=dtype == torch.bfloat16,
        BLOCK_C=block_c,
        BLOCK_PIX=block_pix,
        num_warps=8 if block_c * block_pix >= 4096 else 4,
    )
    return output


# --- eager reference and backward ---------------------------------------------------------------------------


def patch_unembed_reference(
    tokens: Tensor,
    patch: int,
    grid_h: int,
    grid_w: int,
    bias: Tensor | None = None,
    out: str = "identity",
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Eager reference: fp32 math, then a reshape/permute into a fresh contiguous image (differentiable)."""
    batch, channels, height, width = check_patch_unembed(tokens, patch, grid_h, grid_w, bias, out, out_dtype)
    dtype = out_dtype or tokens.dtype
    value = tokens.float() if bias is None else tokens.float() + bias.float()
    if out == "to_unit":
        unit = (value + 1.0) / 2.0
        # torch.where, not clamp: clamp's derivative at the bounds varies across torch versions; here it is 0.5.
        value = torch.where(unit < 0.0, 0.0, torch.where(unit > 1.0, 1.0, unit))
    if dtype == torch.uint8:
        value = torch.floor(value * 255.0 + 0.5)
    image = value.reshape(batch, grid_h, grid_w, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    result = torch.empty((batch, channels, height, width), dtype=dtype, device=tokens.device)
    result.view(batch, channels, grid_h, patch, grid_w, patch).copy_(image)
    return result


def patch_unembed_backward(
    grad_out: Tensor,
    tokens: Tensor,
    patch: int,
    grid_h: int,
    grid_w: int,
    bias: Tensor | None,
    out: str,
    out_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor | None]:
    """(grad_tokens, grad_bias | None): grad_out permuted back to the token layout, times the to_unit
    derivative (0.5 where not clamped, else 0); grad_bias sums that over batch and tokens; fp32 math."""
    batch, channels, _, _ = check_patch_unembed(tokens, patch, grid_h, grid_w, bias, out, out_dtype)
    if (out_dtype or tokens.dtype) == torch.uint8:
        raise ValueError("fastdec.patch_unembed: a uint8 output is not differentiable; use a float out_dtype")
    grad = grad_out.float().reshape(batch, channels, grid_h, patch, grid_w, patch)
    grad = grad.permute(0, 2, 4, 3, 5, 1).reshape(tokens.shape)
    if out == "to_unit":
        value = tokens.float() if bias is None else tokens.float() + bias.float()
        unit = (value + 1.0) / 2.0
        grad = torch.where((unit >= 0.0) & (unit <= 1.0), grad * 0.5, torch.zeros_like(grad))
    grad_bias = None if bias is None else grad.sum(dim=(0, 1)).to(bias.dtype)
    return grad.to(tokens.dtype), grad_bias


# --- registration: torch.ops.fastdec.patch_unembed --------------------------------------------------------------

FUSED = "triton"  # what runs the fused path; fastdec.ops.backends() says where it runs, and why not


@torch.library.custom_op("fastdec::patch_unembed", mutates_args=(), device_types="cpu")
def patch_unembed(
    tokens: Tensor,
    patch: int,
    grid_h: int,
    grid_w: int,
    bias: Tensor | None = None,
    out: str = "identity",
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """(B, grid_h*grid_w, p*p*C) tokens -> (B, C, grid_h*p, grid_w*p) image; see the module docstring."""
    fn = cpu_kernel(patch_unembed_triton, patch_unembed_reference)
    return fn(tokens, patch, grid_h, grid_w, bias, out, out_dtype)


@patch_unembed.register_kernel("cuda")
def _(tokens, patch, grid_h, grid_w, bias=None, out="identity", out_dtype=None):
    fn = cuda_kernel(patch_unembed_triton, patch_unembed_reference)
    return fn(tokens, patch, grid_h, grid_w, bias, out, out_dtype)


@patch_unembed.register_fake
def _(tokens, patch, grid_h, grid_w, bias=None, out="identity", out_dtype=None):
    shape = check_patch_unembed(tokens, patch, grid_h, grid_w, bias, out, out_dtype)
    return tokens.new_empty(shape, dtype=out_dtype or tokens.dtype)


register_backward("patch_unembed", patch_unembed_backward)


# --- the calls its checks and benchmarks make -----------------------------------------------------------------

# A ViT decoder's RGB head, (batch, image side, patch) with tokens (batch, grid^2, p*p*3), grid = side / p, a bias
# and out="to_unit" (gpu_check). compile_check: one image of 512 px in three output types.
BENCH_CASES = ((1, 512, 8), (8, 512, 8), (1, 1024, 16), (8, 1024, 8))
COMPILE_PATCHES = (8, 16)
COMPILE_OUTPUTS = (("fp32", "identity"), ("bf16", "identity"), ("u8", "to_unit"))
GPU_DTYPE = torch.bfloat16  # the dtype its speed goal is stated in


def check_call(r) -> tuple:
    return r(2, 12, 4 * 4 * 3), 4, 3, 4, r(48), "to_unit", None


def compile_cases(quick: bool) -> list[CompileCase]:
    cases = itertools.product(COMPILE_PATCHES, COMPILE_OUTPUTS)
    if quick:
        cases = ((16, ("u8", "to_unit")), (8, ("bf16", "identity")))

    def run(patch, out_dtype, out):
        grid = 512 // patch
        tokens, bias = cuda_empty((1, grid * grid, patch * patch * 3), "bf16"), cuda_empty((patch * patch * 3,), "bf16")
        patch_unembed_triton(tokens, patch, grid, grid, bias, out, DTYPES[out_dtype])

    return [CompileCase(f"bf16 -> {out_dtype} {out} p={patch} {512 // patch}x{512 // patch}",
                        functools.partial(run, patch, out_dtype, out)) for patch, (out_dtype, out) in cases]


def gpu_cases(device: torch.device, dtype: torch.dtype, smoke: bool) -> list[GpuCase]:
    def case(batch, side, patch):
        grid = side // patch

        def make():
            tokens = torch.randn(batch, grid * grid, patch * patch * 3, device=device, dtype=dtype)
            bias = torch.randn(patch * patch * 3, device=device, dtype=dtype)
            return tokens, patch, grid, grid, bias, "to_unit", torch.float32

        nbytes = batch * side * side * 3 * (dtype.itemsize + 4)  # tokens read, fp32 image written
        return GpuCase(f"B{batch} {side}^2 p{patch}", make, {"eager": patch_unembed_reference}, nbytes=nbytes)

    return [case(*shape) for shape in ([(1, 16, 8)] if smoke else BENCH_CASES)]
