"""What a benchmark row is made of: ``BenchDecoder`` (one ``--decoders`` name) and ``Goal`` (a figure it must show).

To add a decoder to ``fastdec bench``, add a module under ``fastdec/bench/decoders/`` that defines
``ENTRIES = (BenchDecoder(...), ...)``; it is found automatically (no other file to edit).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastdec.models.base import Decoder

MIB = 2**20
GIB = 2**30


@dataclass(frozen=True)
class Goal:
    """A figure this benchmark must show: the row metric of one decoder/variant/size/batch against a limit."""

    text: str
    decoder: str
    variant: str
    resolution: int
    batch: int
    metric: str  # "median_ms" or "peak_memory_bytes"
    limit: float
    baseline: str  # the reference figure the goal is set against, for the reader

    def short(self) -> str:
        value = f"{self.limit / GIB:g} GiB" if self.metric == "peak_memory_bytes" else f"{self.limit:g} ms"
        return f"<= {value}"


def diffusers_decode(twin: nn.Module, latents: Tensor) -> Tensor:
    """The default twin call: a diffusers autoencoder's ``decode``, first output."""
    return twin.decode(latents, return_dict=False)[0]


def image_latent_shape(model: Decoder, side: int, batch: int, downsample: int) -> tuple[int, ...]:
    """(B, C, side / downsample, side / downsample): image latents for a side x side image."""
    return (batch, model.latent_channels, side // downsample, side // downsample)


def video_latent_shape(frames: Callable[[int], int]) -> Callable[[Decoder, int, int, int], tuple[int, ...]]:
    """The latent_shape of a video entry: (B, C, frames(side), side / downsample, side / downsample)."""
    def shape(model: Decoder, side: int, batch: int, downsample: int) -> tuple[int, ...]:
        return (batch, model.latent_channels, frames(side), side // downsample, side // downsample)
    return shape


@dataclass(frozen=True)
class BenchDecoder:
    """One decoder family as ``fastdec bench --decoders NAME`` runs it.

    ``build()`` returns fastdec's model with random weights (the caller seeds torch); ``twin(model)`` returns the
    same architecture in diffusers with ``model``'s weights, or (None, why there is none); ``twin_decode(twin, z)``
    runs the twin on the raw latents and returns an output laid out like fastdec's ``forward``.
    """

    name: str
    build: Callable[[], Decoder]
    model_class: str  # the fastdec class --weights NAME=PATH must load into
    twin: Callable[[Decoder], tuple[nn.Module | None, str | None]] | None = None
    no_twin_reason: str | None = None  # when twin is None; default: "no diffusers implementation of ..."
    twin_decode: Callable[[nn.Module, Tensor], Tensor] = diffusers_decode
    twin_output_range: str = "-1,1"
    twin_is_other_model: bool = False  # the twin is another model (what users run otherwise): timed, no fidelity
    downsample: int = 8  # pixels per latent along a side
    side_multiple: int = 8  # image sides must be multiples of this (e.g. 16 for 2x2-latent patches)
    latent_shape: Callable[[Decoder, int, int, int], tuple[int, ...]] = image_latent_shape  # (model, side, batch, ds)
    lightweight: bool = False  # a replacement for the SD VAE (SD latents): pipeline share, the 25x goal
    goals: tuple[Goal, ...] = ()  # GPU goals on this decoder's rows
    order: int = 100  # position in the default --decoders list (ties: module name, then ENTRIES order)
    default: bool = True  # in the default --decoders list; False: a slow family that runs only when named
    quick: bool = False  # in --quick's list: one decoder per kind (exact/tiny image VAE, paper, exact/tiny video)
    kind: str = ""  # what the family is, in a few words ("exact image VAE", "tiny video decoder", ...)

    def diffusers_twin(self, model: Decoder) -> tuple[nn.Module | None, str | None]:
        if self.twin is None:
            return None, self.no_twin_reason or f"no diffusers implementation of the {self.name} architecture"
        return self.twin(model)


def empty_diffusers_module(cls, **config) -> nn.Module:
    """A diffusers module allocated without its (slow, here unused) random initialisation; filled by the caller."""
    with torch.device("meta"):
        module = cls(**config)
    module = module.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            tensor.zero_()
    return module.eval()
