"""fastdec.attention: the Triton flash-attention kernel (on CPU through triton's interpreter, on CUDA natively)
against F.scaled_dot_product_attention in fp32, every launch path (whole D, output-D chunks, key splits with the
combine kernel, chunked fp32 q k^T), strided inputs, the op's registration (opcheck, torch.compile), gradients and
input validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import compile_fullgraph, needs_triton, record_kernel_launches, triton_devices
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import ATTENTION, ATTENTION_GRAD

from fastdec import ops
from fastdec.kernels import attention as attn

DEVICES = triton_devices("attention")
needs_kernel = needs_triton("attention")
LAYOUTS = ("contiguous", "tokens_major", "strided_head_dim", "broadcast_heads")
reference = attn.attention_reference  # kept before the fixtures below replace the module's copy


def make_input(shape, dtype, device, layout="contiguous", seed=0):
    """N(0, 1) values in the requested layout: tokens_major is a (B, N, H, D) tensor seen as (B, H, N, D) (how a
    linear projection's output is split into heads), strided_head_dim takes every other element of a 2D-wide
    tensor, broadcast_heads expands one head to all (stride 0), as for shared keys/values."""
    batch, heads, tokens, head_dim = shape
    gen = torch.Generator().manual_seed(seed)
    if layout == "tokens_major":
        return torch.randn(batch, tokens, heads, head_dim, generator=gen).to(dtype=dtype, device=device).transpose(1, 2)
    if layout == "strided_head_dim":
        return torch.randn(batch, heads, tokens, 2 * head_dim, generator=gen).to(dtype=dtype, device=device)[..., ::2]
    if layout == "broadcast_heads":
        return torch.randn(batch, 1, tokens, head_dim, generator=gen).to(dtype=dtype, device=device).expand(shape)
    assert layout == "contiguous", layout
    return torch.randn(shape, generator=gen).to(dtype=dtype, device=device)


def expected(q, k, v, scale=None):
    """The fp32 reference of the same (possibly fp16/bf16) inputs."""
    return reference(q.float(), k.float(), v.float(), scale)


def assert_matches_reference(out, q, k, v, scale=None):
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert torch.isfinite(out).all(), "the kernel produced NaN/inf (or left elements unwritten)"
    torch.testing.assert_close(out.float(), expected(q, k, v, scale), **ATTENTION[q.dtype])


@pytest.fixture
def poisoned_buffers(monkeypatch):
    """new_empty and torch.empty fill float tensors with NaN: an output (or key-split partial) element the kernels
    do not write fails the comparison."""
    new_empty, empty = torch.Tensor.new_empty, torch.empty

    def poison(t):
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **kw: poison(new_empty(self, *a, **kw)))
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(empty(*a, **kw)))


@pytest.fixture
def launches(monkeypatch):
    """Records the forward and combine launches and makes the eager reference raise: only Triton code may run."""
    kernels = {name: f"_{name}_kernel" for name in ("attention_forward", "combine_splits")}
    return record_kernel_launches(monkeypatch, attn, kernels, "attention_reference")


@st.composite
def problems(draw):
    """Random small problems: B <= 2, H <= 3, N <= 150 (1, primes and odd sizes included), head_dim up to 256
    (512 has its own tests: the interpreter is slow there), any dtype, layout per tensor and scale."""
    head_dim = draw(st.sampled_from([8, 16, 32, 40, 64, 80, 96, 128, 192, 256]))
    max_tokens = 150 if head_dim <= 128 else 70
    return {
        "batch": draw(st.integers(1, 2)),
        "heads": draw(st.integers(1, 3)),
        "seq_q": draw(st.integers(1, max_tokens)),
        "seq_kv": draw(st.integers(1, max_tokens)),
        "head_dim": head_dim,
        "dtype": draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
        "layouts": [draw(st.sampled_from(LAYOUTS)) for _ in range(3)],
        "scale": draw(st.one_of(st.none(), st.floats(0.02, 0.3))),
        "seed": draw(st.integers(0, 2**16)),
    }


@needs_kernel
@pytest.mark.skipif("cpu" not in DEVICES, reason="random problems run under the interpreter (CUDA: fixed cases)")
@settings(max_examples=30, deadline=None)
@given(problem=problems())
def test_random_problems_match_sdpa(problem):
    p = problem
    q_shape = (p["batch"], p["heads"], p["seq_q"], p["head_dim"])
    kv_shape = (p["batch"], p["heads"], p["seq_kv"], p["head_dim"])
    q, k, v = (
        make_input(shape, p["dtype"], "cpu", layout, p["seed"] + i)
        for i, (shape, layout) in enumerate(zip((q_shape, kv_shape, kv_shape), p["layouts"], strict=True))
    )
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(attn, "attention_reference", pytest.fail)  # the op must run the Triton kernel
        out = ops.attention(q, k, v, p["scale"])
    assert_matches_reference(out, q, k, v, p["scale"])


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [16, 64, 96, 128, 192, 256])
def test_supported_head_dims(device, dtype, head_dim, launches, poisoned_buffers):
    """Every listed head_dim (powers of two and padded ones) on both q k^T paths (fp32: chunked over D)."""
    q = make_input((1, 2, 37, head_dim), dtype, device, "tokens_major", seed=1)
    k, v = (make_input((1, 2, 45, head_dim), dtype, device, seed=s) for s in (2, 3))
    assert_matches_reference(ops.attention(q, k, v), q, k, v)


CUDA_CASES = [
    # (B, H, N_q, N_kv, D, dtype, layout)
    (1, 1, 1024, 1024, 512, torch.bfloat16, "contiguous"),
    (1, 1, 777, 1000, 512, torch.float16, "tokens_major"),
    (1, 8, 1024, 1024, 64, torch.bfloat16, "tokens_major"),
    (2, 2, 333, 512, 96, torch.bfloat16, "contiguous"),  # 517 keys: tests/test_attention_gpu_findings.py
    (1, 4, 500, 300, 256, torch.float16, "strided_head_dim"),
    (1, 1, 300, 257, 512, torch.float32, "contiguous"),
    (2, 3, 129, 65, 128, torch.float32, "broadcast_heads"),
]


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs CUDA with triton")
@pytest.mark.parametrize(("batch", "heads", "seq_q", "seq_kv", "head_dim", "dtype", "layout"), CUDA_CASES)
def test_cuda_decoder_shapes(batch, heads, seq_q, seq_kv, head_dim, dtype, layout, launches, poisoned_buffers):
    q = make_input((batch, heads, seq_q, head_dim), dtype, "cuda", layout, seed=1)
    k = make_input((batch, heads, seq_kv, head_dim), dtype, "cuda", layout, seed=2)
    v = make_input((batch, heads, seq_kv, head_dim), dtype, "cuda", layout, seed=3)
    out = ops.attention(q, k, v)
    assert launches["attention_forward"].grids
    assert_matches_reference(out, q, k, v)


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_dim_512_splits_the_output_head_dim(device, dtype, launches, poisoned_buffers):
    """SD-VAE's mid-block attention (one head of 512 channels); the interpreter config splits D into 2 chunks."""
    q = make_input((1, 1, 45, 512), dtype, device, seed=1)
    k = make_input((1, 1, 70, 512), dtype, device, "tokens_major", seed=2)
    v = make_input((1, 1, 70, 512), dtype, device, seed=3)
    out = ops.attention(q, k, v)
    if device == "cpu":
        query_blocks = math.ceil(45 / attn._INTERPRETER_CONFIG.block_m)
        assert launches["attention_forward"].grids == [(query_blocks * 512 // attn._INTERPRETER_CONFIG.block_dv,)]
    assert_matches_reference(out, q, k, v)


LAUNCH_CONFIGS = [
    pytest.param(attn.AttentionConfig(16, 16, block_dv=32), id="dv32"),
    pytest.param(attn.AttentionConfig(32, 16, block_dv=64), id="dv64-uneven"),
    pytest.param(attn.AttentionConfig(16, 32, kv_splits=3), id="kv3"),
    pytest.param(attn.AttentionConfig(32, 16, block_dv=32, kv_splits=2), id="dv32-kv2"),
    pytest.param(attn.AttentionConfig(64, 64, kv_splits=8), id="kv8-clipped"),
]


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", LAUNCH_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_launch_paths(device, config, dtype, launches, poisoned_buffers):
    """Output-D chunks (96 = 1.5 chunks of 64: a half-masked chunk), key splits merged by the combine kernel
    (8 splits of 97 keys in 64-key blocks leave 2: no empty split), and both at once."""
    q = make_input((2, 2, 37, 96), dtype, device, seed=1)
    k = make_input((2, 2, 97, 96), dtype, device, "tokens_major", seed=2)
    v = make_input((2, 2, 97, 96), dtype, device, "strided_head_dim", seed=3)
    out = attn.launch_with_config(q, k, v, 0.2, config)
    assert_matches_reference(out, q, k, v, 0.2)
    (grid,) = launches["attention_forward"].grids
    kv_per_split = math.ceil(math.ceil(97 / config.kv_splits) / config.block_n) * config.block_n
    splits = math.ceil(97 / kv_per_split)
    dv_chunks = math.ceil(96 / min(config.block_dv, 128))
    assert grid == (4 * math.ceil(37 / config.block_m) * dv_chunks * splits,)
    assert len(launches["combine_splits"].grids) == (splits > 1)


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_probes_launch_paths_agree(device, dtype, launches, poisoned_buffers):
    """The probe's other paths (bench/attention_key_tail_probe.py): split_head_dim=False runs 96 as one 128-wide part
    (what GPUs take with a key tail); peel_key_tail=False masks every key step instead of peeling the tail. Each
    gives the split, peeled launch's answer, with a key tail after one full key block."""
    q = make_input((1, 2, 37, 96), dtype, device, seed=1)
    k, v = (make_input((1, 2, 45, 96), dtype, device, seed=s) for s in (2, 3))
    config = attn.AttentionConfig(32, 32)
    for split, peel in ((True, True), (False, True), (True, False), (False, False)):
        out = attn.launch_with_config(q, k, v, None, config, split_head_dim=split, peel_key_tail=peel)
        assert_matches_reference(out, q, k, v)


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_chunked_qk_for_16_bit_inputs(device, dtype, launches, poisoned_buffers, monkeypatch):
    """The D-chunked q k^T that pre-Hopper GPUs use for fp16/bf16 at head_dim >= 256 (fp32 uses it everywhere)."""
    monkeypatch.setattr(attn, "_qk_chunk", lambda q, block_d, block_m: 32)
    q = make_input((1, 2, 37, 80), dtype, device, "tokens_major", seed=1)
    k, v = (make_input((1, 2, 45, 80), dtype, device, seed=s) for s in (2, 3))
    assert_matches_reference(attn.launch_with_config(q, k, v, None, attn.AttentionConfig(32, 32)), q, k, v)


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
def test_head_dim_512_key_splits(device, launches, poisoned_buffers):
    q = make_input((1, 1, 20, 512), torch.bfloat16, device, seed=1)
    k = make_input((1, 1, 50, 512), torch.bfloat16, device, seed=2)
    v = make_input((1, 1, 50, 512), torch.bfloat16, device, seed=3)
    out = attn.launch_with_config(q, k, v, None, attn.AttentionConfig(32, 16, block_dv=512, kv_splits=3))
    assert len(launches["combine_splits"].grids) == 1
    assert_matches_reference(out, q, k, v)


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [1e-3, 0.125, 1.0])
def test_custom_scale(device, scale, launches):
    q, k, v = (make_input((1, 2, 33, 64), torch.float32, device, seed=s) for s in range(3))
    out = ops.attention(q, k, v, scale)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=scale), **ATTENTION[torch.float32])


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
def test_large_logits_stay_finite(device, launches):
    """Scores of several hundred: the running max must keep every exp2 in range."""
    q, k, v = (make_input((1, 1, 40, 32), torch.float32, device, seed=s) for s in range(3))
    out = ops.attention(q * 30, k * 30, v, 1.0)
    assert_matches_reference(out, q * 30, k * 30, v, 1.0)


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: all-NaN max, NaN - NaN
def test_nan_in_a_key_reaches_every_query(device, launches):
    """A NaN key (in the unmasked main loop) makes every score row NaN in SDPA; the kernel must not hide it."""
    q = make_input((1, 1, 20, 16), torch.float32, device, seed=0)
    k = make_input((1, 1, 50, 16), torch.float32, device, seed=1)
    v = make_input((1, 1, 50, 16), torch.float32, device, seed=2)
    k[0, 0, 7, 3] = math.nan
    assert torch.isnan(ops.attention(q, k, v)).all()


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: all-NaN max, NaN - NaN
def test_nan_in_a_query_stays_in_its_row(device, launches):
    q = make_input((1, 2, 40, 16), torch.float32, device, seed=0)
    k, v = (make_input((1, 2, 50, 16), torch.float32, device, seed=s) for s in (1, 2))
    q[0, 1, 33, 5] = math.nan
    out = ops.attention(q, k, v)
    assert torch.isnan(out[0, 1, 33]).all()
    finite = torch.ones(out.shape[:3], dtype=torch.bool)
    finite[0, 1, 33] = False
    torch.testing.assert_close(out[finite], expected(q, k, v)[finite], **ATTENTION[torch.float32])


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
def test_single_token(device, launches):
    """One key: the output is that value for every query (p = 1): exactly under the interpreter; on a GPU within 2
    ulp, since the score scaling contracts into one FMA, ``exp2(s * c - m)``, leaving p = 1 within an ulp (the
    H200's SDPA reference was 1 ulp off too, 2026-12-04)."""
    q = make_input((2, 3, 5, 48), torch.float32, device, seed=1)
    k, v = (make_input((2, 3, 1, 48), torch.float32, device, seed=s) for s in (2, 3))
    exact = device == "cpu"
    torch.testing.assert_close(ops.attention(q, k, v), v.expand(2, 3, 5, 48), rtol=0 if exact else 2**-22, atol=0)


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
def test_reference_ops_context_runs_the_reference(device, monkeypatch):
    def kernel_must_not_run(*args, **kwargs):
        raise AssertionError("the Triton launcher ran inside reference_ops()")

    monkeypatch.setattr(attn, "attention_triton", kernel_must_not_run)
    q, k, v = (make_input((1, 1, 9, 16), torch.float32, device, seed=s) for s in range(3))
    with ops.reference_ops():
        out = ops.attention(q, k, v)
    torch.testing.assert_close(out, reference(q, k, v), rtol=0, atol=0)


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("shape_q", "shape_kv", "dtype", "scale"),
    [((1, 2, 9, 16), (1, 2, 13, 16), torch.float32, None), ((2, 1, 5, 96), (2, 1, 3, 96), torch.bfloat16, 0.5)],
)
def test_opcheck(device, shape_q, shape_kv, dtype, scale):
    q = make_input(shape_q, dtype, device, seed=1).requires_grad_()
    k = make_input(shape_kv, dtype, device, "tokens_major", seed=2).detach().requires_grad_()
    v = make_input(shape_kv, dtype, device, seed=3).requires_grad_()
    torch.library.opcheck(torch.ops.fastdec.attention.default, (q, k, v, scale))


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_without_graph_breaks(device):
    class SelfAttention(torch.nn.Module):
        """A VAE mid-block attention: qkv projection, heads split from a (B, N, H*D) tensor, output projection."""

        def __init__(self, channels=32, heads=2):
            super().__init__()
            self.heads = heads
            self.qkv = torch.nn.Linear(channels, 3 * channels)
            self.proj = torch.nn.Linear(channels, channels)

        def forward(self, x):
            batch, tokens, channels = x.shape
            q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            out = ops.attention(q, k, v)
            return x + self.proj(out.transpose(1, 2).reshape(batch, tokens, channels))

    module = SelfAttention().to(device)
    x = torch.randn(1, 24, 32, device=device)
    torch.testing.assert_close(*compile_fullgraph(module, x), rtol=0, atol=0)


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("seq_q", "seq_kv", "head_dim", "scale"), [(7, 11, 16, None), (5, 3, 64, 0.3)])
def test_gradients_match_autograd_of_sdpa(device, seq_q, seq_kv, head_dim, scale):
    q = make_input((2, 2, seq_q, head_dim), torch.float32, device, "tokens_major", seed=1).requires_grad_()
    k = make_input((2, 2, seq_kv, head_dim), torch.float32, device, seed=2).requires_grad_()
    v = make_input((2, 2, seq_kv, head_dim), torch.float32, device, seed=3).requires_grad_()
    grad_out = make_input((2, 2, seq_q, head_dim), torch.float32, device, seed=4)
    grads = torch.autograd.grad(ops.attention(q, k, v, scale), (q, k, v), grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64 = F.scaled_dot_product_attention(q64, k64, v64, scale=scale)
    want = torch.autograd.grad(out64, (q64, k64, v64), grad_out.double())
    for got, ref in zip(grads, want, strict=True):
        torch.testing.assert_close(got.double(), ref, **ATTENTION_GRAD)


def _tensors(q_shape=(1, 2, 8, 16), k_shape=None, v_shape=None, dtypes=(torch.float32,) * 3):
    k_shape = k_shape or q_shape
    return (
        torch.zeros(q_shape, dtype=dtypes[0]),
        torch.zeros(k_shape, dtype=dtypes[1]),
        torch.zeros(v_shape or k_shape, dtype=dtypes[2]),
    )


@pytest.mark.parametrize(
    ("inputs", "scale", "message"),
    [
        (_tensors((2, 8, 16), (2, 8, 16)), None, "must be 4-D"),
        (_tensors(k_shape=(2, 2, 8, 16)), None, "batch and heads must match"),
        (_tensors(k_shape=(1, 1, 8, 16)), None, "batch and heads must match"),
        (_tensors(k_shape=(1, 2, 8, 32)), None, "head_dim must match"),
        (_tensors(k_shape=(1, 2, 9, 16), v_shape=(1, 2, 8, 16)), None, "same number of tokens"),
        (_tensors((1, 2, 8, 640)), None, r"head_dim must be in \[1, 512\]"),
        (_tensors((1, 2, 0, 16), (1, 2, 8, 16)), None, "empty input"),
        (_tensors(k_shape=(1, 2, 0, 16)), None, "empty input"),
        (_tensors(dtypes=(torch.float32, torch.float16, torch.float32)), None, "dtypes differ"),
        (_tensors(dtypes=(torch.float64,) * 3), None, "use float16, bfloat16 or float32"),
        (_tensors(), 0.0, "scale must be a finite number > 0"),
        (_tensors(), -0.5, "scale must be a finite number > 0"),
        (_tensors(), math.nan, "scale must be a finite number > 0"),
    ],
)
def test_bad_input_raises_value_error(inputs, scale, message):
    with pytest.raises(ValueError, match=message):
        attn.check_attention(*inputs, scale)
    with pytest.raises(ValueError, match=message):
        ops.attention(*inputs, scale)


def test_mixed_devices_raise_value_error():
    q, k, v = _tensors()
    with pytest.raises(ValueError, match="different devices"):
        attn.check_attention(q, k.to("meta"), v)
