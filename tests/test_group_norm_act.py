"""fastdec.group_norm_act: the Triton kernels (on CPU through triton's interpreter, on CUDA natively) against a
float64 F.group_norm + activation, both launch paths (single program per group, split into chunks), the op's
registration (opcheck, torch.compile), gradients and input validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import compile_fullgraph, needs_triton, record_kernel_launches, triton_devices
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import GROUP_NORM_ACT, GROUP_NORM_ACT_GRAD

from fastdec import ops
from fastdec.kernels import group_norm_act as gna

DEVICES = triton_devices("group_norm_act")
needs_kernel = needs_triton("group_norm_act")
LAYOUTS = ("contiguous", "channels_last", "sliced", "transposed")


def make_input(shape, dtype, device, layout="contiguous", seed=0, offset=0.5, scale=2.0):
    """N(offset, scale^2) values in the requested memory layout:
    channels_last (channels_last_3d for 5-D), sliced (every other channel of a wider tensor: not dense) or
    transposed (last two spatial dims swapped in memory: they do not flatten to one stride)."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "sliced":
        wide = (shape[0], 2 * shape[1], *shape[2:])
        return (torch.randn(wide, generator=gen) * scale + offset).to(dtype=dtype, device=device)[:, ::2]
    if layout == "transposed":
        swapped = (*shape[:-2], shape[-1], shape[-2])
        x = torch.randn(swapped, generator=gen) * scale + offset
        return x.to(dtype=dtype, device=device).transpose(-1, -2)
    x = (torch.randn(shape, generator=gen) * scale + offset).to(dtype=dtype, device=device)
    if layout == "channels_last":
        return x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    assert layout == "contiguous", layout
    return x


def make_params(channels, has_weight, has_bias, dtype, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(channels, generator=gen) + 1.0).to(dtype=dtype, device=device) if has_weight else None
    bias = torch.randn(channels, generator=gen).to(dtype=dtype, device=device) if has_bias else None
    return weight, bias


def expected(x, num_groups, weight, bias, eps, act):
    """float64 group norm + act of the same (exactly widened) values (torch.group_norm takes 1-value groups).

    The affine part is applied here rather than by torch.group_norm: torch 2.11's CUDA group-norm backward fails
    ("tensor does not have a device") for a bias without a weight (seen on an H200, 2026-12-04)."""
    y = torch.group_norm(x.double(), num_groups, None, None, eps)
    per_channel = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.double().view(per_channel)
    if bias is not None:
        y = y + bias.double().view(per_channel)
    return {"none": y, "silu": F.silu(y), "relu": F.relu(y)}[act]


def assert_matches(out, x, want):
    """Same shape, dtype and layout as torch.empty_like(x); values within the dtype's tolerance (NaN fails)."""
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert out.stride() == torch.empty_like(x).stride()
    torch.testing.assert_close(out.double(), want, **GROUP_NORM_ACT[x.dtype])


