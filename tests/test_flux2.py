"""FLUX.2: Flux2VAEDecoder against diffusers' AutoencoderKLFlux2 (random weights, fp32), and the latents a tiny random
Flux2Pipeline returns with output_type="latent" (tokens, packed) decoded by fastdec.decode, swap_vae and taef2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
from helpers import edit_config, jitter, relative_error
from tolerances import DECODER_FP32_REL

import fastdec
from fastdec import ops
from fastdec.diffusers import swap_vae, unswap_vae
from fastdec.models.flux2 import Flux2VAEDecoder, PackedLatentsDecoder, tokens_to_grid, unpack_latents
from fastdec.models.taesd import TAESDDecoder

TAEF2 = Path(__file__).resolve().parents[1] / ".." / "shared" / "weights" / "taef2" / "taef2_decoder.pth"
HEIGHT, WIDTH = 48, 32  # a non-square image: 3 x 2 tokens of 16 x 16 pixels


def tiny_flux2_vae(seed: int = 0) -> AutoencoderKLFlux2:
    """Four levels (vae_scale_factor 8, as FLUX.2's), random norm affines and latent statistics."""
    torch.manual_seed(seed)
    vae = jitter(AutoencoderKLFlux2(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4).eval())
    with torch.no_grad():
        vae.bn.running_mean.normal_()
        vae.bn.running_var.uniform_(0.5, 2.0)
    return vae


@pytest.fixture(scope="module")
def pipeline() -> Flux2Pipeline:
    """A tiny random Flux2Pipeline (no text encoder: prompt embeddings are passed in)."""
    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(
        in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
    ).eval()
    pipe = Flux2Pipeline(FlowMatchEulerDiscreteScheduler(), tiny_flux2_vae(), None, None, transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: Flux2Pipeline, output_type: str):
    embeddings = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), ops.reference_ops():  # the fused ops are checked in test_raw_latents_match_diffusers
        return pipe(prompt_embeds=embeddings, height=HEIGHT, width=WIDTH, num_inference_steps=2,
                    output_type=output_type, generator=torch.Generator().manual_seed(0)).images


