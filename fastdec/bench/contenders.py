"""The models under test: fastdec's decoder and its diffusers twin, built from a ``BenchDecoder`` entry."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastdec.api import load
from fastdec.bench.decoders import DECODERS, ENTRIES
from fastdec.bench.spec import BenchDecoder
from fastdec.models.base import Decoder


@dataclass
class Contender:
    """A fastdec decoder (CPU, float32, eval) and the same architecture with the same weights in diffusers."""

    name: str
    model: Decoder
    diffusers: nn.Module | None
    no_diffusers_reason: str | None
    entry: BenchDecoder

    @property
    def channels_last(self) -> bool:
        """Whether fastdec's model runs channels_last on CUDA (its preferred layout: convolutional decoders)."""
        return type(self.model).channels_last_on_cuda


def fastdec_model(name: str, weights: str | None = None) -> Decoder:
    """The fastdec decoder of a family, random (the paper's/preset's architecture) or from ``weights``."""
    entry = ENTRIES[name]
    if weights is not None:
        model = load(weights, device="cpu", dtype=torch.float32)
        if type(model).__name__ != entry.model_class:
            raise ValueError(f"--weights {name}={weights} holds a {type(model).__name__}, not a {entry.model_class}")
    else:
        model = entry.build()
    fuse = getattr(model, "fuse_for_inference", None)  # EfficientViT: BatchNorm folded into the convs
    if fuse is not None:
        model = fuse()
    return model.float().eval()


def build_contender(name: str, weights: str | None = None, seed: int = 0) -> Contender:
    """Builds fastdec's model (seeded random weights unless ``weights``) and its diffusers twin, on the CPU."""
    torch.manual_seed(seed + DECODERS.index(name))
    model = fastdec_model(name, weights)
    twin, reason = ENTRIES[name].diffusers_twin(model)
    return Contender(name, model, twin, reason, ENTRIES[name])


def latents_for(contender: Contender, side: int, batch: int, seed: int, height: int | None = None) -> Tensor:
    """Random normal latents (never zeros: some kernels shortcut on them) for a side x side image (height x side
    when given), on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    entry = contender.entry
    shape = list(entry.latent_shape(contender.model, side, batch, entry.downsample))
    if height is not None:
        shape[-2] = height // entry.downsample  # every entry's latents end (..., rows, columns)
    return torch.randn(shape, generator=generator)


def prepare(module: nn.Module, device: torch.device, dtype: torch.dtype, channels_last: bool) -> nn.Module:
    module = module.to(device=device, dtype=dtype)
    return module.to(memory_format=torch.channels_last) if channels_last else module


def image_of(output: Tensor, output_range: str) -> Tensor:
    """A decoder output as an fp32 image on the [0, 1] scale, not clamped (fidelity is measured on it)."""
    image = output.float()
    return image * 0.5 + 0.5 if output_range == "-1,1" else image
