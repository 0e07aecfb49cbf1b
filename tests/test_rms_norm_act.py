"""fastdec.rms_norm_act: the Triton kernel (on CPU through triton's interpreter, on CUDA natively) against a float64
channel RMSNorm + activation and against the diffusers modules it replaces (WanRMS_norm, RMSNorm over channels as
in DC-AE), the op's registration (opcheck, torch.compile), gradients, NaN handling and input validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import compile_fullgraph, needs_triton, record_kernel_launches, triton_devices
from hypothesis import given, settings
from hypothesis import strategies as st
from test_group_norm_act import LAYOUTS, assert_matches, make_input, make_params, poisoned_empty_like  # noqa: F401 (fixture)
from tolerances import GROUP_NORM_ACT, GROUP_NORM_ACT_GRAD

from fastdec import ops
from fastdec.kernels import rms_norm_act as rna

DEVICES = triton_devices("rms_norm_act")
needs_kernel = needs_triton("rms_norm_act")


def expected(x, weight, bias, eps, act, eps_mode):
    """float64 channel RMSNorm + act of the same (exactly widened) values."""
    wide = x.double()
    rms = wide.square().mean(1, keepdim=True).sqrt()
    y = wide / (rms.square() + eps).sqrt() if eps_mode == "add" else wide / rms.clamp_min(eps)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.double().view(shape)
    if bias is not None:
        y = y + bias.double().view(shape)
    return {"none": y, "silu": F.silu(y), "relu": F.relu(y)}[act]


@pytest.fixture
def launches(monkeypatch):
    """Counts launches of the kernel and makes the eager reference raise: only the Triton code may run."""
    return record_kernel_launches(monkeypatch, rna, {"act": "_rms_norm_act_kernel"}, "rms_norm_act_reference")


@st.composite
def problems(draw):
    """Random small problems: C <= 400, H x W <= 40 x 40 (or T x H x W <= 5 x 12 x 12), any layout and dtype."""
    channels = draw(st.integers(1, 400))
    if draw(st.integers(0, 2)) == 0:
        spatial = (draw(st.integers(1, 5)), draw(st.integers(1, 12)), draw(st.integers(1, 12)))
    else:
        spatial = (draw(st.integers(1, 40)), draw(st.integers(1, 40)))
    batch = draw(st.integers(1, 2))
    while batch * channels * math.prod(spatial) > 30_000:  # keep the interpreter quick
        spatial = tuple(max(1, s // 2) for s in spatial)
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    return {
        "shape": (batch, channels, *spatial),
        "dtype": dtype,
        "param_dtype": draw(st.sampled_from([dtype, torch.float32])),
        "layout": draw(st.sampled_from(LAYOUTS)),
        "act": draw(st.sampled_from(rna.ACTIVATIONS)),
        "eps_mode": draw(st.sampled_from(rna.EPS_MODES)),
        "has_weight": draw(st.booleans()),
        "has_bias": draw(st.booleans()),
        "offset": draw(st.floats(-4.0, 4.0)),
        "seed": draw(st.integers(0, 2**16)),
    }


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=20, deadline=None)
@given(problem=problems())
def test_random_problems_match_float64_rms_norm(device, problem):
    p = problem
    x = make_input(p["shape"], p["dtype"], device, p["layout"], p["seed"], offset=p["offset"])
    weight, bias = make_params(p["shape"][1], p["has_weight"], p["has_bias"], p["param_dtype"], device, p["seed"])
    out = rna.rms_norm_act_triton(x, weight, bias, 1e-6, p["act"], p["eps_mode"])
    assert_matches(out, x, expected(x, weight, bias, 1e-6, p["act"], p["eps_mode"]))


DECODER_SHAPES = [
    # Wan decoder widths (96, 192, 384 and the tiny test widths), DC-AE widths, odd sizes, 1x1, 5-D video
    (1, 96, 3, 7, 9),
    (1, 384, 1, 5, 3),
    (2, 192, 2, 3, 5),
    (1, 12, 5, 11, 13),
    (1, 512, 7, 5),
    (1, 1024, 1, 1),
    (3, 64, 1, 1),
    (1, 32, 31, 37),
]


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", DECODER_SHAPES)
@pytest.mark.usefixtures("poisoned_empty_like")
def test_decoder_shapes(device, shape, layout, launches):
    x = make_input(shape, torch.float32, device, layout)
    weight, bias = make_params(shape[1], True, True, torch.float32, device)
    out = ops.rms_norm_act(x, weight, bias, 1e-6, "silu", "clamp")
    assert launches["act"].launches == 1
    assert_matches(out, x, expected(x, weight, bias, 1e-6, "silu", "clamp"))


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.usefixtures("poisoned_empty_like")
def test_dtypes(device, dtype, layout):
    x = make_input((1, 96, 2, 9, 13), dtype, device, layout)
    weight, bias = make_params(96, True, True, dtype, device)
    for eps_mode in rna.EPS_MODES:
        out = rna.rms_norm_act_triton(x, weight, bias, 1e-5, "relu", eps_mode)
        assert_matches(out, x, expected(x, weight, bias, 1e-5, "relu", eps_mode))


def wan_norm(channels, device, images, seed=3):
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    norm = WanRMS_norm(channels, images=images, bias=True).to(device)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norm.gamma.copy_(torch.randn(norm.gamma.shape, generator=gen) + 1.0)
        norm.bias.copy_(torch.randn(norm.bias.shape, generator=gen))
    return norm


@pytest.mark.parametrize("device", ["cpu", *(d for d in DEVICES if d != "cpu")])
@pytest.mark.parametrize("shape", [(1, 12, 3, 5, 7), (2, 96, 9, 4)])
@pytest.mark.parametrize("fused", [False, True])
def test_matches_diffusers_wan_rms_norm(device, shape, fused):
    """WanRMS_norm = F.normalize(x, dim=1) * sqrt(C) * gamma + bias: eps_mode "clamp", eps = 1e-12 / sqrt(C)."""
    if fused and device not in DEVICES:
        pytest.skip("the Triton kernel does not run here")
    channels = shape[1]
    norm = wan_norm(channels, device, images=len(shape) == 4)
    x = make_input(shape, torch.float32, device)
    with torch.no_grad():
        want = F.silu(norm(x))
        args = (x, norm.gamma.reshape(channels), norm.bias.reshape(channels), 1e-12 * channels**-0.5, "silu", "clamp")
        if fused:
            out = ops.rms_norm_act(*args)
        else:
            with ops.reference_ops():
                out = ops.rms_norm_act(*args)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
def test_matches_diffusers_rms_norm_over_channels(fused):
    """DC-AE's channel RMSNorm: diffusers RMSNorm(C, eps, bias=True) applied to x.movedim(1, -1)."""
    if fused and "cpu" not in DEVICES:
        pytest.skip("the Triton kernel does not run on CPU here")
    from diffusers.models.normalization import RMSNorm

    norm = RMSNorm(64, eps=1e-5, elementwise_affine=True, bias=True)
    weight, bias = make_params(64, True, True, torch.float32, "cpu", seed=5)
    with torch.no_grad():
        norm.weight.copy_(weight)
        norm.bias.copy_(bias)
        x = make_input((2, 64, 5, 7), torch.float32, "cpu")
        want = norm(x.movedim(1, -1)).movedim(-1, 1)
        if fused:
            out = ops.rms_norm_act(x, norm.weight, norm.bias, norm.eps, "none", "add")
        else:
            with ops.reference_ops():
                out = ops.rms_norm_act(x, norm.weight, norm.bias, norm.eps, "none", "add")
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eps_mode", rna.EPS_MODES)
def test_zero_positions_give_the_bias(device, eps_mode):
    """An all-zero position is 0 / max(0, eps) or 0 * rsqrt(eps): the output there is act(bias), never NaN."""
    x = make_input((1, 8, 3, 4), torch.float32, device)
    x[:, :, 1, 2] = 0.0
    weight, bias = make_params(8, True, True, torch.float32, device)
    out = rna.rms_norm_act_triton(x, weight, bias, 1e-12, "none", eps_mode)
    torch.testing.assert_close(out[0, :, 1, 2], bias, rtol=0, atol=0)
    assert_matches(out, x, expected(x, weight, bias, 1e-12, "none", eps_mode))


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", rna.ACTIVATIONS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nan_spreads_over_its_position_only(device, act, layout):
    x = make_input((1, 8, 5, 5), torch.float32, device, layout)
    x[0, 5, 2, 3] = math.nan
    out = rna.rms_norm_act_triton(x, None, None, 1e-6, act, "add")
    assert out[0, :, 2, 3].isnan().all()
    finite = torch.ones(5, 5, dtype=torch.bool)
    finite[2, 3] = False
    assert out[0, :, finite].isfinite().all()
    want = expected(x, None, None, 1e-6, act, "add")
    torch.testing.assert_close(out.double(), want, equal_nan=True, **GROUP_NORM_ACT[torch.float32])


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
def test_op_runs_the_triton_kernel(device, launches):
    x = make_input((1, 32, 2, 4, 4), torch.float32, device, "channels_last")
    out = torch.ops.fastdec.rms_norm_act(x, None, None, 1e-6, "silu", "add")
    assert launches["act"].launches == 1
    assert_matches(out, x, expected(x, None, None, 1e-6, "silu", "add"))


