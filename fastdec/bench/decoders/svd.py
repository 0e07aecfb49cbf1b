"""svd, tae-temporal: decoders of Stable Video Diffusion's per-frame latents, clips of (B, 4, T, h, w).

svd is the exact fast path of diffusers' AutoencoderKLTemporalDecoder, timed against it with the same
decode_chunk_size: both decode the whole clip in one call (StableVideoDiffusionPipeline's default chunk, 14, is its
default clip length). tae-temporal (the paper's temporal decoder) has no diffusers twin.

Both run in the default layout on CUDA too (Module.to(channels_last) refuses the Conv3d weights). Clip length: 14
frames (SVD's clip) at the GPU sizes (512 px and up), 2 at the CPU sizes (128 and 256 px), 1 in CI's tiny
pytest-benchmark suite (32 px).
"""

from __future__ import annotations

from torch import Tensor, nn

from fastdec.bench.spec import BenchDecoder, empty_diffusers_module, video_latent_shape
from fastdec.models.base import Decoder

SVD_FRAMES = 14
CPU_FRAMES = 2


def frames_for(side: int) -> int:
    if side >= 512:
        return SVD_FRAMES
    return CPU_FRAMES if side >= 128 else 1  # below 128 px: CI's tiny bench suite (bench/test_bench_decoders.py)


def build_svd() -> Decoder:
    from fastdec.models.svd import SVDDecoder

    return SVDDecoder()


def build_tae_temporal() -> Decoder:
    from fastdec.models.tae_temporal import TAETemporalDecoder

    return TAETemporalDecoder()


def twin(model: Decoder) -> tuple[nn.Module, None]:
    """diffusers' AutoencoderKLTemporalDecoder with ``model``'s decoder weights (the encoder: zeros, never run)."""
    import diffusers

    config = model.config
    stages = len(config["block_out_channels"])
    vae = empty_diffusers_module(
        diffusers.AutoencoderKLTemporalDecoder, latent_channels=config["latent_channels"],
        out_channels=config["out_channels"], block_out_channels=tuple(config["block_out_channels"]),
        layers_per_block=config["layers_per_block"], down_block_types=("DownEncoderBlock2D",) * stages,
    )
    state = {k.removeprefix("decoder."): v for k, v in model.state_dict().items()}
    vae.decoder.load_state_dict(state, strict=True)
    return vae, None


def twin_decode(vae: nn.Module, z: Tensor) -> Tensor:
    """(B, C, T, h, w) -> diffusers' per-frame decode of the whole clip -> (B, T, 3, H, W), like fastdec's forward."""
    batch, _, frames = z.shape[:3]
    out = vae.decode(z.transpose(1, 2).flatten(0, 1), num_frames=frames, return_dict=False)[0]
    return out.unflatten(0, (batch, frames))


ENTRIES = (
    BenchDecoder("svd", build_svd, "SVDDecoder", twin, twin_decode=twin_decode,
                 latent_shape=video_latent_shape(frames_for), order=60, quick=True, kind="exact video VAE"),
    BenchDecoder("tae-temporal", build_tae_temporal, "TAETemporalDecoder", latent_shape=video_latent_shape(frames_for),
                 no_twin_reason="no diffusers implementation (a TAESD decoder with SVD's temporal mid-block)",
                 order=60, kind="paper decoder (temporal)"),
)