@pytest.fixture
def poisoned_empty_like(monkeypatch):
    """torch.empty_like fills float tensors with NaN, so an output element the kernel does not write fails."""
    original = torch.empty_like

    def empty_like_nan(*args, **kwargs):
        t = original(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty_like", empty_like_nan)


@pytest.fixture
def launches(monkeypatch):
    """Counts launches of the three kernels and makes the eager reference raise: only the Triton code may run."""

    kernels = {name: f"_group_norm_{name}_kernel" for name in ("stats", "combine", "act")}
    return record_kernel_launches(monkeypatch, gna, kernels, "group_norm_act_reference")


@st.composite
def problems(draw):
    """Random small problems: C <= 192, H x W <= 40 x 40 (or T x H x W <= 4 x 12 x 12), any layout and dtype."""
    num_groups = draw(st.sampled_from([1, 2, 3, 4, 8, 32]))
    group_channels = draw(st.integers(1, 192 // num_groups))
    if draw(st.integers(0, 4)) == 0:
        spatial = (draw(st.integers(1, 4)), draw(st.integers(1, 12)), draw(st.integers(1, 12)))
    else:
        spatial = (draw(st.integers(1, 40)), draw(st.integers(1, 40)))
    batch = draw(st.integers(1, 2))
    # keep the interpreter quick: at most ~30k elements
    while batch * num_groups * group_channels * math.prod(spatial) > 30_000:
        spatial = tuple(max(1, s // 2) for s in spatial)
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    parts = draw(st.integers(1, 4))
    return {
        "shape": (batch, num_groups * group_channels, *spatial),
        "num_groups": num_groups,
        "dtype": dtype,
        "param_dtype": draw(st.sampled_from([dtype, torch.float32])),
        "layout": draw(st.sampled_from(LAYOUTS)),
        "act": draw(st.sampled_from(gna.ACTIVATIONS)),
        "has_weight": draw(st.booleans()),
        "has_bias": draw(st.booleans()),
        "chunk_size": None if parts == 1 else math.ceil(math.prod(spatial) / parts),
        "offset": draw(st.floats(-4.0, 4.0)),
        "seed": draw(st.integers(0, 2**16)),
    }


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=20, deadline=None)
@given(problem=problems())
def test_random_problems_match_float64_group_norm(device, problem):
    p = problem
    x = make_input(p["shape"], p["dtype"], device, p["layout"], p["seed"], offset=p["offset"])
    weight, bias = make_params(p["shape"][1], p["has_weight"], p["has_bias"], p["param_dtype"], device, p["seed"])
    out = gna.group_norm_act_triton(x, p["num_groups"], weight, bias, 1e-6, p["act"], chunk_size=p["chunk_size"])
    assert_matches(out, x, expected(x, p["num_groups"], weight, bias, 1e-6, p["act"]))


DECODER_SHAPES = [
    # (shape, num_groups): SD-VAE channel counts that are not powers of two, odd / prime sizes, 1x1, 5-D video
    ((1, 96, 7, 9), 32),
    ((1, 192, 13, 11), 32),
    ((2, 320, 5, 3), 32),
    ((1, 320, 1, 1), 32),
    ((3, 64, 1, 1), 32),
    ((1, 128, 17, 19), 32),
    ((1, 32, 31, 37), 1),
    ((2, 64, 3, 5, 7), 32),
    ((1, 96, 2, 1, 11), 3),
]


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(("shape", "num_groups"), DECODER_SHAPES)
def test_decoder_shapes(device, shape, num_groups, layout, poisoned_empty_like):
    x = make_input(shape, torch.float32, device, layout)
    weight, bias = make_params(shape[1], True, True, torch.float32, device)
    out = ops.group_norm_act(x, num_groups, weight, bias, 1e-6, "silu")
    assert_matches(out, x, expected(x, num_groups, weight, bias, 1e-6, "silu"))


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_dtypes_on_both_paths(device, dtype, layout, poisoned_empty_like):
    x = make_input((1, 96, 9, 13), dtype, device, layout)
    weight, bias = make_params(96, True, True, dtype, device)
    want = expected(x, 32, weight, bias, 1e-5, "relu")
    for chunk_size in (None, 40):
        assert_matches(gna.group_norm_act_triton(x, 32, weight, bias, 1e-5, "relu", chunk_size=chunk_size), x, want)


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_single_program_path(device, layout, launches, poisoned_empty_like):
    """A small problem runs one launch that computes the statistics and normalizes."""
    x = make_input((2, 64, 6, 5), torch.float32, device, layout)
    weight, bias = make_params(64, True, False, torch.float32, device)
    out = ops.group_norm_act(x, 32, weight, bias, 1e-6, "silu")
    assert [kernel.launches for kernel in launches.values()] == [0, 0, 1]
    assert_matches(out, x, expected(x, 32, weight, bias, 1e-6, "silu"))


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_split_path_is_deterministic(device, layout, launches, poisoned_empty_like):
    """Chunks of 7 positions (not a multiple of the tile): partial statistics, combine, normalize."""
    x = make_input((1, 96, 7, 9), torch.float32, device, layout, offset=3.0)
    weight, bias = make_params(96, False, True, torch.float32, device)
    out = gna.group_norm_act_triton(x, 32, weight, bias, 1e-6, "relu", chunk_size=7)
    assert [kernel.launches for kernel in launches.values()] == [1, 1, 1]
    assert_matches(out, x, expected(x, 32, weight, bias, 1e-6, "relu"))
    again = gna.group_norm_act_triton(x, 32, weight, bias, 1e-6, "relu", chunk_size=7)
    assert torch.equal(out, again)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(1, 512, 64, 64), (1, 512, 128, 128), (1, 128, 512, 512), (8, 128, 512, 512)])
def test_batch_one_is_split_across_the_gpu(shape, channels_last):
    """32 groups on a 132-SM GPU: the default plan gives each SM about 4 programs of whole tiles."""
    batch, channels, height, width = shape
    spatial = height * width
    plan = gna.plan_launch(batch, 32, channels // 32, spatial, channels_last, target_programs=4 * 132)
    programs = batch * plan.num_group_blocks * plan.num_chunks
    assert 3 * 132 <= programs <= 8 * 132
    assert plan.chunk_size % plan.block_s == 0
    assert plan.block_g * plan.block_cg * plan.block_s <= gna.TILE_ELEMENTS


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk_size", [None, 50])
def test_offset_data_does_not_cancel(device, chunk_size):
    """mean = 1000 std: E[x^2] - E[x]^2 in fp32 loses the variance; the shifted/Chan scheme does not."""
    x = make_input((1, 8, 16, 16), torch.float32, device, offset=1000.0, scale=1.0)
    out = gna.group_norm_act_triton(x, 2, None, None, 1e-6, "none", chunk_size=chunk_size)
    want = expected(x, 2, None, None, 1e-6, "none")
    atol = 1000.0 * 2.0**-24 * 8  # one ulp of the mean, in units of std, with margin
    grouped = x.reshape(1, 2, -1)
    naive_var = (grouped * grouped).mean(-1) - grouped.mean(-1) ** 2
    naive_error = ((grouped - grouped.mean(-1, keepdim=True)) * torch.rsqrt(naive_var[..., None] + 1e-6)).reshape(
        x.shape
    ).double() - want
    assert naive_error.abs().max() > 10 * atol  # the data does expose cancellation
    torch.testing.assert_close(out.double(), want, rtol=0, atol=atol)


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", gna.ACTIVATIONS)
@pytest.mark.parametrize("chunk_size", [None, 9])
def test_nan_spreads_over_its_group_only(device, act, chunk_size):
    x = make_input((1, 8, 5, 5), torch.float32, device, "channels_last")
    x[0, 5, 2, 3] = math.nan  # group 2 of 4
    out = gna.group_norm_act_triton(x, 4, None, None, 1e-6, act, chunk_size=chunk_size)
    assert out[:, 4:6].isnan().all()
    assert out[:, :4].isfinite().all() and out[:, 6:].isfinite().all()
    want = expected(x, 4, None, None, 1e-6, act)
    torch.testing.assert_close(out.double(), want, equal_nan=True, **GROUP_NORM_ACT[torch.float32])


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
def test_op_runs_the_triton_kernel(device, launches):
    x = make_input((1, 32, 4, 4), torch.float32, device)
    out = torch.ops.fastdec.group_norm_act(x, 8, None, None, 1e-6, "silu")
    assert launches["act"].launches == 1
    assert_matches(out, x, expected(x, 8, None, None, 1e-6, "silu"))


def test_reference_ops_context_runs_the_reference(monkeypatch):
    def kernel_must_not_run(*args, **kwargs):
        raise AssertionError("reference_ops() must not launch the Triton kernels")

    monkeypatch.setattr(gna, "group_norm_act_triton", kernel_must_not_run)
    x = make_input((1, 32, 4, 4), torch.float32, "cpu", "channels_last")
    with ops.reference_ops():
        out = ops.group_norm_act(x, 8, None, None, 1e-6, "relu")
    assert_matches(out, x, expected(x, 8, None, None, 1e-6, "relu"))


OPCHECK_CASES = [
    # (shape, num_groups, dtype, layout, has_weight, has_bias, act)
    ((2, 8, 3, 5), 4, torch.float32, "contiguous", True, True, "silu"),
    ((1, 12, 4, 3), 3, torch.float32, "channels_last", True, False, "relu"),
    ((1, 8, 2, 3, 2), 2, torch.float32, "channels_last", False, True, "none"),
    ((2, 6, 3, 3), 2, torch.bfloat16, "contiguous", False, False, "silu"),
]


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("shape", "num_groups", "dtype", "layout", "has_weight", "has_bias", "act"), OPCHECK_CASES)
def test_opcheck(device, shape, num_groups, dtype, layout, has_weight, has_bias, act):
    requires_grad = dtype == torch.float32
    x = make_input(shape, dtype, device, layout).requires_grad_(requires_grad)
    weight, bias = make_params(shape[1], has_weight, has_bias, dtype, device)
    weight, bias = (None if t is None else t.requires_grad_(requires_grad) for t in (weight, bias))
    torch.library.opcheck(torch.ops.fastdec.group_norm_act.default, (x, num_groups, weight, bias, 1e-6, act))


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_without_graph_breaks(device):
    class ResBlockTail(torch.nn.Module):
        """GroupNorm + SiLU + conv, as in an SD-VAE ResNet block."""

        def __init__(self):
            super().__init__()
            self.norm = torch.nn.GroupNorm(4, 8, eps=1e-6)
            self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            h = ops.group_norm_act(x, 4, self.norm.weight, self.norm.bias, self.norm.eps, "silu")
            return x + self.conv(h)

    module = ResBlockTail().to(device)
    x = make_input((1, 8, 6, 6), torch.float32, device, "channels_last")
    torch.testing.assert_close(*compile_fullgraph(module, x), rtol=0, atol=0)


GRAD_CASES = [
    # (shape, num_groups, layout, has_weight, has_bias, act)
    ((2, 4, 3, 3), 2, "contiguous", True, True, "silu"),
    ((1, 6, 2, 3), 3, "channels_last", True, False, "relu"),
    ((2, 4, 2, 2, 2), 2, "contiguous", False, True, "none"),
    ((1, 4, 3, 2), 1, "channels_last", False, False, "silu"),
]


@pytest.mark.parametrize(("shape", "num_groups", "layout", "has_weight", "has_bias", "act"), GRAD_CASES)
def test_gradcheck_reference_path(shape, num_groups, layout, has_weight, has_bias, act):
    x = make_input(shape, torch.float64, "cpu", layout).requires_grad_(True)
    weight, bias = make_params(shape[1], has_weight, has_bias, torch.float64, "cpu")
    weight, bias = (None if t is None else t.requires_grad_(True) for t in (weight, bias))

    def fn(x, weight, bias):
        return ops.group_norm_act(x, num_groups, weight, bias, 1e-5, act)

    with ops.reference_ops():
        assert torch.autograd.gradcheck(fn, (x, weight, bias))


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("shape", "num_groups", "layout", "has_weight", "has_bias", "act"), GRAD_CASES)
def test_fused_gradients_match_autograd(device, shape, num_groups, layout, has_weight, has_bias, act):
    """The op (Triton forward, fp32 backward) against float64 autograd through F.group_norm + act."""
    x = make_input(shape, torch.float32, device, layout, offset=1.0)
    weight, bias = make_params(shape[1], has_weight, has_bias, torch.float32, device)
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(device)
    inputs = [t.requires_grad_(True) for t in (x, weight, bias) if t is not None]
    got = torch.autograd.grad(ops.group_norm_act(x, num_groups, weight, bias, 1e-5, act), inputs, grad_out)

    wide_x, wide_weight, wide_bias = (
        None if t is None else t.detach().double().requires_grad_(True) for t in (x, weight, bias)
    )
    reference = expected(wide_x, num_groups, wide_weight, wide_bias, 1e-5, act)
    wide_inputs = [t for t in (wide_x, wide_weight, wide_bias) if t is not None]
    want = torch.autograd.grad(reference, wide_inputs, grad_out.double())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, **GROUP_NORM_ACT_GRAD)