def test_reference_ops_context_runs_the_reference(monkeypatch):
    def kernel_must_not_run(*args, **kwargs):
        raise AssertionError("reference_ops() must not launch the Triton kernel")

    monkeypatch.setattr(rna, "rms_norm_act_triton", kernel_must_not_run)
    x = make_input((1, 32, 4, 4), torch.float32, "cpu", "channels_last")
    with ops.reference_ops():
        out = ops.rms_norm_act(x, None, None, 1e-6, "relu", "clamp")
    assert_matches(out, x, expected(x, None, None, 1e-6, "relu", "clamp"))


OPCHECK_CASES = [
    # (shape, dtype, layout, has_weight, has_bias, act, eps_mode)
    ((2, 8, 3, 5), torch.float32, "contiguous", True, True, "silu", "add"),
    ((1, 12, 4, 3), torch.float32, "channels_last", True, False, "relu", "clamp"),
    ((1, 8, 2, 3, 2), torch.float32, "channels_last", False, True, "none", "add"),
    ((2, 6, 3, 3), torch.bfloat16, "contiguous", False, False, "silu", "clamp"),
]


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("shape", "dtype", "layout", "has_weight", "has_bias", "act", "eps_mode"), OPCHECK_CASES)
def test_opcheck(device, shape, dtype, layout, has_weight, has_bias, act, eps_mode):
    requires_grad = dtype == torch.float32
    x = make_input(shape, dtype, device, layout).requires_grad_(requires_grad)
    weight, bias = make_params(shape[1], has_weight, has_bias, dtype, device)
    weight, bias = (None if t is None else t.requires_grad_(requires_grad) for t in (weight, bias))
    torch.library.opcheck(torch.ops.fastdec.rms_norm_act.default, (x, weight, bias, 1e-6, act, eps_mode))


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_without_graph_breaks(device):
    class WanResidualHead(torch.nn.Module):
        """RMSNorm + SiLU + causal-free 3-D conv, as in a Wan residual block."""

        def __init__(self):
            super().__init__()
            self.gamma = torch.nn.Parameter(torch.randn(8, 1, 1, 1))
            self.conv = torch.nn.Conv3d(8, 8, 3, padding=1)

        def forward(self, x):
            h = ops.rms_norm_act(x, self.gamma.reshape(8), None, 1e-12 * 8**-0.5, "silu", "clamp")
            return x + self.conv(h)

    module = WanResidualHead().to(device)
    x = make_input((1, 8, 3, 6, 6), torch.float32, device, "channels_last")
    torch.testing.assert_close(*compile_fullgraph(module, x), rtol=0, atol=0)


