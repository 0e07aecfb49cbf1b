"""fastdec.patch_unembed: the Triton kernel (on CPU through triton's interpreter, on CUDA natively) against
the eager reference, plus the op's registration (opcheck, torch.compile), gradients and input validation."""

from __future__ import annotations

import pytest
import torch
from helpers import compile_fullgraph, needs_triton, triton_devices
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import PATCH_UNEMBED, PATCH_UNEMBED_GRAD

from fastdec import ops
from fastdec.kernels import patch_unembed as pu

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
DEVICES = triton_devices("patch_unembed")
needs_kernel = needs_triton("patch_unembed")


def make_tokens(batch, grid_h, grid_w, patch, channels, dtype, device, layout="contiguous", seed=0):
    """Tokens in N(0, 1.5^2) (so to_unit clamps on both sides), in the requested memory layout."""
    gen = torch.Generator().manual_seed(seed)
    count, features = grid_h * grid_w, patch * patch * channels

    def randn(*shape):
        return (torch.randn(*shape, generator=gen) * 1.5).to(dtype=dtype, device=device)

    if layout == "contiguous":
        return randn(batch, count, features)
    if layout == "token_major":  # (N, B, F) storage: batch stride F, token stride B*F
        return randn(count, batch, features).transpose(0, 1)
    if layout == "feature_stride_2":  # every other feature of a wider tensor
        return randn(batch, count, 2 * features)[..., ::2]
    if layout == "broadcast_batch":  # batch stride 0
        return randn(1, count, features).expand(batch, count, features)
    raise AssertionError(layout)


def expected_fp32(tokens, patch, grid_h, grid_w, bias, out, out_dtype):
    """The reference in fp32; for uint8 output, the 0..255 levels it stands for."""
    unit = pu.patch_unembed_reference(tokens, patch, grid_h, grid_w, bias, out, torch.float32)
    return unit * 255.0 if out_dtype == torch.uint8 else unit


def is_permutation(tokens, bias, out, out_dtype):
    """True when the op only moves values (perhaps widening to fp32): then the result is bitwise equal."""
    exact_dtypes = (None, tokens.dtype, torch.float32)
    return bias is None and out == "identity" and out_dtype in exact_dtypes


@st.composite
def cases(draw):
    patch = draw(st.sampled_from([1, 2, 4, 8, 16]))
    grid_limit = max(1, 48 // patch)  # images up to 48x48 keep the interpreter fast
    grid_sizes = [g for g in (1, 2, 3, 5, 7, 13) if g <= grid_limit] or [1]
    out_dtype = draw(st.sampled_from([None, *FLOATS, torch.uint8]))
    return {
        "batch": draw(st.integers(1, 3)),
        "grid_h": draw(st.sampled_from(grid_sizes)),
        "grid_w": draw(st.sampled_from(grid_sizes)),
        "patch": patch,
        "channels": draw(st.sampled_from([1, 3, 4, 16])),
        "dtype": draw(st.sampled_from(FLOATS)),
        "out_dtype": out_dtype,
        "out": "to_unit" if out_dtype == torch.uint8 else draw(st.sampled_from(pu.OUT_MODES)),
        "bias": draw(st.sampled_from([None, "contiguous", "strided"])),
        "layout": draw(st.sampled_from(["contiguous", "token_major", "feature_stride_2", "broadcast_batch"])),
        "seed": draw(st.integers(0, 2**16)),
    }


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=60, deadline=None)
@given(case=cases())
def test_matches_reference(device, case):
    b, gh, gw, p, c = (case[k] for k in ("batch", "grid_h", "grid_w", "patch", "channels"))
    tokens = make_tokens(b, gh, gw, p, c, case["dtype"], device, case["layout"], case["seed"])
    bias = None
    if case["bias"] is not None:
        step = 1 if case["bias"] == "contiguous" else 3
        bias = torch.randn(step * p * p * c, dtype=case["dtype"], device=device)[::step]
    out, out_dtype = case["out"], case["out_dtype"]

    result = ops.patch_unembed(tokens, p, gh, gw, bias, out, out_dtype)

    assert result.shape == (b, c, gh * p, gw * p)
    assert result.dtype == (out_dtype or tokens.dtype)
    assert result.is_contiguous()
    if is_permutation(tokens, bias, out, out_dtype):
        assert torch.equal(result, pu.patch_unembed_reference(tokens, p, gh, gw, bias, out, out_dtype))
    else:
        torch.testing.assert_close(
            result.float(),
            expected_fp32(tokens, p, gh, gw, bias, out, out_dtype),
            **PATCH_UNEMBED[result.dtype],
        )
    assert torch.isfinite(result.float()).all()


@needs_kernel
def test_docstring_example():
    a, b = [0.0, 1.0, 2.0, 3.0], [10.0, 11.0, 12.0, 13.0]
    tokens = torch.tensor([[a, b]], device=DEVICES[0])
    image = ops.patch_unembed(tokens, 2, 1, 2)
    assert image.tolist() == [[[[0.0, 1.0, 10.0, 11.0], [2.0, 3.0, 12.0, 13.0]]]]