BAD_INPUTS = [
    # (x shape, num_groups, weight shape, weight dtype, eps, act, message)
    ((2, 8, 5), 4, None, None, 1e-6, "silu", "4-D"),
    ((1, 8, 2, 2, 2, 2), 4, None, None, 1e-6, "silu", "4-D"),
    ((1, 6, 3, 3), 4, None, None, 1e-6, "silu", "divisible by num_groups"),
    ((1, 8, 3, 3), 0, None, None, 1e-6, "silu", "num_groups"),
    ((1, 8, 3, 3), 4, (4,), torch.float32, 1e-6, "silu", r"weight must have shape \(8,\)"),
    ((1, 8, 3, 3), 4, (8, 1), torch.float32, 1e-6, "silu", r"weight must have shape \(8,\)"),
    ((1, 8, 3, 3), 4, (8,), torch.float16, 1e-6, "silu", "weight must be torch.float32"),
    ((1, 8, 3, 3), 4, (8,), torch.int32, 1e-6, "silu", "weight must be"),
    ((1, 8, 3, 3), 4, None, None, 0.0, "silu", "eps"),
    ((1, 8, 3, 3), 4, None, None, -1e-5, "silu", "eps"),
    ((1, 8, 3, 3), 4, None, None, math.nan, "silu", "eps"),
    ((1, 8, 3, 3), 4, None, None, 1e-6, "gelu", "act must be one of"),
]


