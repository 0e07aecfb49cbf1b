"""flux2: the exact fast path of FLUX.2's AutoencoderKLFlux2 decoder (raw 32-channel latents), against diffusers."""

from __future__ import annotations

from torch import nn

from fastdec.bench.spec import BenchDecoder, Goal
from fastdec.models.base import Decoder


def build() -> Decoder:
    from fastdec.models.flux2 import Flux2VAEDecoder

    return Flux2VAEDecoder.from_preset("flux2")


def twin(model: Decoder) -> tuple[nn.Module, None]:
    """diffusers' AutoencoderKLFlux2 with ``model``'s weights (decoder, post_quant_conv, bn statistics)."""
    import diffusers

    from fastdec.bench.decoders.sd_vae import autoencoder_twin

    return autoencoder_twin(model, diffusers.AutoencoderKLFlux2, batch_norm_eps=model.config["batch_norm_eps"]), None


ENTRIES = (
    BenchDecoder(
        "flux2", build, "Flux2VAEDecoder", twin, order=11, kind="exact image VAE",
        goals=(Goal("FLUX.2 VAE decode 1024x1024, exact fast path", "flux2", "fastdec", 1024, 1, "median_ms", 25.0,
                    "diffusers eager about 90-100 ms (H200)"),),
    ),
)
