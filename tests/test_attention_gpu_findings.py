"""What the first GPU run found in the attention kernel (an H200 with triton 3.6.0 and torch 2.11, 2026-12-04;
bench/results/2026-12-04-gpu-run-h200/), kept as tests so that the next GPU run says whether it still holds.

With D split into D_MAIN + D_TAIL (head_dim 96 = 64 + 32, Wan's 384 = 256 + 128) and q resident, the masked key-tail
step gave outputs far off SDPA, while Triton's interpreter runs the same tiles right (checked on CPU with these
configs) and the same head_dims without a key tail passed. The cause is not found. Three failing launches (96 at
(128, 64, 8 warps, 3 stages) and (128, 64, 4, 2), Wan's 384 at (64, 32, 8, 2)), compiled with triton 3.6.0 for sm_90
on a CPU (2026-12-05), rule three causes out: in the peeled step no two live shared-memory buffers overlap, every
shared store follows a barrier, and the loop's async prefetches are drained before it (Wan's strided launch issues
no async copies at all). The second H200 session (bench/results/2026-12-04-gpu-run-h200-call5-7/) found D padded to
one power of two right in each of these calls, so fastdec launches them padded (kernels/support/attention_config.py
``key_tail_unverified``; the routing is tested on CPU in tests/test_attention_dispatch.py, the result here). An
XPASS of the split launch means it may take them again.
"""

from __future__ import annotations

import pytest
import torch
from tolerances import ATTENTION

from fastdec.kernels import attention as attn
from fastdec.kernels.support import attention_config as config
from fastdec.kernels.support.triton_import import TRITON_IMPORT_ERROR

# (q shape, keys, dtype): the calls that failed there (tests/test_attention.py, tests/test_attention_dispatch.py)
FAILED_ON_H200 = [
    ((1, 2, 37, 96), 45, torch.float16),
    ((1, 2, 37, 96), 45, torch.bfloat16),
    ((2, 2, 333, 96), 517, torch.bfloat16),
    ((2, 1, 45, 384), 45, torch.bfloat16),
]


needs_gpu = pytest.mark.skipif(TRITON_IMPORT_ERROR is not None or not torch.cuda.is_available(),
                               reason="needs a CUDA GPU")


def call(shape, keys, dtype):
    """Seeded q, k, v on the GPU (Wan's strided layout at head_dim 384) and float64 SDPA's output."""
    generator = torch.Generator().manual_seed(0)
    batch, heads, seq_q, head_dim = shape
    if head_dim == 384:  # Wan's strided q/k/v
        q, k, v = config.wan_qkv(shape, lambda s: torch.randn(s, generator=generator).to("cuda", dtype))
    else:
        q = torch.randn(shape, generator=generator).to("cuda", dtype)
        k, v = (torch.randn((batch, heads, keys, head_dim), generator=generator).to("cuda", dtype) for _ in range(2))
    return q, k, v, torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())


@needs_gpu
@pytest.mark.xfail(reason="wrong on an H200 with triton 3.6.0 (2026-12-04)", strict=False)
@pytest.mark.parametrize(("shape", "keys", "dtype"), FAILED_ON_H200)
def test_split_head_dim_key_tail_in_the_kernel(shape, keys, dtype):
    """The split launch itself, with the configuration the dispatch would choose, against float64 SDPA."""
    q, k, v, expected = call(shape, keys, dtype)
    batch, heads, seq_q, head_dim = shape
    chosen = config.choose(attn.TABLE, q.device.index or 0, dtype, config.dot_precision(dtype, False),
                           batch * heads, seq_q, keys, head_dim)
    torch.testing.assert_close(attn.launch_with_config(q, k, v, None, chosen).double(), expected, **ATTENTION[dtype])


@needs_gpu
@pytest.mark.parametrize(("shape", "keys", "dtype"), FAILED_ON_H200)
def test_the_dispatch_gets_these_calls_right(shape, keys, dtype, monkeypatch):
    """What fastdec runs for them (D padded, the Triton kernel, never the eager reference) against float64 SDPA."""
    q, k, v, expected = call(shape, keys, dtype)
    monkeypatch.setattr(attn, "attention_reference", pytest.fail)
    torch.testing.assert_close(attn.attention_triton(q, k, v).double(), expected, **ATTENTION[dtype])
