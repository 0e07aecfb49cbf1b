"""wan2.1: the exact fast path of the Wan 2.1 VAE decoder (AutoencoderKLWan; Qwen-Image's is the same), against
diffusers' frame-by-frame AutoencoderKLWan.decode. Video latents: 21 latent frames (81 frames) at GPU sizes
(side >= 480), 2 latent frames (5 frames) at the small CPU sizes; side x side frames. Not in the default
``--decoders`` list (a full-width video decoder is slow on CPU): run ``fastdec bench --decoders wan2.1``."""

from __future__ import annotations

from torch import nn

from fastdec.bench.spec import BenchDecoder, empty_diffusers_module, video_latent_shape
from fastdec.models.base import Decoder

GPU_FRAMES, CPU_FRAMES = 21, 2  # latent frames: 81 and 5 decoded frames


def build() -> Decoder:
    from fastdec.models.wan import WanDecoder

    return WanDecoder()  # Wan 2.1's architecture: base_dim 96, z_dim 16


def twin(model: Decoder) -> tuple[nn.Module, None]:
    """diffusers' AutoencoderKLWan with ``model``'s decoder weights (the encoder is allocated, zeros, never run)."""
    import diffusers

    config = model.config
    vae = empty_diffusers_module(
        diffusers.AutoencoderKLWan, base_dim=config["base_dim"], z_dim=config["z_dim"],
        dim_mult=config["dim_mult"], num_res_blocks=config["num_res_blocks"],
        temperal_downsample=config["temporal_downsample"], out_channels=config["out_channels"],
        latents_mean=config["latents_mean"], latents_std=config["latents_std"],
    )
    state = model.state_dict()
    for part in ("decoder", "post_quant_conv"):
        getattr(vae, part).load_state_dict(
            {k.removeprefix(f"{part}."): v for k, v in state.items() if k.startswith(f"{part}.")}, strict=True
        )
    return vae, None


ENTRIES = (
    BenchDecoder(
        "wan2.1", build, "WanDecoder", twin, order=200,
        latent_shape=video_latent_shape(lambda side: GPU_FRAMES if side >= 480 else CPU_FRAMES),
        kind="exact video VAE",
        default=False,
    ),
)