@pytest.mark.parametrize(("shape", "num_groups", "weight_shape", "weight_dtype", "eps", "act", "message"), BAD_INPUTS)
def test_bad_input_raises_value_error(shape, num_groups, weight_shape, weight_dtype, eps, act, message):
    x = torch.randn(shape)
    weight = None if weight_shape is None else torch.ones(weight_shape, dtype=weight_dtype)
    with pytest.raises(ValueError, match=message):
        torch.ops.fastdec.group_norm_act(x, num_groups, weight, None, eps, act)
    with pytest.raises(ValueError, match=message):
        gna.group_norm_act_triton(x, num_groups, weight, None, eps, act)


def test_bad_dtype_device_and_chunk_size_raise_value_error():
    with pytest.raises(ValueError, match="float16, bfloat16, float32 or float64"):
        gna.check_group_norm_act(torch.ones(1, 4, 2, 2, dtype=torch.int64), 2, None, None, 1e-6, "none")
    with pytest.raises(ValueError, match="bias is on meta but x is on cpu"):
        gna.check_group_norm_act(torch.ones(1, 4, 2, 2), 2, None, torch.ones(4, device="meta"), 1e-6, "none")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        gna.group_norm_act_triton(torch.ones(1, 4, 2, 2), 2, None, None, 1e-6, "none", chunk_size=0)


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    x = torch.empty(0, 8, 3, 3, device=device)
    assert ops.group_norm_act(x, 4, None, None, 1e-6, "silu").shape == (0, 8, 3, 3)


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_tiled_decoding_statistics_and_normalize_pass_run_the_kernels(device, layout, launches, poisoned_empty_like):
    """Tiling's two steps per slab: the chunks' (count, mean, M2) from the stats kernel, merged by Chan's formula,
    then the normalize kernel alone with the merged statistics: the same result as the op on the whole tensor."""
    x = make_input((2, 64, 9, 7), torch.float32, device, layout, offset=3.0)
    weight, bias = make_params(64, True, True, torch.float32, device)
    counts, means, m2 = gna.group_moments_triton(x, 32)
    assert [kernel.launches for kernel in launches.values()] == [1, 0, 0]
    assert counts.sum() * 2 * 32 == x.numel() and means.shape == m2.shape == (2, 32, counts.numel())
    mean = (counts * means).sum(-1) / counts.sum()
    var = (m2 + counts * (means - mean[..., None]).square()).sum(-1) / counts.sum()
    out = gna.group_norm_act_triton(x, 32, weight, bias, 1e-6, "silu", stats=(mean, var))
    assert [kernel.launches for kernel in launches.values()] == [1, 0, 1]
    assert_matches(out, x, expected(x, 32, weight, bias, 1e-6, "silu"))


@pytest.mark.parametrize("act", gna.ACTIVATIONS)
def test_tiled_decoding_references_match_the_op(act):
    x = make_input((2, 48, 5, 6), torch.float32, "cpu", "channels_last", offset=2.0)
    weight, bias = make_params(48, True, True, torch.float32, "cpu")
    counts, means, m2 = gna.group_moments_reference(x, 16)
    assert counts.tolist() == [3 * 30] and means.shape == (2, 16, 1)
    var = m2[..., 0] / counts
    out = gna.group_norm_act_given_stats_reference(x, 16, weight, bias, 1e-6, act, stats=(means[..., 0], var))
    torch.testing.assert_close(out.double(), expected(x, 16, weight, bias, 1e-6, act), **GROUP_NORM_ACT[x.dtype])
