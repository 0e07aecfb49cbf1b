"""A GPU that is not there: CUDA tensors made fake by torch's FakeTensorMode (shapes, strides and dtypes; no memory,
no values), with the SM count, compute capability and shared memory of a chosen card. bench/compile_check.py
records the Triton launch plans of the ops and of whole decodes on it; the tests count the host work and graph
breaks of decodes at real sizes on it."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from types import SimpleNamespace
from unittest import mock

import torch
from torch import Tensor, nn

from fastdec.kernels.support import attention_config


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    sms: int  # what the launchers size their grids by
    shared_memory: int  # bytes one program may use (the opt-in maximum)


GPUS = {90: Gpu("H100 SXM", 132, 227 * 1024), 80: Gpu("A100", 108, 163 * 1024)}


@contextlib.contextmanager
def fake_gpu(arch: int = 90) -> Iterator[None]:
    """Inside: CUDA tensors are fake (no memory, no GPU), torch reports the SM count, compute capability and shared
    memory of the ``arch`` GPU, ``torch.cuda.device`` (the launchers' device guard) does nothing, and convs lay out
    their output as cuDNN does."""
    gpu = GPUS[arch]
    properties = SimpleNamespace(multi_processor_count=gpu.sms, name=gpu.name,
                                 shared_memory_per_block_optin=gpu.shared_memory)
    attention_config.forget()  # what it read from the previous (fake) GPU
    try:
        with (mock.patch.object(torch.cuda, "get_device_properties", lambda *_: properties),
              mock.patch.object(torch.cuda, "get_device_capability", lambda *_: divmod(arch, 10)),
              mock.patch.object(torch.cuda, "device", lambda *_: contextlib.nullcontext()),
              mock.patch.object(torch._C, "_conv_determine_backend_memory_format", _cudnn_memory_format),
              torch._subclasses.fake_tensor.FakeTensorMode()):
            yield
    finally:
        attention_config.forget()


def _cudnn_memory_format(input_: Tensor, weight: Tensor, backend) -> torch.memory_format:
    """The layout of a conv's output on a GPU with cuDNN: channels_last when the input or the weight is. (The fake
    conv picks by the backend this machine would run: contiguous for bf16 on a CPU-only build.)"""
    formats = {torch._prims_common.suggest_memory_format(t) for t in (input_, weight)}
    return next((f for f in (torch.channels_last, torch.channels_last_3d) if f in formats), torch.contiguous_format)


@contextlib.contextmanager
def fake_decoder(entry, size: int | tuple[int, ...], dtype: torch.dtype) -> Iterator[tuple[nn.Module, Tensor]]:
    """Inside fake_gpu: (decoder, latents) of a bench entry (fastdec.bench.decoders), built in ``dtype`` on CUDA,
    the latents random, of an image ``size`` (its side) or of that latent shape."""
    # trunc_normal_ draws until values fall in range (data-dependent): fake weights need no values
    with mock.patch.object(nn.init, "trunc_normal_", lambda tensor, *args, **kwargs: tensor):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device("cuda"):
                model = entry.build().eval()
        finally:
            torch.set_default_dtype(previous)
    shape = size if isinstance(size, tuple) else entry.latent_shape(model, size, 1, entry.downsample)
    yield model, torch.randn(shape, device="cuda", dtype=dtype)


def to_channels_last(model: nn.Module, latents: Tensor) -> Tensor:
    """The 2-D decoder's parameters made channels_last in place, as ``model.to(memory_format=torch.channels_last)``
    does (which cannot swap fake parameters); returns the latents in channels_last."""
    for param in (p for p in model.parameters() if p.dim() == 4):
        param.data = param.data.contiguous(memory_format=torch.channels_last)
    return latents.contiguous(memory_format=torch.channels_last)
