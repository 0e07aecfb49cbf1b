"""A GPU that is not there: CUDA tensors made fake by torch's FakeTensorMode (shapes, strides and dtypes; no memory,
no values), with the SM count, compute capability and shared memory of a chosen card. bench/compile_check.py
records the Triton launch plans of the ops and of whole decodes on it (``recorded_launches``, ``decode_launches``);
the tests count the host work, graph breaks and launcher copies of decodes at real sizes on it."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from types import SimpleNamespace
from unittest import mock

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor

from fastdec import ops, tiling
from fastdec.kernels.support import attention_config, dispatch
from fastdec.kernels.support.cases import DTYPES
from fastdec.kernels.support.triton_import import TRITON_IMPORT_ERROR, triton
from fastdec.models import layers


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    sms: int  # what the launchers size their grids by
    shared_memory: int  # bytes one program may use (the opt-in maximum)


GPUS = {90: Gpu("H100 SXM", 132, 227 * 1024), 80: Gpu("A100", 108, 163 * 1024)}


@contextlib.contextmanager
def fake_gpu(arch: int = 90) -> Iterator[None]:
    """Inside: CUDA tensors are fake (no memory, no GPU), torch reports the SM count, compute capability and shared
    memory of the ``arch`` GPU, device 0 is current, ``torch.cuda.device`` (the launchers' device guard) and stream
    synchronisation do nothing, convs lay out their output as cuDNN does, and layers take the row chunks of large
    tensors (models.layers.chunked) as on a GPU, where they leave FakeTensors whole."""
    gpu = GPUS[arch]
    properties = SimpleNamespace(multi_processor_count=gpu.sms, name=gpu.name,
                                 shared_memory_per_block_optin=gpu.shared_memory)
    attention_config.forget()  # what it read from the previous (fake) GPU
    try:
        with (mock.patch.object(torch.cuda, "get_device_properties", lambda *_: properties),
              mock.patch.object(torch.cuda, "get_device_capability", lambda *_: divmod(arch, 10)),
              mock.patch.object(torch.cuda, "device", lambda *_: contextlib.nullcontext()),
              mock.patch.object(torch.cuda, "current_device", lambda: 0),
              mock.patch.object(torch.cuda, "current_stream", lambda *_: SimpleNamespace(synchronize=lambda: None)),
              mock.patch.object(torch._C, "_conv_determine_backend_memory_format", _cudnn_memory_format),
              mock.patch.object(layers, "Tensor", FakeTensor),  # chunked() takes type(x) is Tensor
              torch._subclasses.fake_tensor.FakeTensorMode()):
            yield
    finally:
        attention_config.forget()


def _cudnn_memory_format(input_: Tensor, weight: Tensor, backend) -> torch.memory_format:
    """The layout of a conv's output on a GPU with cuDNN: channels_last when the input or the weight is. (The fake
    conv picks by the backend this machine would run: contiguous for bf16 on a CPU-only build.)"""
    formats = {torch._prims_common.suggest_memory_format(t) for t in (input_, weight)}
    return next((f for f in (torch.channels_last, torch.channels_last_3d) if f in formats), torch.contiguous_format)


def fake_decoder(entry, size: int | tuple[int, ...], dtype: torch.dtype) -> tuple[nn.Module, Tensor]:
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
    return model, torch.randn(shape, device="cuda", dtype=dtype)


def to_channels_last(model: nn.Module, latents: Tensor) -> Tensor:
    """The 2-D decoder's parameters made channels_last in place, as ``model.to(memory_format=torch.channels_last)``
    does (which cannot swap fake parameters); returns the latents in channels_last."""
    for param in (p for p in model.parameters() if p.dim() == 4):
        param.data = param.data.contiguous(memory_format=torch.channels_last)
    return latents.contiguous(memory_format=torch.channels_last)


# --- recording what the launchers launch -------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    kernel: object  # the @triton.jit function
    args: tuple
    kwargs: dict


class RecordingKernel:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kwargs)`` records the launch, runs nothing."""

    def __init__(self, kernel, launches: list[Launch]):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(Launch(self.kernel, args, kwargs))


def launched_kernels(module) -> dict[str, object]:
    """The module's launchable kernels: @triton.jit functions named _..._kernel (helpers are inlined into them),
    compiled or, under TRITON_INTERPRET, interpreted."""
    if TRITON_IMPORT_ERROR is not None:
        return {}
    from triton.runtime.interpreter import InterpretedFunction

    kinds = (triton.runtime.JITFunction, InterpretedFunction)
    return {name: obj for name, obj in vars(module).items() if name.endswith("_kernel") and isinstance(obj, kinds)}


def _recording(stack: contextlib.ExitStack, module, launches: list[Launch]) -> None:
    """Inside ``stack``, the module's kernels record their launches into ``launches``."""
    for name, kernel in launched_kernels(module).items():
        stack.enter_context(mock.patch.object(module, name, RecordingKernel(kernel, launches)))


@contextlib.contextmanager
def recorded_launches(module, arch: int) -> Iterator[list[Launch]]:
    """Inside fake_gpu(arch), the module's kernels record their launches into the yielded list."""
    launches: list[Launch] = []
    with contextlib.ExitStack() as stack:
        _recording(stack, module, launches)
        stack.enter_context(fake_gpu(arch))
        yield launches


def decode_launches(entry, size, dtype: str, channels_last: bool, arch: int,
                    tile: int | None = None) -> tuple[list[Launch], tuple] | None:
    """(launches, latent shape) of one decode on the fake GPU (None: the family does not run channels_last),
    ``tile``: in slabs of that many pixel rows (fastdec.tiling, its slabs waiting in pinned host memory). Untiled
    the models call the launchers (the op registry would run its fake kernels), tiled tiling's op rules do."""
    launches: list[Launch] = []
    with contextlib.ExitStack() as stack:
        for op in ops.TRITON_OPS:
            module = ops.OP_MODULES[op]
            _recording(stack, module, launches)
            if tile is None:
                stack.enter_context(mock.patch.object(ops, op, getattr(module, f"{op}_triton")))
        stack.enter_context(mock.patch.object(dispatch, "triton_on_cuda", lambda: True))  # also in the test suite
        stack.enter_context(fake_gpu(arch))
        stack.enter_context(torch.no_grad())
        model, latents = fake_decoder(entry, size, DTYPES[dtype])
        if channels_last:
            if not model.channels_last_on_cuda:
                return None
            latents = to_channels_last(model, latents)
        if tile is None:
            model.decode(latents, check_finite=False)
        else:
            tiling.tiled_decode(model, latents, tile, check_finite=False)
    return launches, tuple(latents.shape)
