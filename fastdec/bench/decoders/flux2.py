"""flux2: the exact fast path of FLUX.2's AutoencoderKLFlux2 decoder (raw 32-channel latents), against diffusers."""

from __future__ import annotations

from torch import nn

from fastdec.bench.spec import BenchDecoder, Goal, empty_diffusers_module
from fastdec.models.base import Decoder


def build() -> Decoder:
    from fastdec.models.flux2 import Flux2VAEDecoder

    return Flux2VAEDecoder.from_preset("flux2")


def twin(model: Decoder) -> tuple[nn.Module, None]:
    """diffusers' AutoencoderKLFlux2 with ``model``'s weights (the encoder is allocated, zeros, never run)."""
    import diffusers

    config = model.config
    stages = len(config["block_out_channels"])
    vae = empty_diffusers_module(
        diffusers.AutoencoderKLFlux2, latent_channels=config["latent_channels"], out_channels=config["out_channels"],
        block_out_channels=tuple(config["block_out_channels"]), layers_per_block=config["layers_per_block"],
        norm_num_groups=config["norm_num_groups"], down_block_types=("DownEncoderBlock2D",) * stages,
        up_block_types=("UpDecoderBlock2D",) * stages, use_post_quant_conv=config["use_post_quant_conv"],
        mid_block_add_attention=config["mid_block_add_attention"], batch_norm_eps=config["batch_norm_eps"],
    )
    state = model.state_dict()
    for part in ("decoder", "post_quant_conv", "bn"):
        part_state = {k.removeprefix(f"{part}."): v for k, v in state.items() if k.startswith(f"{part}.")}
        getattr(vae, part).load_state_dict(part_state, strict=True)
    return vae, None


ENTRIES = (
    BenchDecoder(
        "flux2", build, "Flux2VAEDecoder", twin, order=11,
        goals=(Goal("FLUX.2 VAE decode 1024x1024, exact fast path", "flux2", "fastdec", 1024, 1, "median_ms", 25.0,
                    "diffusers eager about 90-100 ms (H200)"),),
    ),
)
