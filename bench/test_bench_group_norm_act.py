"""group_norm_act: fastdec's Triton kernels vs eager PyTorch (F.group_norm then the activation) vs torch.compile
of that eager code, plus a plain device copy of the same bytes (the bandwidth ceiling), at SD-VAE decoder sizes
on CUDA (fp16, NCHW and channels_last); one small fp32 case on CPU.

GB/s counts the bytes that must move once per call: x read once plus the output written once. fastdec reads x
twice (statistics, then normalize), eager PyTorch reads it twice and writes twice more for the activation.
On CPU, "fastdec" is the eager reference path (triton's interpreter is far too slow to time), and it is skipped
when the interpreter is on.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from op_bench import case, dtype_name, shape_label, skip_untimed, timed_fn

from fastdec import ops
from fastdec.kernels import group_norm_act as gna

NUM_GROUPS, EPS, ACT = gna.GROUPS, 1e-6, "silu"  # SD-VAE's ResNet-block norm


CASES = [
    case("cuda", shape, torch.float16, layout)
    for shape in gna.BENCH_SHAPES
    for layout in ("contiguous", "channels_last")
] + [case("cpu", (1, 64, 32, 32), torch.float32, "contiguous")]
IMPLS = ["fastdec", "eager", "compiled", "device_copy"]


def eager_group_norm_silu(x, weight, bias):
    return F.silu(F.group_norm(x, NUM_GROUPS, weight, bias, EPS))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("device", "shape", "dtype", "layout"), CASES)
def test_group_norm_act(benchmark, measure, impl, device, shape, dtype, layout):
    skip_untimed("group_norm_act", impl, device)
    x = torch.randn(shape, device=device).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(shape[1], device=device).to(dtype)
    bias = torch.randn(shape[1], device=device).to(dtype)
    nbytes = 2 * x.numel() * x.element_size()
    benchmark.group = f"group_norm_act {device} {shape_label(shape)} {dtype_name(dtype)} {layout}"
    benchmark.extra_info["impl"] = impl

    if impl == "device_copy":
        target = torch.empty_like(x)
        measure(lambda: target.copy_(x), nbytes=nbytes)
        return
    fn = timed_fn(impl, lambda x, weight, bias: ops.group_norm_act(x, NUM_GROUPS, weight, bias, EPS, ACT),
                  eager_group_norm_silu)
    out = measure(lambda: fn(x, weight, bias), nbytes=nbytes)

    expected = gna.group_norm_act_reference(x.float(), NUM_GROUPS, weight.float(), bias.float(), EPS, ACT)
    tolerance = {torch.float16: 2**-9, torch.float32: 1e-5}[dtype]  # eager fp16 rounds the norm before the act
    torch.testing.assert_close(out.float(), expected, rtol=tolerance, atol=tolerance)