@needs_kernel
def test_to_unit_and_uint8_levels():
    # -1 -> 0 and 1 -> 1, beyond clamps; uint8 is floor(255 * unit + 0.5): 0.5 -> 127.5 rounds up to 128.
    values = [-3.0, -1.0, -0.5, 0.0, 2**-7 - 1.0, 0.5, 1.0, 2.5]
    tokens = torch.tensor(values, device=DEVICES[0]).reshape(1, len(values), 1)
    unit = ops.patch_unembed(tokens, 1, 1, len(values), out="to_unit")
    assert unit.flatten().tolist() == [0.0, 0.0, 0.25, 0.5, 2**-8, 0.75, 1.0, 1.0]
    levels = ops.patch_unembed(tokens, 1, 1, len(values), out="to_unit", out_dtype=torch.uint8)
    assert levels.flatten().tolist() == [0, 0, 64, 128, 1, 191, 255, 255]


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", FLOATS)
def test_writes_every_element_of_a_nan_prefilled_buffer(device, out_dtype):
    tokens = make_tokens(2, 3, 5, 4, 3, torch.bfloat16, device, "token_major")
    bias = torch.randn(4 * 4 * 3, device=device)
    buffer = torch.full((2, 3, 12, 20), float("nan"), dtype=out_dtype, device=device)
    result = pu.patch_unembed_triton(tokens, 4, 3, 5, bias, "to_unit", out_dtype, output=buffer)
    assert result is buffer
    assert not buffer.isnan().any()
    torch.testing.assert_close(
        buffer.float(), expected_fp32(tokens, 4, 3, 5, bias, "to_unit", out_dtype), **PATCH_UNEMBED[out_dtype]
    )


@needs_kernel
def test_output_buffer_is_validated():
    tokens = make_tokens(1, 2, 2, 2, 3, torch.float32, DEVICES[0])
    with pytest.raises(ValueError, match="output must be a contiguous"):
        pu.patch_unembed_triton(tokens, 2, 2, 2, output=torch.empty(1, 3, 4, 5, device=DEVICES[0]))


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
def test_op_runs_the_triton_kernel(device, monkeypatch):
    def reference_must_not_run(*args, **kwargs):
        raise AssertionError("patch_unembed ran its eager reference instead of the Triton kernel")

    launches = []
    launcher = pu.patch_unembed_triton
    monkeypatch.setattr(pu, "patch_unembed_reference", reference_must_not_run)
    monkeypatch.setattr(pu, "patch_unembed_triton", lambda *args: launches.append(1) or launcher(*args))

    tokens = make_tokens(2, 2, 3, 2, 3, torch.float32, device)
    result = torch.ops.fastdec.patch_unembed(tokens, 2, 2, 3, None, "identity", None)
    assert launches == [1]
    monkeypatch.undo()
    assert torch.equal(result, pu.patch_unembed_reference(tokens, 2, 2, 3))


@needs_kernel
def test_reference_ops_context_runs_the_reference(monkeypatch):
    def kernel_must_not_run(*args, **kwargs):
        raise AssertionError("reference_ops() must not launch the Triton kernel")

    monkeypatch.setattr(pu, "patch_unembed_triton", kernel_must_not_run)
    tokens = make_tokens(1, 2, 2, 2, 3, torch.float32, DEVICES[0])
    with ops.reference_ops():
        result = ops.patch_unembed(tokens, 2, 2, 2)
    assert result.shape == (1, 3, 4, 4)


OPCHECK_CASES = [
    # (dtype, bias, out, out_dtype, requires_grad)
    (torch.float32, False, "identity", None, True),
    (torch.float32, True, "to_unit", None, True),
    (torch.bfloat16, True, "to_unit", torch.float32, True),
    (torch.float16, False, "identity", torch.bfloat16, True),
    (torch.float32, True, "to_unit", torch.uint8, False),
]


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "has_bias", "out", "out_dtype", "requires_grad"), OPCHECK_CASES)
def test_opcheck(device, dtype, has_bias, out, out_dtype, requires_grad):
    tokens = make_tokens(2, 3, 2, 2, 3, dtype, device, "token_major").requires_grad_(requires_grad)
    bias = torch.randn(12, dtype=dtype, device=device, requires_grad=requires_grad) if has_bias else None
    torch.library.opcheck(torch.ops.fastdec.patch_unembed.default, (tokens, 2, 3, 2, bias, out, out_dtype))


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_without_graph_breaks(device):
    def decode_tail(tokens, bias):
        image = ops.patch_unembed(tokens * 2.0, 4, 3, 2, bias, "to_unit", torch.float32)
        return image.mean(dim=1)

    tokens = make_tokens(2, 3, 2, 4, 3, torch.bfloat16, device)
    bias = torch.randn(48, dtype=torch.bfloat16, device=device)
    torch.testing.assert_close(*compile_fullgraph(decode_tail, tokens, bias), rtol=0, atol=0)


