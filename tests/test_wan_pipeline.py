"""swap_vae on a diffusers WanPipeline: a tiny, randomly initialised pipeline built offline (no tokenizer or text
encoder: it runs on prompt embeddings) decodes through fastdec's WanDecoder and gives the same video for every
output type."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import jitter
from tolerances import DECODER_FP32_REL

from fastdec import ops
from fastdec.diffusers import FastdecVAE, swap_vae, unswap_vae
from fastdec.models.wan import WanDecoder

pytest.importorskip("transformers", reason="diffusers' Wan pipelines import transformers")
from diffusers import (  # noqa: E402  (after the skip: WanPipeline imports transformers)
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    WanPipeline,
    WanTransformer3DModel,
)

TINY_VAE = dict(base_dim=4, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0])


@pytest.fixture(scope="module")
def pipeline() -> WanPipeline:
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32,
    ).eval()
    vae = jitter(AutoencoderKLWan(**TINY_VAE).eval(), lambda name: name.endswith("gamma"))
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, output_type: str):
    """5 frames (2 latent frames) of 32x48 from fixed prompt embeddings and noise."""
    embeddings = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(0))
    return pipe(prompt_embeds=embeddings, height=32, width=48, num_frames=5, num_inference_steps=2,
                guidance_scale=1.0, output_type=output_type, generator=torch.Generator().manual_seed(0)).frames


def test_swapped_wan_pipeline_gives_the_same_video(pipe):
    reference = {kind: generate(pipe, kind) for kind in ("np", "latent")}
    wrapper = swap_vae(pipe, WanDecoder.from_diffusers(pipe.vae))
    assert pipe.vae is wrapper.original and isinstance(wrapper.decoder, WanDecoder)
    with ops.reference_ops():
        video = generate(pipe, "np")
        frames = generate(pipe, "pil")
        latents = generate(pipe, "latent")
    assert video.shape == reference["np"].shape == (1, 5, 32, 48, 3)
    assert np.abs(video - reference["np"]).max() <= DECODER_FP32_REL * 2
    assert torch.equal(latents, reference["latent"])  # "latent" never decodes
    assert len(frames) == 1 and len(frames[0]) == 5 and frames[0][0].size == (48, 32)
    pixels = np.stack([np.asarray(frame) for frame in frames[0]])
    assert np.abs(pixels.astype(np.int16) - np.round(video[0] * 255).astype(np.int16)).max() <= 1
    pipe.vae.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=48)  # fastdec's slabs: 2 of 16 rows
    assert wrapper.tile_size_for(torch.zeros(1, 4, 2, 4, 6)) == 16
    with ops.reference_ops():
        tiled = generate(pipe, "np")
    pipe.vae.disable_tiling()
    assert np.abs(tiled - reference["np"]).max() <= DECODER_FP32_REL * 2
    unswap_vae(pipe)  # the swap undone: the original VAE again
    np.testing.assert_array_equal(generate(pipe, "np"), reference["np"])


def test_swap_by_instance_and_wrong_decoders_are_refused(pipe):
    wrapper = swap_vae(pipe, pipe.vae)  # anything fastdec.load takes: here the diffusers VAE itself
    assert isinstance(wrapper, FastdecVAE) and isinstance(wrapper.decoder, WanDecoder)
    with pytest.raises(ValueError, match="4 latent channels"):
        swap_vae(pipe, WanDecoder(base_dim=4, num_res_blocks=1))  # 16 latent channels
    with pytest.raises(ValueError, match=r"video latents \(B, C, T, h, w\)"):
        wrapper(torch.zeros(1, 4, 2, 2))