GRAD_CASES = [
    # (shape, layout, has_weight, has_bias, act, eps_mode)
    ((2, 4, 3, 3), "contiguous", True, True, "silu", "add"),
    ((1, 6, 2, 3), "channels_last", True, False, "relu", "clamp"),
    ((2, 4, 2, 2, 2), "contiguous", False, True, "none", "clamp"),
    ((1, 4, 3, 2), "channels_last", False, False, "silu", "add"),
]


@pytest.mark.parametrize(("shape", "layout", "has_weight", "has_bias", "act", "eps_mode"), GRAD_CASES)
def test_gradcheck_reference_path(shape, layout, has_weight, has_bias, act, eps_mode):
    x = make_input(shape, torch.float64, "cpu", layout).requires_grad_(True)
    weight, bias = make_params(shape[1], has_weight, has_bias, torch.float64, "cpu")
    weight, bias = (None if t is None else t.requires_grad_(True) for t in (weight, bias))

    def fn(x, weight, bias):
        return ops.rms_norm_act(x, weight, bias, 1e-5, act, eps_mode)

    with ops.reference_ops():
        assert torch.autograd.gradcheck(fn, (x, weight, bias))


def test_clamped_positions_have_the_constant_scale_gradient():
    """Where rms < eps ("clamp"), y = x / eps * weight: the gradient is grad_out * weight / eps."""
    x = torch.full((1, 4, 1, 2), 1e-4, dtype=torch.float64, requires_grad=True)
    grad = torch.autograd.grad(ops.rms_norm_act(x, None, None, 1e-2, "none", "clamp"), x, torch.ones_like(x))[0]
    torch.testing.assert_close(grad, torch.full_like(x, 100.0))


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("shape", "layout", "has_weight", "has_bias", "act", "eps_mode"), GRAD_CASES)
def test_fused_gradients_match_autograd(device, shape, layout, has_weight, has_bias, act, eps_mode):
    """The op (Triton forward, fp32 backward) against float64 autograd through the expected formula."""
    x = make_input(shape, torch.float32, device, layout, offset=1.0)
    weight, bias = make_params(shape[1], has_weight, has_bias, torch.float32, device)
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(device)
    inputs = [t.requires_grad_(True) for t in (x, weight, bias) if t is not None]
    got = torch.autograd.grad(ops.rms_norm_act(x, weight, bias, 1e-5, act, eps_mode), inputs, grad_out)

    wide = [None if t is None else t.detach().double().requires_grad_(True) for t in (x, weight, bias)]
    reference = expected(*wide, 1e-5, act, eps_mode)
    want = torch.autograd.grad(reference, [t for t in wide if t is not None], grad_out.double())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, **GROUP_NORM_ACT_GRAD)


