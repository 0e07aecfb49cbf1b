"""sd-vae: the exact fast path of SD's AutoencoderKL decoder, against diffusers' AutoencoderKL."""

from __future__ import annotations

from torch import nn

from fastdec.bench.spec import GIB, BenchDecoder, Goal, empty_diffusers_module
from fastdec.models.base import Decoder


def _preset(name: str):
    def build() -> Decoder:
        from fastdec.models.autoencoder_kl import AutoencoderKLDecoder

        return AutoencoderKLDecoder.from_preset(name)
    return build


def autoencoder_twin(model: Decoder, cls: type, **class_config) -> nn.Module:
    """A diffusers AutoencoderKL-family module ``cls`` with ``model``'s decoder-side weights (every top-level part
    of the state dict: decoder, post_quant_conv, bn, ...); the encoder is allocated, zeros, never run."""
    config = model.config
    stages = len(config["block_out_channels"])
    vae = empty_diffusers_module(
        cls, latent_channels=config["latent_channels"], out_channels=config["out_channels"],
        block_out_channels=tuple(config["block_out_channels"]), layers_per_block=config["layers_per_block"],
        norm_num_groups=config["norm_num_groups"], down_block_types=("DownEncoderBlock2D",) * stages,
        up_block_types=("UpDecoderBlock2D",) * stages, use_post_quant_conv=config["use_post_quant_conv"],
        mid_block_add_attention=config["mid_block_add_attention"], **class_config,
    )
    state = model.state_dict()
    for part in sorted({key.split(".", 1)[0] for key in state}):
        part_state = {k.removeprefix(f"{part}."): v for k, v in state.items() if k.startswith(f"{part}.")}
        getattr(vae, part).load_state_dict(part_state, strict=True)
    return vae


def twin(model: Decoder) -> tuple[nn.Module, None]:
    """diffusers' AutoencoderKL with ``model``'s decoder weights."""
    import diffusers

    config = model.config
    scaling = dict(scaling_factor=config["scaling_factor"], shift_factor=config["shift_factor"])
    return autoencoder_twin(model, diffusers.AutoencoderKL, **scaling), None


ENTRIES = (
    BenchDecoder(
        "sd-vae", _preset("sd"), "AutoencoderKLDecoder", twin, order=10, quick=True, kind="exact image VAE",
        goals=(
            Goal("SD-VAE decode 512x512, exact fast path", "sd-vae", "fastdec", 512, 1, "median_ms", 5.5,
                 "diffusers eager 22.2 ms, torch.compile 8.9 ms (H200)"),
            Goal("SD-VAE decode 1024x1024, exact fast path", "sd-vae", "fastdec", 1024, 1, "median_ms", 22.0,
                 "diffusers eager 87 ms (H200)"),
            Goal("SD-VAE decode 1024x1024, peak extra memory", "sd-vae", "fastdec", 1024, 1, "peak_memory_bytes",
                 1.2 * GIB, "diffusers eager 2.4 GiB"),
        ),
    ),
    # FLUX.1's VAE: the SD architecture with 16 latent channels and no post_quant_conv (issue 21: a goal size of the
    # one-call GPU run, bench/gpu_run.sh); not in the default list, whose CPU run already covers the architecture.
    BenchDecoder("flux1", _preset("flux"), "AutoencoderKLDecoder", twin, order=11, default=False,
                 kind="exact image VAE"),
)
