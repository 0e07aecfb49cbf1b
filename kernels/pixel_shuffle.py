"""Pixel-shuffle upsampling: the eager reference and shape rules. The kernels are C++/CUDA, in csrc/pixel_shuffle.*.

    out[n, c, i*f + a, j*f + b] = x[n, c*f*f + a*f + b, i + a*phase_offset, j + b*phase_offset]

phase_offset=0 is ``torch.nn.functional.pixel_shuffle``. phase_offset=1 interleaves the f*f phase outputs of a conv
run over a padded input, where phase (a, b) sits at offset (a, b) of the conv result; the output then has
(H - (f-1)) * f rows and (W - (f-1)) * f columns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdec.kernels.support.cases import GpuCase, compiled_peer
from fastdec.kernels.support.dispatch import register_backward
from fastdec.kernels.support.extension import EXTENSION


def pixel_shuffle_shape(x: torch.Tensor, factor: int, phase_offset: int = 0) -> tuple[int, int, int, int]:
    """Validates the arguments and returns the output shape; the messages match csrc/pixel_shuffle.h."""
    if x.dim() != 4:
        raise ValueError(
            f"fastdec.pixel_shuffle: expected a 4-D (N, C, H, W) tensor, got {x.dim()}-D with shape {tuple(x.shape)}"
        )
    if factor < 1:
        raise ValueError(f"fastdec.pixel_shuffle: factor must be >= 1, got {factor}")
    if phase_offset not in (0, 1):
        raise ValueError(f"fastdec.pixel_shuffle: phase_offset must be 0 or 1, got {phase_offset}")
    n, c, h, w = x.shape
    if c % (factor * factor):
        raise ValueError(
            f"fastdec.pixel_shuffle: channels ({c}) must be divisible by factor^2 ({factor * factor})"
        )
    shrink = phase_offset * (factor - 1)
    if h < shrink or w < shrink:
        raise ValueError(
            "fastdec.pixel_shuffle: with phase_offset=1 the input must be at least factor-1 = "
            f"{shrink} in H and W, got {tuple(x.shape)}"
        )
    return n, c // (factor * factor), (h - shrink) * factor, (w - shrink) * factor


def pixel_shuffle_empty(x: torch.Tensor, factor: int, phase_offset: int = 0) -> torch.Tensor:
    """An uninitialised output with the shape and layout the kernels produce: channels_last for a channels_last x
    that is not also plain contiguous."""
    shape = pixel_shuffle_shape(x, factor, phase_offset)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def _phase_views(x: torch.Tensor, out: torch.Tensor, factor: int, phase_offset: int):
    """Yields (input view, output view) for each phase (a, b): the two sides of one strided copy."""
    h, w = out.shape[2] // factor, out.shape[3] // factor
    for a in range(factor):
        for b in range(factor):
            ra, rb = a * phase_offset, b * phase_offset
            yield x[:, a * factor + b :: factor * factor, ra : ra + h, rb : rb + w], out[:, :, a::factor, b::factor]


def pixel_shuffle_reference(x: torch.Tensor, factor: int, phase_offset: int = 0) -> torch.Tensor:
    """Eager reference: one strided copy per phase."""
    out = pixel_shuffle_empty(x, factor, phase_offset)
    for src, dst in _phase_views(x, out, factor, phase_offset):
        dst.copy_(src)
    return out


def pixel_shuffle_backward(grad_out: torch.Tensor, x: torch.Tensor, factor: int, phase_offset: int) -> torch.Tensor:
    """Gradient w.r.t. x: the inverse permutation; with phase_offset=1 the unused border rows/cols get zeros."""
    grad_x = (torch.empty_like if phase_offset == 0 else torch.zeros_like)(x)
    for src, dst in _phase_views(grad_x, grad_out, factor, phase_offset):
        src.copy_(dst)
    return grad_x


# --- registration: torch.ops.fastdec.pixel_shuffle (schema and kernels in csrc/pixel_shuffle.cpp) ------------------

FUSED = "extension"  # what runs the fused path; fastdec.ops.backends() says where it runs, and why not

if EXTENSION is None:
    # Same schema as csrc/pixel_shuffle.cpp, backed by the eager reference.
    torch.library.define("fastdec::pixel_shuffle", "(Tensor x, int factor, int phase_offset=0) -> Tensor")
    torch.library.impl("fastdec::pixel_shuffle", ("cpu", "cuda"))(pixel_shuffle_reference)
elif not EXTENSION.built_with_cuda():
    torch.library.impl("fastdec::pixel_shuffle", "cuda")(pixel_shuffle_reference)

torch.library.register_fake("fastdec::pixel_shuffle")(pixel_shuffle_empty)


register_backward("pixel_shuffle", pixel_shuffle_backward)


def pixel_shuffle(x: torch.Tensor, factor: int, phase_offset: int = 0) -> torch.Tensor:
    """Pixel-shuffle upsampling, bitwise equal to F.pixel_shuffle (phase_offset=0); see the module docstring."""
    # Bad arguments get their ValueError here, before the extension: on the H200 machine (torch 2.11, nvcc 13.0)
    # a C++ exception raised by the extension crashed the process instead (bench/results/2026-12-04-gpu-run-h200).
    pixel_shuffle_shape(x, factor, phase_offset)
    return torch.ops.fastdec.pixel_shuffle(x, factor, phase_offset)


# --- the calls its checks and benchmarks make -----------------------------------------------------------------

# The last upsamplers of an SD-style VAE decoder at 1024 px, one sample and eight (gpu_check, bench/).
BENCH_SHAPES = ((1, 512, 256, 256), (8, 512, 256, 256))
GPU_DTYPE = torch.float16  # the dtype its speed goal is stated in


def check_call(r) -> tuple:
    return r(1, 32, 9, 7), 2, 1


def gpu_cases(device: torch.device, dtype: torch.dtype, smoke: bool) -> list[GpuCase]:
    """Bitwise against the reference; phase_offset=0 also against F.pixel_shuffle and its torch.compile."""
    compiled = compiled_peer(F.pixel_shuffle, smoke)

    def case(shape, phase_offset, layout):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        n, c, h, w = shape

        def make():
            if layout == "strided":  # a column slice: rows not contiguous, the generic kernel
                return torch.randn(n, c, h, w + 8, device=device, dtype=dtype)[..., 8:], 2, phase_offset
            return torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt), 2, phase_offset

        out_numel = n * c * (h - phase_offset) * (w - phase_offset)
        peers = ({"F.pixel_shuffle": lambda x, factor, _: F.pixel_shuffle(x, factor),
                  "torch.compile": lambda x, factor, _: compiled(x, factor)}
                 if phase_offset == 0 else {"eager (slices)": pixel_shuffle_reference})
        return GpuCase(f"{tuple(shape)} off{phase_offset} {layout}", make, peers,
                       nbytes=(n * c * h * w + out_numel) * dtype.itemsize, bitwise=True)

    return [case(shape, phase_offset, layout) for shape in ([(1, 16, 8, 8)] if smoke else BENCH_SHAPES)
            for phase_offset in (0, 1) for layout in ("nchw", "channels_last", "strided")]
