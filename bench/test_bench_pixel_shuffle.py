"""pixel_shuffle: fastdec's C++/CUDA kernel vs F.pixel_shuffle vs torch.compile(F.pixel_shuffle), and the
phase_offset=1 variant vs its eager equivalent (slice the f*f phases, then F.pixel_shuffle), on CUDA at decoder
shapes; tiny cases on CPU.

GB/s counts the bytes read plus the bytes written once per call (for phase_offset=1, only the input elements that
reach the output are read).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from op_bench import case, compiled, dtype_name, skip_untimed

from fastdec import ops
from fastdec.kernels import pixel_shuffle as ps


def sliced_pixel_shuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Eager phase_offset=1: phase (a, b) of the conv output is read at offset (a, b), then interleaved."""
    n, channels, height, width = x.shape
    out_h, out_w = height - (factor - 1), width - (factor - 1)
    phases = x.view(n, channels // (factor * factor), factor * factor, height, width)
    shifted = [
        phases[:, :, a * factor + b, a : a + out_h, b : b + out_w] for a in range(factor) for b in range(factor)
    ]
    return F.pixel_shuffle(torch.stack(shifted, dim=2).flatten(1, 2), factor)


SHUFFLE_CASES = [case("cuda", shape, torch.float16) for shape in ps.BENCH_SHAPES] + [
    case("cpu", (1, 16, 16, 16), torch.float32)
]
# phase_offset=1 at the upsamplers of an SD-style VAE decoder: a 2x2 conv with 4*C outputs over the padded input
# gives (H+1, W+1) phase maps; the result is C x 2H x 2W.
PHASE_CASES = [
    case("cuda", (1, 4 * 512, 65, 65), torch.float16),
    case("cuda", (1, 4 * 512, 129, 129), torch.float16),
    case("cuda", (1, 4 * 256, 257, 257), torch.float16),
    case("cuda", (4, 4 * 256, 257, 257), torch.float16),
    case("cpu", (1, 4 * 4, 17, 17), torch.float32),
]
FACTOR = 2


@pytest.mark.parametrize("impl", ["fastdec", "torch", "compiled"])
@pytest.mark.parametrize(("device", "shape", "dtype"), SHUFFLE_CASES)
def test_pixel_shuffle(benchmark, measure, impl, device, shape, dtype):
    skip_untimed("pixel_shuffle", impl, device)
    x = torch.randn(shape, device=device).to(dtype)
    benchmark.group = f"pixel_shuffle {device} {tuple(shape)} {dtype_name(dtype)} x{FACTOR}"
    benchmark.extra_info["impl"] = impl
    fn = {
        "fastdec": lambda t: ops.pixel_shuffle(t, FACTOR),
        "torch": lambda t: F.pixel_shuffle(t, FACTOR),
    }.get(impl) or compiled(lambda t: F.pixel_shuffle(t, FACTOR))

    expected = F.pixel_shuffle(x, FACTOR)

    result = measure(lambda: fn(x), nbytes=2 * x.numel() * x.element_size())

    assert torch.equal(result, expected)


@pytest.mark.parametrize("impl", ["fastdec", "eager_sliced", "compiled_sliced"])
@pytest.mark.parametrize(("device", "shape", "dtype"), PHASE_CASES)
def test_pixel_shuffle_phase_offset(benchmark, measure, impl, device, shape, dtype):
    skip_untimed("pixel_shuffle", impl.removesuffix("_sliced"), device)  # compiled_sliced: not on CPU
    x = torch.randn(shape, device=device).to(dtype)
    benchmark.group = f"pixel_shuffle phase_offset=1 {device} {tuple(shape)} {dtype_name(dtype)} x{FACTOR}"
    benchmark.extra_info["impl"] = impl
    fn = {
        "fastdec": lambda t: ops.pixel_shuffle(t, FACTOR, 1),
        "eager_sliced": lambda t: sliced_pixel_shuffle(t, FACTOR),
    }.get(impl) or compiled(lambda t: sliced_pixel_shuffle(t, FACTOR))
    expected = sliced_pixel_shuffle(x, FACTOR)

    result = measure(lambda: fn(x), nbytes=2 * expected.numel() * x.element_size())

    assert torch.equal(result, expected)
