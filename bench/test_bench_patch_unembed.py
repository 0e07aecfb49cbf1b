"""patch_unembed: fastdec's one-pass Triton kernel vs the eager reference vs torch.compile(reference), plus a plain
device copy of the same bytes (the bandwidth ceiling), at decoder output sizes on CUDA; a tiny case on CPU.

GB/s counts the bytes read (tokens, bias) plus the bytes written (image) once per call.
"""

from __future__ import annotations

import pytest
import torch
from op_bench import case as op_case
from op_bench import dtype_name, skip_untimed, timed_fn

from fastdec import ops
from fastdec.kernels import patch_unembed as pu


def case(device, batch, side, patch, channels, dtype, out_dtype, out, has_bias):
    name = (
        f"{device}-B{batch}-{side}px-p{patch}-C{channels}-{dtype_name(dtype)}-to-{dtype_name(out_dtype)}-{out}"
        f"{'-bias' if has_bias else ''}"
    )
    return op_case(device, batch, side, patch, channels, dtype, out_dtype, out, has_bias, id=name)


CASES = [
    case("cuda", batch, side, patch, 3, torch.bfloat16, out_dtype, "to_unit", True)
    for batch in (1, 8)
    for side in (512, 1024)
    for patch in (8, 16)
    for out_dtype in (torch.float32, torch.bfloat16)
] + [
    # Pure permutation (no bias, identity, same dtype): directly comparable with the device copy.
    case("cuda", 8, 1024, 8, 3, torch.bfloat16, torch.bfloat16, "identity", False),
    case("cpu", 1, 64, 8, 3, torch.float32, torch.float32, "to_unit", True),
]
IMPLS = ["fastdec", "eager", "compiled", "device_copy"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("device", "batch", "side", "patch", "channels", "dtype", "out_dtype", "out", "has_bias"),
    CASES,
)
def test_patch_unembed(
    benchmark, measure, impl, device, batch, side, patch, channels, dtype, out_dtype, out, has_bias
):
    skip_untimed("patch_unembed", impl, device, interpreter=True)
    grid = side // patch
    features = patch * patch * channels
    tokens = torch.randn(batch, grid * grid, features, device=device).to(dtype)
    bias = torch.randn(features, device=device).to(dtype) if has_bias else None
    args = (tokens, patch, grid, grid, bias, out, out_dtype)
    image_bytes = batch * channels * side * side * out_dtype.itemsize
    nbytes = tokens.numel() * tokens.element_size() + image_bytes + (0 if bias is None else bias.numel() * 2)
    benchmark.group = (
        f"patch_unembed {device} B={batch} {side}x{side} p={patch} C={channels} "
        f"{dtype_name(dtype)}->{dtype_name(out_dtype)} {out}{' +bias' if has_bias else ''}"
    )
    benchmark.extra_info["impl"] = impl

    if impl == "device_copy":  # same bytes, contiguous read and write: what the hardware can move
        source = torch.empty(image_bytes // out_dtype.itemsize, dtype=dtype, device=device)
        target = torch.empty(source.shape, dtype=out_dtype, device=device)
        measure(lambda: target.copy_(source), nbytes=source.numel() * source.element_size() + image_bytes)
        return
    fn = timed_fn(impl, ops.patch_unembed, pu.patch_unembed_reference)

    image = measure(lambda: fn(*args), nbytes=nbytes)

    expected = pu.patch_unembed_reference(*args)
    torch.testing.assert_close(image.float(), expected.float(), rtol=2**-7, atol=1e-5)
