"""The one check every decode entry point runs on its latents: ``fastdec.decode``, every ``Decoder.decode`` (image
and video families alike), the CLI and the batch engines all call ``check_latents``, so a bad input gets the same
clear message wherever it comes in.

The NaN/Inf check reads one value back to the host, which costs a synchronisation on CUDA. It runs by default in
eager use and is skipped where it cannot or must not run: under ``torch.compile`` (it would break the graph), during
CUDA-graph capture (a capture cannot synchronise), with ``check_finite=False``, or for the whole process with
``FASTDEC_CHECK_FINITE=0``.
"""

from __future__ import annotations

import itertools
import os

import torch
from torch import Tensor, nn

from fastdec import wording
from fastdec.models import registry

CHECK_FINITE_ENV = "FASTDEC_CHECK_FINITE"


def weights_device_and_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of a module's first floating-point parameter or buffer (CPU, default dtype if none)."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def finite_check_enabled(check_finite: bool | None = None) -> bool:
    """Whether the NaN/Inf check runs now: ``check_finite`` (None: the process default, on unless
    FASTDEC_CHECK_FINITE=0), and never under torch.compile or CUDA-graph capture."""
    if torch.compiler.is_compiling() or (torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()):
        return False
    if check_finite is None:
        return os.environ.get(CHECK_FINITE_ENV, "1") != "0"
    return bool(check_finite)


def check_latents_tensor(latents: object) -> Tensor:
    """``latents`` is a float tensor with data: the checks that need no decoder."""
    if not isinstance(latents, Tensor):
        hint = " (numpy: torch.from_numpy(array))" if type(latents).__module__ == "numpy" else ""
        raise TypeError(f"latents must be a torch.Tensor, got a {type(latents).__name__}{hint}")
    if latents.device.type == "meta":
        raise ValueError(
            "latents are on the meta device and hold no values: create or load them on a real device (cpu, cuda)"
        )
    if not latents.is_floating_point():
        raise TypeError(f"latents must be a float tensor, got {latents.dtype}: {wording.float_cast()}")
    return latents


def check_latents(latents: object, decoder: nn.Module, check_finite: bool | None = None) -> Tensor:
    """Checks batched latents against ``decoder`` and returns them; raises TypeError/ValueError saying what is wrong
    and what to do. ``decoder.latent_ndim`` is 4 for image decoders, (B, C, h, w), and 5 for video decoders,
    (B, C, T, h, w)."""
    latents = check_latents_tensor(latents)
    name = type(decoder).__name__
    ndim = getattr(decoder, "latent_ndim", 4)
    layout = "(B, C, h, w)" if ndim == 4 else "(B, C, T, h, w)"
    shape = tuple(latents.shape)
    if latents.dim() != ndim:
        if ndim == 4 and latents.dim() == 5:
            advice = (
                f"these look like video latents (B, C, T, h, w), and {name} decodes images: use a video decoder "
                f"({wording.loading('taew2_1')}, ...) or {wording.frames_as_images()}"
            )
        elif ndim == 5 and latents.dim() == 4:
            advice = (
                f"{name} decodes video latents (B, C, T, h, w): add the time axis, latents.unsqueeze(2) for one "
                "frame, or use an image decoder for image latents"
            )
        elif latents.dim() == ndim - 1:
            advice = "add the batch axis (latents.unsqueeze(0)); fastdec.decode also accepts unbatched latents"
        else:
            advice = f"reshape them to {layout}"
        raise ValueError(f"{name} expects latents shaped {layout}, got shape {shape}: {advice}")
    packed = getattr(decoder, "packed_latent_channels", None)  # FLUX.2 decoders also take packed latents
    if shape[1] != decoder.latent_channels and shape[1] != packed:
        defaults = registry.default_decoders(ndim)
        example = f" (e.g. {wording.decoder_choice(defaults[shape[1]])})" if shape[1] in defaults else ""
        raise ValueError(
            f"latents have {shape[1]} channels but {name} expects {decoder.latent_channels}"
            + (f" (or {packed}: FLUX.2's packed latents)" if packed else "")
            + f": pass a decoder for "
            f"{shape[1]}-channel latents{example}, or check the channel axis (dim 1 of {layout})"
        )
    if 0 in shape:
        axes = dict(zip(("batch", "channels", "time", "height", "width") if ndim == 5
                        else ("batch", "channels", "height", "width"), shape, strict=True))
        empty = ", ".join(axis for axis, size in axes.items() if size == 0)
        raise ValueError(f"latents of shape {shape} are empty ({empty} is 0): {name} needs at least one of each")
    weights_device, _ = weights_device_and_dtype(decoder)
    if latents.device != weights_device:
        raise ValueError(
            f"latents are on {latents.device} but {name}'s weights on {weights_device}: move the latents "
            f"(latents.to('{weights_device}')) or the decoder (decoder.to('{latents.device}'))"
        )
    if finite_check_enabled(check_finite) and not bool(torch.isfinite(latents).all()):
        raise ValueError(
            "latents contain NaN or Inf: the diffusion run diverged or the latents are corrupt (this check can be "
            f"turned off with {wording.finite_check_off(CHECK_FINITE_ENV)})"
        )
    return latents