BAD_INPUTS = [
    # (x shape, weight shape, weight dtype, eps, act, eps_mode, message)
    ((2, 8, 5), None, None, 1e-6, "silu", "add", "4-D"),
    ((1, 8, 2, 2, 2, 2), None, None, 1e-6, "silu", "add", "4-D"),
    ((1, 8, 3, 3), (4,), torch.float32, 1e-6, "silu", "add", r"weight must have shape \(8,\)"),
    ((1, 8, 3, 3), (8, 1, 1), torch.float32, 1e-6, "silu", "add", r"reshape per-channel parameters"),
    ((1, 8, 3, 3), (8,), torch.float16, 1e-6, "silu", "add", "weight must be torch.float32"),
    ((1, 8, 3, 3), (8,), torch.int32, 1e-6, "silu", "add", "weight must be"),
    ((1, 8, 3, 3), None, None, 0.0, "silu", "add", "eps"),
    ((1, 8, 3, 3), None, None, -1e-5, "silu", "clamp", "eps"),
    ((1, 8, 3, 3), None, None, math.inf, "silu", "add", "eps"),
    ((1, 8, 3, 3), None, None, 1e-6, "gelu", "add", "act must be one of"),
    ((1, 8, 3, 3), None, None, 1e-6, "silu", "max", "eps_mode must be one of"),
]


