"""fastdec.pixel_shuffle (C++/CUDA extension): bitwise equal to F.pixel_shuffle on every input, and its variants."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdec import ops
from fastdec.kernels.pixel_shuffle import pixel_shuffle_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int8, torch.int32,
          torch.int64, torch.bool]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Bitwise comparison: reinterpret floats as integers of the same width, so NaN payloads and -0.0 count too.
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_BITS[t.element_size()])


def random_tensor(shape, dtype, device, generator):
    if dtype.is_floating_point:
        x = torch.randn(shape, generator=generator).to(dtype)
        if x.numel():  # special values must move like any other bits
            flat = x.view(-1)
            flat[torch.randint(0, flat.numel(), (3,), generator=generator)] = torch.tensor(
                [float("nan"), float("-inf"), -0.0], dtype=dtype
            )
        return x.to(device)
    if dtype == torch.bool:
        return (torch.randint(0, 2, shape, generator=generator) > 0).to(device)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -(2**31)), min(info.max, 2**31 - 1), shape, generator=generator,
                         dtype=torch.int64).to(dtype).to(device)


def make_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Same values, different memory: contiguous, channels_last, a transposed view, or a strided slice."""
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":  # H and W swapped in memory
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "sliced":  # every other element of a 2x wider tensor
        wide = torch.zeros(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x.contiguous()


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3), c=st.integers(1, 5), factor=st.integers(1, 4), h=st.integers(0, 9), w=st.integers(0, 9),
    dtype=st.sampled_from(DTYPES), layout=st.sampled_from(["contiguous", "channels_last", "transposed", "sliced"]),
    device=st.sampled_from(DEVICES), seed=st.integers(0, 2**31 - 1),
)
def test_bitwise_equal_to_torch(n, c, factor, h, w, dtype, layout, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = make_layout(random_tensor((n, c * factor * factor, h, w), dtype, device, g), layout)
    out = ops.pixel_shuffle(x, factor)
    expected = F.pixel_shuffle(x, factor)
    assert out.shape == expected.shape and out.dtype == x.dtype and out.device == x.device
    assert torch.equal(bits(out), bits(expected))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("factor", [2, 4])
def test_channels_last_stays_channels_last(device, dtype, factor):
    x = torch.randn(2, 3 * factor * factor, 6, 5, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    out = ops.pixel_shuffle(x, factor)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(bits(out), bits(F.pixel_shuffle(x, factor)))


def phase_offset_by_definition(x: torch.Tensor, f: int) -> torch.Tensor:
    """out[n, c, i*f+a, j*f+b] = x[n, c*f*f + a*f + b, i+a, j+b], written as plain loops."""
    n, c_in, h_in, w_in = x.shape
    h, w = h_in - (f - 1), w_in - (f - 1)
    out = torch.empty(n, c_in // (f * f), h * f, w * f, dtype=x.dtype)
    for c in range(c_in // (f * f)):
        for a in range(f):
            for b in range(f):
                for i in range(h):
                    for j in range(w):
                        out[:, c, i * f + a, j * f + b] = x[:, c * f * f + a * f + b, i + a, j + b]
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("factor", [2, 3])
def test_phase_offset_variant(device, layout, factor):
    g = torch.Generator().manual_seed(factor)
    x = make_layout(random_tensor((2, 2 * factor * factor, 5, 4), torch.float32, device, g), layout)
    expected = phase_offset_by_definition(x.cpu(), factor)
    out = ops.pixel_shuffle(x, factor, 1)
    assert out.shape == (2, 2, (5 - factor + 1) * factor, (4 - factor + 1) * factor)
    assert torch.equal(bits(out.cpu()), bits(expected))
    assert torch.equal(bits(pixel_shuffle_reference(x, factor, 1).cpu()), bits(expected))


@pytest.mark.parametrize("phase_offset", [0, 1])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_reference_matches_extension(phase_offset, layout):
    x = make_layout(torch.randn(1, 16, 7, 6), layout)
    assert torch.equal(pixel_shuffle_reference(x, 2, phase_offset), ops.pixel_shuffle(x, 2, phase_offset))


@pytest.mark.parametrize("impl", [ops.pixel_shuffle, pixel_shuffle_reference], ids=["op", "reference"])
@pytest.mark.parametrize(
    ("shape", "factor", "phase_offset", "message"),
    [
        ((8, 4, 4), 2, 0, "expected a 4-D"),
        ((1, 8, 4, 4, 1), 2, 0, "expected a 4-D"),
        ((1, 6, 4, 4), 2, 0, "divisible by factor"),
        ((1, 4, 4, 4), 0, 0, "factor must be >= 1"),
        ((1, 4, 4, 4), 2, 2, "phase_offset must be 0 or 1"),
        ((1, 9, 1, 4), 3, 1, "at least factor-1"),
    ],
)
def test_bad_input_names_the_problem(impl, shape, factor, phase_offset, message):
    with pytest.raises(ValueError, match=message):
        impl(torch.zeros(shape), factor, phase_offset)


def test_int64_indexing_on_cpu():
    """An output past 2^31 elements must land every element (uint8 keeps it at ~2 GiB each way)."""
    try:
        x = torch.empty(1, 4, 2**15 + 1, 2**14 + 3, dtype=torch.uint8)
    except RuntimeError:
        pytest.skip("not enough memory for a 2 GiB tensor")
    x.view(-1)[:: 2**20 + 7] = 7
    x[0, 3, -1, -1] = 9
    out = ops.pixel_shuffle(x, 2)
    assert out.numel() > 2**31
    assert int(out[0, 0, -1, -1]) == 9
    assert torch.equal(out[0, 0, ::2, ::2], x[0, 0])


@pytest.mark.parametrize("phase_offset", [0, 1])
def test_gradcheck(phase_offset):
    x = torch.randn(1, 8, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.pixel_shuffle(t, 2, phase_offset), (x,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("phase_offset", [0, 1])
def test_cuda_real_sizes(dtype, phase_offset):
    x = torch.randn(2, 512, 67, 129, device="cuda").to(dtype)
    for layout in ("contiguous", "channels_last", "sliced"):
        xl = make_layout(x, layout)
        expected = pixel_shuffle_reference(xl, 2, phase_offset)
        assert torch.equal(bits(ops.pixel_shuffle(xl, 2, phase_offset)), bits(expected))


_INDEX_DRIVER = r"""
#include <cstdio>
#include <cstdlib>
#include "pixel_shuffle_index.h"
int main(int argc, char** argv) {  // vectors_per_pixel vec out_h out_w factor offset sn sc sh sw total
  long long a[11];
  for (int i = 0; i < 11; ++i) a[i] = std::atoll(argv[i + 1]);
  const fastdec::Strides4 s{a[6], a[7], a[8], a[9]};
  for (int t = 0; t < (int)a[10]; ++t)
    std::printf("%lld\n", (long long)fastdec::channel_source<int>(t, (int)a[0], (int)a[1], s, (int)a[2], (int)a[3],
                                                                     (int)a[4], (int)a[5]));
  return 0;
}
"""


@pytest.mark.parametrize(("factor", "offset", "channels_out", "vec"), [(2, 1, 16, 8), (2, 0, 8, 8), (2, 1, 8, 4),
                                                                        (4, 1, 4, 4), (3, 0, 6, 2)])
def test_channels_last_vector_index_math(tmp_path, factor, offset, channels_out, vec):
    """The CUDA channels_last kernel (issue 21: 16-byte stores instead of one element per thread) reads vector t
    of the output from channel_source(t) + v * factor^2 * stride_c, v < VEC. Its index math, compiled from
    csrc/pixel_shuffle_index.h by the host compiler, against the reference permutation on an input whose values
    are their own storage offsets (channels_last, and a strided view with padding)."""
    import shutil
    import subprocess
    from pathlib import Path

    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    csrc = Path(__file__).resolve().parents[1] / "csrc"
    (tmp_path / "driver.cpp").write_text(_INDEX_DRIVER)
    subprocess.run([compiler, "-std=c++17", "-O1", f"-I{csrc}", str(tmp_path / "driver.cpp"), "-o",
                    str(tmp_path / "driver")], check=True, capture_output=True)
    n, height, width = 2, 5, 4
    channels_in = channels_out * factor * factor
    for padded in (False, True):
        # channels_last strides (N, H, W, C in memory); padded: every pixel's channel run is followed by 3 unused
        strides = (height * width * (channels_in + 3 * padded), 1, width * (channels_in + 3 * padded),
                   channels_in + 3 * padded)
        storage = torch.arange(n * strides[0], dtype=torch.int64)
        x = storage.as_strided((n, channels_in, height, width), strides)
        out = pixel_shuffle_reference(x, factor, offset)
        out_memory = out.permute(0, 2, 3, 1).reshape(-1)  # channels_last order: what out + t * VEC addresses
        total = out.numel() // vec
        args = [channels_out // vec, vec, out.shape[2], out.shape[3], factor, offset, *strides, total]
        done = subprocess.run([str(tmp_path / "driver"), *map(str, args)], check=True, capture_output=True, text=True)
        sources = torch.tensor([int(line) for line in done.stdout.split()])
        assert sources.numel() == total
        step = factor * factor * strides[1]
        expected = sources[:, None] + step * torch.arange(vec)[None, :]
        assert torch.equal(out_memory.view(total, vec), expected)
