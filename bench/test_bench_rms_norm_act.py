"""rms_norm_act: fastdec's Triton kernel vs eager PyTorch (diffusers' WanRMS_norm arithmetic: F.normalize * sqrt(C)
* gamma, then SiLU) vs torch.compile of that eager code, plus a plain device copy of the same bytes (the bandwidth
ceiling), at Wan 2.1 decoder sizes on CUDA (bf16, NCTHW and channels_last_3d); one small fp32 case on CPU.

GB/s counts the bytes that must move once per call: x read once plus the output written once. fastdec reads x
once from memory (the second pass hits cache) and writes once; eager reads x for the norm, writes and reads the
normalized tensor for the affine and the activation.
On CPU, "fastdec" is the eager reference path (triton's interpreter is far too slow to time), and it is skipped
when the interpreter is on.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from op_bench import case, dtype_name, shape_label, skip_untimed, timed_fn

from fastdec import ops
from fastdec.kernels import rms_norm_act as rna

CASES = [
    case("cuda", shape, torch.bfloat16, layout)
    for shape in rna.BENCH_SHAPES
    for layout in ("contiguous", "channels_last")
] + [case("cpu", (1, 96, 2, 32, 32), torch.float32, "contiguous")]
IMPLS = ["fastdec", "eager", "compiled", "device_copy"]


def eager_wan_norm_silu(x, gamma):
    """diffusers' WanRMS_norm (fp32 normalize for low precision, cast back) followed by SiLU."""
    normalized = F.normalize(x.float(), dim=1).to(x.dtype)
    return F.silu(normalized * x.shape[1] ** 0.5 * gamma.view(-1, 1, 1, 1))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("device", "shape", "dtype", "layout"), CASES)
def test_rms_norm_act(benchmark, measure, impl, device, shape, dtype, layout):
    skip_untimed("rms_norm_act", impl, device)
    x = torch.randn(shape, device=device).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last_3d)
    gamma = (torch.randn(shape[1], device=device) + 1.0).to(dtype)
    eps = 1e-12 * shape[1] ** -0.5
    nbytes = 2 * x.numel() * x.element_size()
    benchmark.group = f"rms_norm_act {device} {shape_label(shape)} {dtype_name(dtype)} {layout}"
    benchmark.extra_info["impl"] = impl

    if impl == "device_copy":
        target = torch.empty_like(x)
        measure(lambda: target.copy_(x), nbytes=nbytes)
        return
    fn = timed_fn(impl, lambda x, gamma: ops.rms_norm_act(x, gamma, None, eps, "silu", "clamp"), eager_wan_norm_silu)
    out = measure(lambda: fn(x, gamma), nbytes=nbytes)

    expected = rna.rms_norm_act_reference(x.float(), gamma.float(), None, eps, "silu", "clamp")
    tolerance = {torch.bfloat16: 2**-6, torch.float32: 1e-5}[dtype]  # eager bf16 rounds the norm before the act
    torch.testing.assert_close(out.float(), expected, rtol=tolerance, atol=tolerance)