def pipeline_unpack(pipe: Flux2Pipeline, tokens: torch.Tensor) -> torch.Tensor:
    """Flux2Pipeline.__call__'s own steps from tokens to vae.decode's input (pipeline_flux2.py)."""
    grid = torch.zeros(tokens.shape[0], 1, HEIGHT // 16, WIDTH // 16)
    latents = pipe._unpack_latents_with_ids(tokens, pipe._prepare_latent_ids(grid))
    mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    return pipe._unpatchify_latents(latents * std + mean)


def test_raw_latents_match_diffusers():
    vae = tiny_flux2_vae()
    decoder = fastdec.load(vae)
    assert isinstance(decoder, Flux2VAEDecoder) and decoder.packed_latent_channels == 128
    z = torch.randn(1, 32, 3, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = vae.decode(z).sample
        assert relative_error(decoder(z), reference) <= DECODER_FP32_REL
        assert relative_error(decoder.decode(z), (reference / 2 + 0.5).clamp(0, 1)) <= DECODER_FP32_REL


def test_pipeline_latents_decode_like_the_pipeline(pipeline):
    """output_type="latent" tokens through fastdec.decode (image_size), the packed grid, and the raw latents all
    give the pipeline's own images (output_type="pt": vae.decode, then x / 2 + 0.5 clamped)."""
    tokens, reference = generate(pipeline, "latent"), generate(pipeline, "pt")
    assert tokens.shape == (2, (HEIGHT // 16) * (WIDTH // 16), 128)
    decoder = fastdec.load(pipeline.vae)
    grid = tokens_to_grid(tokens, HEIGHT, WIDTH)
    with torch.no_grad(), ops.reference_ops():
        raw = pipeline_unpack(pipeline, tokens)
        assert torch.equal(unpack_latents(grid, decoder.bn), raw)
        for images in (fastdec.decode(tokens, decoder, image_size=(HEIGHT, WIDTH)), decoder.decode(grid),
                       decoder.decode(raw)):
            assert images.shape == reference.shape == (2, 3, HEIGHT, WIDTH)
            assert relative_error(images, reference) <= DECODER_FP32_REL


def test_swap_vae_keeps_the_pipeline_output(pipeline):
    reference = generate(pipeline, "pt")
    original = pipeline.vae
    try:
        swap_vae(pipeline, fastdec.load(original))
        assert relative_error(generate(pipeline, "pt"), reference) <= DECODER_FP32_REL
    finally:
        pipeline.vae = original
        unswap_vae(pipeline)


@pytest.mark.skipif(not TAEF2.is_file(), reason=f"the real TAEF2 weights are not at {TAEF2} (../shared)")
def test_taef2_decodes_packed_latents_with_the_vaes_statistics(pipeline):
    taef2 = fastdec.load(TAEF2)
    packed = PackedLatentsDecoder(taef2, pipeline.vae)
    tokens = generate(pipeline, "latent")[:1]
    with torch.no_grad():
        expected = taef2.decode(pipeline_unpack(pipeline, tokens))
        torch.testing.assert_close(fastdec.decode(tokens, packed, image_size=(HEIGHT, WIDTH)), expected,
                                   rtol=0, atol=0)
        torch.testing.assert_close(packed.decode(tokens_to_grid(tokens, HEIGHT, WIDTH)), expected, rtol=0, atol=0)
    original = pipeline.vae
    try:  # swapped into the pipeline, taef2 decodes what the pipeline unpacked itself
        swap_vae(pipeline, taef2)
        with torch.no_grad():
            torch.testing.assert_close(generate(pipeline, "pt")[:1], expected, rtol=1e-5, atol=1e-5)
    finally:
        pipeline.vae = original
        unswap_vae(pipeline)
    with pytest.raises(ValueError, match="BatchNorm statistics"):
        PackedLatentsDecoder(taef2, TAESDDecoder("taesd"))
    with pytest.raises(TypeError, match="save its .decoder"):
        packed.save_pretrained("unused")


def test_folder_name_and_hub_id_load_strictly(offline, tmp_path, monkeypatch):
    import huggingface_hub

    vae = tiny_flux2_vae()
    folder = tmp_path / "pipeline" / "vae"
    vae.save_pretrained(folder, safe_serialization=True)
    (offline / "flux2").mkdir()  # the name "flux2" looks in FASTDEC_HOME first
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (offline / "flux2" / name).write_bytes((folder / name).read_bytes())

    def fake_download(repo_id, filename, subfolder=None, **kwargs):
        assert (repo_id, subfolder) == ("black-forest-labs/FLUX.2-dev", "vae")
        return str(folder / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    z = torch.randn(1, 128, 1, 1, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), ops.reference_ops():
        reference = fastdec.load(vae).decode(z)
        for source in (tmp_path / "pipeline", folder, "flux2", "black-forest-labs/FLUX.2-dev/vae"):
            decoder = fastdec.load(source)
            assert isinstance(decoder, Flux2VAEDecoder)
            torch.testing.assert_close(decoder.decode(z), reference, rtol=0, atol=0)
    saved = tmp_path / "saved"
    decoder.save_pretrained(saved)
    assert json.loads((saved / "config.json").read_text())["class"] == "Flux2VAEDecoder"
    with torch.no_grad(), ops.reference_ops():
        torch.testing.assert_close(fastdec.load(saved).decode(z), reference, rtol=0, atol=0)
    edit_config(folder, {"patch_size": [1, 1]})
    with pytest.raises(ValueError, match="patch_size"):
        fastdec.load(folder)


def test_tokens_need_the_image_size():
    decoder = Flux2VAEDecoder(block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1)
    tokens = torch.randn(1, 6, 128)
    with pytest.raises(ValueError, match="image_size"):
        fastdec.decode(tokens, decoder, image_size=(64, 64))  # 16 tokens, not 6
    with pytest.raises(ValueError, match="128: FLUX.2's packed latents"):
        decoder.decode(torch.randn(1, 64, 2, 2))
    with ops.reference_ops():
        image = fastdec.decode(tokens, decoder, image_size=(48, 32))
        assert image.shape == (1, 3, 12, 8)  # 3x2 grid, 6x4 raw latents, 2x
        # Tiling sees the raw latents (fastdec.decode unpacks first): exact slabs of 4 pixel rows.
        torch.testing.assert_close(fastdec.decode(tokens, decoder, image_size=(48, 32), tile_size=4), image)