GRAD_CASES = [
    # (dtype, has_bias, out, out_dtype)
    (torch.float32, False, "identity", None),
    (torch.float32, True, "identity", None),
    (torch.float32, True, "to_unit", None),
    (torch.bfloat16, True, "to_unit", torch.float32),
    (torch.float16, False, "to_unit", None),
    (torch.bfloat16, True, "identity", torch.float16),
]


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "has_bias", "out", "out_dtype"), GRAD_CASES)
def test_gradients_match_autograd_of_the_reference(device, dtype, has_bias, out, out_dtype):
    batch, grid_h, grid_w, patch, channels = 2, 3, 2, 2, 3
    tokens = make_tokens(batch, grid_h, grid_w, patch, channels, dtype, device, "token_major")
    tokens = tokens.detach()
    # Values exactly on the to_unit clamp bounds, where the derivative is still 0.5 (as torch.clamp's).
    tokens[0, 0, :2] = torch.tensor([-1.0, 1.0], dtype=dtype)
    tokens.requires_grad_(True)
    bias = torch.randn(patch * patch * channels, dtype=dtype, device=device) if has_bias else None
    if bias is not None:
        bias[:2] = 0.0  # keep the bound values above exact
        bias.requires_grad_(True)
    inputs = [tokens] if bias is None else [tokens, bias]
    args = (patch, grid_h, grid_w, bias, out, out_dtype)
    out_dt = out_dtype or dtype
    grad_out = torch.randn(batch, channels, grid_h * patch, grid_w * patch, device=device).to(out_dt)

    grads = torch.autograd.grad(ops.patch_unembed(tokens, *args), inputs, grad_out)
    expected = torch.autograd.grad(pu.patch_unembed_reference(tokens, *args), inputs, grad_out)

    for grad, want, tensor in zip(grads, expected, inputs, strict=True):
        assert grad.dtype == tensor.dtype and grad.shape == tensor.shape
        torch.testing.assert_close(grad.float(), want.float(), **PATCH_UNEMBED_GRAD[tensor.dtype])
    if out == "to_unit":  # token 0's features 0 and 1 are pixel (0, 0) of channels 0 and 1
        on_bounds = (0.5 * grad_out[0, :2, 0, 0].float()).to(dtype)
        assert torch.equal(grads[0][0, 0, :2], on_bounds)


def test_uint8_output_is_not_differentiable():
    tokens = make_tokens(1, 2, 2, 2, 3, torch.float32, "cpu").requires_grad_(True)
    levels = ops.patch_unembed(tokens, 2, 2, 2, out="to_unit", out_dtype=torch.uint8)
    assert levels.dtype == torch.uint8 and not levels.requires_grad
    with pytest.raises(ValueError, match="not differentiable"):
        pu.patch_unembed_backward(torch.ones(1, 3, 4, 4), tokens, 2, 2, 2, None, "to_unit", torch.uint8)


BAD_INPUTS = [
    ({"tokens": torch.zeros(4, 12)}, "tokens must be 3-D"),
    ({"tokens": torch.zeros(1, 4, 12, dtype=torch.float64)}, "tokens dtype"),
    ({"grid_h": 3}, r"token count \(4\) must equal grid_h\*grid_w"),
    ({"tokens": torch.zeros(1, 4, 10)}, r"positive multiple of patch\*patch = 4"),
    ({"tokens": torch.zeros(1, 4, 0)}, r"positive multiple of patch\*patch"),
    ({"patch": 0}, "patch must be >= 1"),
    ({"grid_w": 0, "tokens": torch.zeros(1, 0, 12)}, "grid_h and grid_w must be >= 1"),
    ({"bias": torch.zeros(11)}, "bias must be 1-D of length p\\*p\\*C = 12"),
    ({"bias": torch.zeros(2, 6)}, "bias must be 1-D"),
    ({"bias": torch.zeros(12, device="meta")}, "bias is on meta"),
    ({"bias": torch.zeros(12, dtype=torch.int32)}, "bias dtype"),
    ({"out": "tanh"}, "out must be one of"),
    ({"out_dtype": torch.int32}, "out_dtype must be None or one of"),
    ({"out_dtype": torch.uint8}, "uint8 needs out='to_unit'"),
]


@pytest.mark.parametrize(("change", "message"), BAD_INPUTS)
def test_bad_input_raises_value_error(change, message):
    args = {"tokens": torch.zeros(1, 4, 12), "patch": 2, "grid_h": 2, "grid_w": 2, "bias": None}
    args |= {"out": "identity", "out_dtype": None} | change
    with pytest.raises(ValueError, match=message):
        ops.patch_unembed(**args)
    with pytest.raises(ValueError, match=message):
        pu.check_patch_unembed(**args)
