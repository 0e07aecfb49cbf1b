"""Test tolerances, in one place. Low-precision outputs are compared against an fp32/fp64 reference."""

from __future__ import annotations

import torch

# Rounding one fp32 result to the output dtype (half an ulp), with margin: one ulp relative (fp16 2^-10,
# bf16 2^-7), plus an absolute floor for values near zero.
OUTPUT_ROUNDING = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.float16: {"rtol": 2**-10, "atol": 1e-5},
    torch.bfloat16: {"rtol": 2**-7, "atol": 1e-5},
}

# patch_unembed: fp32 math then one cast; a uint8 pixel, rounded to nearest, is within half a level of 255 * unit.
PATCH_UNEMBED = {**OUTPUT_ROUNDING, torch.uint8: {"rtol": 0.0, "atol": 0.5}}
# Its gradients: one fp32 product (x 0.5) cast to the token dtype; grad_bias is an fp32 sum over B*N values.
PATCH_UNEMBED_GRAD = OUTPUT_ROUNDING

# Whole decoders (fastdec vs diffusers, fused ops vs their references), fp32: max |error| / max |reference|.
# Dozens of layers whose sums run in a different order (folded upsampler, fused norms, another attention).
DECODER_FP32_REL = 1e-4
# Folding "nearest x2 + 3x3 conv" into a 2x2 conv: the same products, summed in another order.
UPSAMPLE_FOLD = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.float64: {"rtol": 1e-12, "atol": 1e-12}}
# fp16/bf16 decoders: error against the fp32 reference may be at most this multiple of diffusers' own error.
DECODER_LOW_PRECISION_VS_DIFFUSERS = 1.1

# group_norm_act: fp32 statistics, one cast on store; compared with a float64 reference of the same inputs.
# fp32 atol is on the unit scale of a normalized output: the fp32 mean of offset data (mean a few std away from 0)
# is rounded to an ulp of |mean|, which moves outputs by about |mean| / std * 2^-24 * |weight|.
GROUP_NORM_ACT = {
    **OUTPUT_ROUNDING,
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
}
# Its fp32 backward (torch ops, fp32 group sums) against float64 autograd of F.group_norm + act.
GROUP_NORM_ACT_GRAD = {"rtol": 1e-4, "atol": 1e-5}

# attention: fp32 statistics and accumulator; exp2 with the scale applied in fp32 and a different summation order
# than SDPA's math path (fp32 error ~ |logit| * 2^-24 per probability, outputs are O(|v|)). fp16/bf16 are compared
# with the fp32 reference of the same inputs: one output rounding (rtol), plus on GPU p is rounded to the input
# dtype before p @ v, which moves an output by at most half an ulp of max|v| (tests keep |v| <= ~4: atol).
ATTENTION = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 2**-10, "atol": 2**-10},
    torch.bfloat16: {"rtol": 2**-7, "atol": 2**-7},
}
# Its gradients (fp32 autograd through the reference) against float64 autograd of F.scaled_dot_product_attention.
ATTENTION_GRAD = {"rtol": 1e-4, "atol": 1e-5}
# Reconstruction PSNR through real weights (fp32) against the published reference numbers, in dB.
RECONSTRUCTION_PSNR_DB = 0.05
# A decoder cast to fp16 and run in fp32 on fp16 latents (diffusers' force_upcast path) against the fp32 original:
# max |error| / max |reference|. Every weight and input carries fp16 rounding (2^-11); measured 4e-4 on the tiny VAE.
UPCAST_FROM_FP16_REL = 2e-3