@pytest.mark.parametrize(("shape", "weight_shape", "weight_dtype", "eps", "act", "eps_mode", "message"), BAD_INPUTS)
def test_bad_input_raises_value_error(shape, weight_shape, weight_dtype, eps, act, eps_mode, message):
    x = torch.randn(shape)
    weight = None if weight_shape is None else torch.ones(weight_shape, dtype=weight_dtype)
    with pytest.raises(ValueError, match=message):
        torch.ops.fastdec.rms_norm_act(x, weight, None, eps, act, eps_mode)
    with pytest.raises(ValueError, match=message):
        rna.rms_norm_act_triton(x, weight, None, eps, act, eps_mode)
    with pytest.raises(ValueError, match=message):
        rna.rms_norm_act_reference(x, weight, None, eps, act, eps_mode)


def test_bad_dtype_and_device_raise_value_error():
    with pytest.raises(ValueError, match="float16, bfloat16, float32 or float64"):
        rna.check_rms_norm_act(torch.ones(1, 4, 2, 2, dtype=torch.int64), None, None, 1e-6, "none", "add")
    with pytest.raises(ValueError, match="bias is on meta but x is on cpu"):
        rna.check_rms_norm_act(torch.ones(1, 4, 2, 2), None, torch.ones(4, device="meta"), 1e-6, "none", "add")


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    x = torch.empty(0, 8, 2, 3, 3, device=device)
    assert ops.rms_norm_act(x, None, None, 1e-6, "silu", "add").shape == (0, 8, 2, 3, 3)


def test_launch_tiles_follow_the_contiguous_axis():
    for channels, positions in ((96, 10_000), (384, 7), (1024, 1), (3, 5)):
        for channels_contiguous in (False, True):
            block_c, block_s = rna.tile_shape(channels, positions, channels_contiguous)
            assert block_c * block_s <= rna.TILE_ELEMENTS
            if channels_contiguous:
                assert block_c == min(triton_next_pow2(channels), rna.TILE_ELEMENTS)


def triton_next_pow2(n):
    return 1 << (n - 1).bit_length()


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wan_per_frame_views_run_in_place(device, dtype, monkeypatch):
    """What models/wan.py per_frame returns, (B*T, C, H, W) seen as (B, C, T, H, W): the spatial dims do not flatten
    to one stride, so the kernel reads it as (frames, positions) axes, in place, and writes an output of the same
    layout (issue 21: no copy of the input and the output after every upsampler)."""
    kernel, seen = rna._rms_norm_act_kernel, []

    class Recording:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(args[:2])
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(rna, "_rms_norm_act_kernel", Recording())
    batch, frames, channels, height, width = 2, 3, 24, 5, 7
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch * frames, channels, height, width, generator=gen).to(dtype=dtype, device=device)
    x = x.unflatten(0, (batch, frames)).transpose(1, 2)
    assert x.stride()[1:3] == (height * width, channels * height * width)
    weight = torch.rand(channels, generator=gen).to(device) + 0.5
    out = ops.rms_norm_act(x, weight, None, 1e-12 * channels**-0.5, "silu", "clamp")
    ((source, target),) = seen
    assert source is x, "the input was copied"
    assert target.data_ptr() == out.data_ptr() and out.stride() == x.stride(), "the output went through a copy"
    assert_matches(out, x, expected(x, weight, None, 1e-12 * channels**-0.5, "silu", "clamp"))
