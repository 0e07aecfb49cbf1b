"""attention: fastdec's Triton flash attention vs every PyTorch SDPA backend that accepts the shape (math,
memory-efficient, flash, cuDNN; a backend that raises for a shape is skipped) vs torch.compile of eager attention,
on CUDA in bf16 at decoder sizes: the SD-VAE mid-block (one head of 512 channels over a 512^2 or 1024^2 image:
4096 or 16384 tokens) and multi-head transformer-decoder shapes. One tiny fp32 case on CPU keeps the suite
runnable in CI.

TFLOP/s counts the two matmuls, 4 * B * H * N_q * N_kv * D per call, whatever the implementation computes
(fastdec's output-D split recomputes q k^T; that extra work is not counted).
On CPU, "fastdec" is the eager reference path (triton's interpreter is far too slow to time), and it is skipped
when the interpreter is on.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from op_bench import case, compiled, dtype_name, shape_label, skip_untimed
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastdec import ops
from fastdec.kernels import attention as attn

SDPA_BACKENDS = {
    "sdpa_math": SDPBackend.MATH,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
}
IMPLS = ["fastdec", *SDPA_BACKENDS, "compiled"]


CASES = [
    case("cuda", shape, torch.bfloat16)
    for shape in attn.BENCH_SHAPES
] + [case("cpu", (1, 1, 256, 64), torch.float32)]


def eager_attention(q, k, v):
    """Attention as eager PyTorch code: scores in the input dtype, softmax in fp32."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return scores.float().softmax(-1).to(q.dtype) @ v


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("device", "shape", "dtype"), CASES)
def test_attention(benchmark, measure, impl, device, shape, dtype):
    if device == "cpu" and impl not in ("fastdec", "sdpa_math"):
        pytest.skip("on CPU only the reference path and SDPA's math backend are timed (tiny CI case)")
    skip_untimed("attention", impl, device)
    batch, heads, tokens, head_dim = shape
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
    benchmark.group = f"attention {device} {shape_label(shape)} {dtype_name(dtype)}"
    benchmark.extra_info["impl"] = impl

    if impl == "fastdec":
        fn = lambda: ops.attention(q, k, v)  # noqa: E731
    elif impl == "compiled":
        compiled_attention = compiled(eager_attention)
        fn = lambda: compiled_attention(q, k, v)  # noqa: E731
    else:
        backend = SDPA_BACKENDS[impl]

        def fn():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)

    try:
        fn()  # compiles / tunes outside the timing, and finds backends that refuse this shape
    except RuntimeError as error:
        pytest.skip(f"{impl} does not run this shape: {str(error).splitlines()[0]}")
    out = measure(fn, flops=4 * batch * heads * tokens * tokens * head_dim)

    want = attn.attention_reference(q.float(), k.float(), v.float())
    # fastdec: fp32 scores and softmax, p rounded to bf16; the others may round the scores to bf16 first
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2**-7 if impl == "fastdec" else 2**-5}[dtype]
    torch.testing.assert_close(out.float(), want, rtol=tolerance, atol=tolerance)
