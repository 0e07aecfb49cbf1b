"""fastdec.models.layers: the folded "nearest x2 upsample + 3x3 conv" equals the two ops it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import UPSAMPLE_FOLD
from torch._subclasses.fake_tensor import FakeTensorMode

from fastdec.models import layers
from fastdec.models.layers import UpsampleConv, fold_upsample_conv3x3


def upsample_then_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 2), c_in=st.integers(1, 6), c_out=st.integers(1, 6), h=st.integers(1, 9), w=st.integers(1, 9),
    bias=st.booleans(), channels_last=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_upsample_conv_equals_nearest_upsample_then_conv(n, c_in, c_out, h, w, bias, channels_last, dtype, seed):
    torch.manual_seed(seed)
    layer = UpsampleConv(c_in, c_out, bias=bias).to(dtype)
    x = torch.randn(n, c_in, h, w, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = layer(x)
    expected = upsample_then_conv(x, layer.weight, layer.bias)
    assert out.shape == (n, c_out, 2 * h, 2 * w) and out.dtype == dtype
    torch.testing.assert_close(out, expected, **UPSAMPLE_FOLD[dtype])


def test_folded_kernel_layout():
    """Phase (a, b) of output channel o sits at folded channel o*4 + a*2 + b and sums the taps it reads."""
    weight = torch.arange(2 * 1 * 9, dtype=torch.float64).reshape(2, 1, 3, 3)
    folded, bias = fold_upsample_conv3x3(weight, torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert folded.shape == (8, 1, 2, 2)
    assert bias.tolist() == [1.0] * 4 + [2.0] * 4
    rows = {0: [[0], [1, 2]], 1: [[0, 1], [2]]}  # phase -> taps folded into dy = 0, 1 (same for columns)
    for o in range(2):
        for a in range(2):
            for b in range(2):
                for dy in range(2):
                    for dx in range(2):
                        expected = sum(weight[o, 0, ky, kx] for ky in rows[a][dy] for kx in rows[b][dx])
                        assert folded[o * 4 + a * 2 + b, 0, dy, dx] == expected


def test_fp16_weights_fold_in_fp32():
    """Taps are summed in fp32 and rounded once, so the folded fp16 kernel is the fp32 fold rounded."""
    weight = torch.randn(4, 3, 3, 3).half()
    folded, _ = fold_upsample_conv3x3(weight)
    expected, _ = fold_upsample_conv3x3(weight.float())
    assert folded.dtype == torch.float16
    assert torch.equal(folded, expected.half())


def test_state_dict_is_nn_conv2d_and_gradients_match():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    layer = UpsampleConv(3, 5)
    layer.load_state_dict(conv.state_dict(), strict=True)
    assert list(layer.state_dict()) == ["weight", "bias"]
    x = torch.randn(2, 3, 5, 7, requires_grad=True)
    layer(x).square().sum().backward()
    grads = [x.grad, layer.weight.grad, layer.bias.grad]
    x.grad = None
    conv(F.interpolate(x, scale_factor=2, mode="nearest")).square().sum().backward()
    for got, expected in zip(grads, [x.grad, conv.weight.grad, conv.bias.grad], strict=True):
        torch.testing.assert_close(got, expected, **UPSAMPLE_FOLD[torch.float32])


def test_fold_rejects_non_3x3_weights():
    with pytest.raises(ValueError, match=r"\(O, C, 3, 3\)"):
        fold_upsample_conv3x3(torch.zeros(4, 4, 1, 1))


@torch.no_grad()
def test_inference_cache_follows_every_weight_change():
    """In inference the folded kernels are cached; in-place updates, load_state_dict and .to() must all show."""
    torch.manual_seed(3)
    layer = UpsampleConv(3, 5)
    x = torch.randn(1, 3, 4, 4)

    def unfolded(module):
        upsampled = F.interpolate(x.to(module.weight.dtype), scale_factor=2.0)
        return F.conv2d(upsampled, module.weight, module.bias, padding=1)

    torch.testing.assert_close(layer(x), unfolded(layer))
    layer.weight.mul_(-2.0)  # an optimizer step or any in-place edit
    torch.testing.assert_close(layer(x), unfolded(layer))
    layer.load_state_dict({"weight": torch.randn(5, 3, 3, 3), "bias": torch.randn(5)})
    torch.testing.assert_close(layer(x), unfolded(layer))
    layer.to(torch.float64)
    assert layer(x.double()).dtype == torch.float64
    torch.testing.assert_close(layer(x.double()), unfolded(layer))


# --- row chunks: a large norm + conv or upsampler never holds its whole intermediate -------------------------------


def _chunk_calls(monkeypatch, name: str) -> list:
    """Records the calls of layers.<name> (one per row chunk) while still running it."""
    calls, real = [], getattr(layers, name)
    monkeypatch.setattr(layers, name, lambda *args, **kwargs: calls.append(args) or real(*args, **kwargs))
    return calls


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # bench/gpu_run.sh runs these on a GPU


@torch.no_grad()
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 12])
def test_norm_act_conv_in_row_chunks_equals_the_whole(monkeypatch, rows, channels_last, device):
    """From CHUNKED_BYTES of input, GroupNorm + SiLU + 3x3 conv runs a few rows at a time with statistics over all
    rows: the result of the whole (up to float summation order), in its layout."""
    torch.manual_seed(0)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 convs on a GPU, as on the CPU
    norm, conv = torch.nn.GroupNorm(4, 8, eps=1e-6).to(device), torch.nn.Conv2d(8, 6, 3, padding=1).to(device)
    torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 8, rows, 7, device=device) * 3 + 5  # offset data: statistics merged over chunks must not cancel
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=layout)
    expected = conv(F.silu(F.group_norm(x, 4, norm.weight, norm.bias, 1e-6)))
    assert not layers.chunked(x, x.nbytes)
    monkeypatch.setattr(layers, "CHUNKED_BYTES", x.nbytes // 2)  # chunks of at most an eighth of x
    chunks = _chunk_calls(monkeypatch, "group_norm_act_given_stats")
    out = layers.norm_act_conv(norm, conv, x, "silu")
    assert len(chunks) == len(layers.row_chunks(rows, x.nbytes)) and (len(chunks) > 1) == (rows > 1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=layout)


@torch.no_grad()
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 9])
def test_upsample_conv_in_row_chunks_equals_the_whole(monkeypatch, rows, channels_last, device):
    torch.manual_seed(1)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 convs on a GPU, as on the CPU
    layer = UpsampleConv(3, 5).to(device)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(1, 3, rows, 6, device=device).contiguous(memory_format=layout)
    expected = upsample_then_conv(x, layer.weight, layer.bias)
    made = x.nbytes * 20 // 3  # the folded conv's output: 4 phases of 5 channels from 3
    monkeypatch.setattr(layers, "CHUNKED_BYTES", made)
    chunks = _chunk_calls(monkeypatch, "into_rows")
    out = layer(x)
    assert len(chunks) == len(layers.row_chunks(rows, made)) and (len(chunks) > 1) == (rows > 1)
    torch.testing.assert_close(out, expected, **UPSAMPLE_FOLD[torch.float32])
    assert out.is_contiguous(memory_format=layout)


def test_row_chunks_cover_every_row_once_with_one_neighbour_each_side():
    for rows in (1, 2, 3, 7, 64):
        for nbytes in (1, layers.CHUNKED_BYTES, 10 * layers.CHUNKED_BYTES):
            chunks = layers.row_chunks(rows, nbytes)
            assert [top for top, *_ in chunks] == sorted({top for top, *_ in chunks})
            assert [row for top, bottom, _, _ in chunks for row in range(top, bottom)] == list(range(rows))
            assert all(low == max(top - 1, 0) and high == min(bottom + 1, rows) for top, bottom, low, high in chunks)
            pieces = -(-nbytes // (layers.CHUNKED_BYTES // 4))  # each at most a quarter of the threshold
            assert all(bottom - top <= -(-rows // pieces) for top, bottom, _, _ in chunks)


def test_only_whole_tensors_in_inference_are_chunked():
    """Autograd and torch.compile would have to see through the chunks, and tiling's slabs and FakeTensorMode's
    tensors are not whole tensors: those run unchunked; so do meta tensors (tiling's planner decodes whole images on
    the meta device, where chunks save nothing: at 4096^2 they cost it 0.6 s)."""
    x, big = torch.zeros(1, 1, 2, 2), layers.CHUNKED_BYTES
    assert layers.chunked(x, big) is False  # grad mode
    with torch.no_grad():
        assert layers.chunked(x, big) and not layers.chunked(x, big - 1)
        assert not layers.chunked(torch.zeros(1, 1, 1, 2, 2), big)
        assert not layers.chunked(torch.zeros(1, 1, 2, 2, device="meta"), big)
        with FakeTensorMode() as fake:
            assert not layers.chunked(fake.from_tensor(x), big)
