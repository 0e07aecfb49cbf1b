"""fastdec.diffusers.swap_vae: a diffusers pipeline decodes through a fastdec decoder and runs unchanged.

End to end on a tiny, randomly initialised DiTPipeline (the diffusers text-to-image pipelines import transformers,
which may be absent; their tests below skip without it). The decode steps of StableDiffusionPipeline and
StableDiffusionXLPipeline (fp16 + force_upcast, latents_mean/std) and FLUX.2's are replayed line for line on the
swapped VAE, so they run everywhere.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, DDIMScheduler, DiTPipeline, DiTTransformer2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.autoencoders.autoencoder_kl_flux2 import AutoencoderKLFlux2
from helpers import jitter, latents
from PIL import Image
from tolerances import DECODER_FP32_REL, OUTPUT_ROUNDING, UPCAST_FROM_FP16_REL

from fastdec.diffusers import FastdecVAE, swap_vae, swapped, unswap_vae
from fastdec.models.autoencoder_kl import AutoencoderKLDecoder
from fastdec.models.taesd import TAESDDecoder

# Two-level VAEs upsample x2 (vae_scale_factor 2); a TAESD decoder with two stages matches that.
TINY_VAE = dict(block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=1,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def tiny_vae(seed: int = 0, **config) -> AutoencoderKL:
    torch.manual_seed(seed)
    return jitter(AutoencoderKL(**{**TINY_VAE, **config}).eval())  # non-trivial norm affines


def tiny_taesd(latent_channels: int = 4, seed: int = 0) -> TAESDDecoder:
    torch.manual_seed(seed)
    variant = {4: "taesd", 16: "taef1"}[latent_channels]
    return TAESDDecoder(variant, blocks=(1, 1)).eval()


@pytest.fixture(scope="module")
def pipeline() -> DiTPipeline:
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
        norm_num_groups=8, sample_size=8, patch_size=2,
    ).eval()
    pipe = DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, output_type: str):
    return pipe(class_labels=[1, 7], num_inference_steps=2, guidance_scale=1.0, output_type=output_type,
                generator=torch.Generator().manual_seed(0)).images


def test_exact_decoder_matches_the_original_pipeline(pipe):
    reference = generate(pipe, "np")
    wrapper = swap_vae(pipe, AutoencoderKLDecoder.from_diffusers(pipe.vae))
    assert pipe.vae is wrapper.original and pipe.config.vae == ("diffusers", "AutoencoderKL")
    swapped = generate(pipe, "np")
    assert swapped.shape == reference.shape == (2, 16, 16, 3) and np.isfinite(swapped).all()
    assert np.abs(swapped - reference).max() <= DECODER_FP32_REL
    images = generate(pipe, "pil")
    assert len(images) == 2 and all(isinstance(im, Image.Image) and im.size == (16, 16) for im in images)
    tensors = generate(pipe, "pt")
    torch.testing.assert_close(tensors.permute(0, 2, 3, 1).numpy(), swapped, rtol=0, atol=DECODER_FP32_REL)


def test_pipeline_properties_and_moves_see_the_wrapper(pipe):
    swap_vae(pipe, tiny_taesd())
    assert pipe.device.type == "cpu" and pipe.dtype == torch.float32
    pipe.to("cpu")
    assert pipe.vae.device.type == "cpu" and pipe.vae.dtype == torch.float32


def test_taesd_decoder_runs_in_the_pipeline(pipe):
    swap_vae(pipe, tiny_taesd())
    images = generate(pipe, "np")
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1


def test_swap_by_path_and_undo(pipe, tmp_path):
    original = pipe.vae
    tiny_taesd(seed=3).save_pretrained(tmp_path / "decoder")
    wrapper = swap_vae(pipe, str(tmp_path / "decoder"))
    assert isinstance(wrapper.decoder, TAESDDecoder) and wrapper.original is original
    # Swapping again wraps the original VAE, never a wrapper.
    assert swap_vae(pipe, tiny_taesd()).original is original
    unswap_vae(pipe)
    assert pipe.vae is original and pipe.config.vae[1] == "AutoencoderKL"


def test_a_swapped_pipeline_saves_its_original_vae_and_loads_back(pipe, tmp_path):
    reference = generate(pipe, "np")
    pipe.save_pretrained(tmp_path / "plain")
    swap_vae(pipe, AutoencoderKLDecoder.from_diffusers(pipe.vae))
    pipe.save_pretrained(tmp_path / "swapped")
    for name in ("model_index.json", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"):
        assert (tmp_path / "swapped" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()
    loaded = DiTPipeline.from_pretrained(tmp_path / "swapped")
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(generate(loaded, "np"), reference)
    swap_vae(loaded, AutoencoderKLDecoder.from_diffusers(loaded.vae))  # the swap, re-applied in one call
    assert np.abs(generate(loaded, "np") - reference).max() <= DECODER_FP32_REL


def test_swap_refuses_mismatched_decoders(pipe):
    with pytest.raises(ValueError, match="upsamples latents 8x but the pipeline expects .* 2x"):
        swap_vae(pipe, TAESDDecoder("taesd"))
    with pytest.raises(ValueError, match="4 latent channels but TAESDDecoder decodes 16"):
        swap_vae(pipe, tiny_taesd(16))
    assert not isinstance(pipe.vae, FastdecVAE) and swapped(pipe.vae) is None


def test_encode_is_the_original_vaes(pipe):
    wrapper = swap_vae(pipe, tiny_taesd())
    image = latents(1, 3, 16, 16).clamp(-1, 1)
    with torch.no_grad():
        expected = wrapper.original.encode(image).latent_dist.mean
        got = wrapper.encode(image, return_dict=False)[0].mean
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# --- the decode steps of diffusers' pipelines, replayed on the swapped VAE (diffusers 0.42.1 source) ----------------


def sd_decode_step(vae, image_processor: VaeImageProcessor, latents: torch.Tensor, output_type: str):
    """pipeline_stable_diffusion.py, StableDiffusionPipeline.__call__ after denoising (safety checker None)."""
    if not output_type == "latent":
        image = vae.decode(latents / vae.config.scaling_factor, return_dict=False, generator=None)[0]
    else:
        image = latents
    return image_processor.postprocess(image, output_type=output_type, do_denormalize=[True] * image.shape[0])


def sdxl_decode_step(vae, latents: torch.Tensor, record: list) -> torch.Tensor:
    """pipeline_stable_diffusion_xl.py, StableDiffusionXLPipeline.__call__ after denoising (upcast_vae inlined)."""
    needs_upcasting = vae.dtype == torch.float16 and vae.config.force_upcast
    if needs_upcasting:
        vae.to(dtype=torch.float32)  # upcast_vae()
        latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
    has_latents_mean = hasattr(vae.config, "latents_mean") and vae.config.latents_mean is not None
    has_latents_std = hasattr(vae.config, "latents_std") and vae.config.latents_std is not None
    if has_latents_mean and has_latents_std:
        latents_mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        latents_std = torch.tensor(vae.config.latents_std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        latents = latents * latents_std / vae.config.scaling_factor + latents_mean
    else:
        latents = latents / vae.config.scaling_factor
    image = vae.decode(latents, return_dict=False)[0]
    record.append(needs_upcasting)
    if needs_upcasting:
        vae.to(dtype=torch.float16)
    return image


def test_sd_decode_step_every_output_type():
    vae = tiny_vae()
    pipe = types.SimpleNamespace(vae=vae, vae_scale_factor=2)
    processor = VaeImageProcessor(vae_scale_factor=2)
    x = latents(2, 4, 4, 4)
    with torch.no_grad():
        reference = sd_decode_step(vae, processor, x, "np")
        swap_vae(pipe, AutoencoderKLDecoder.from_diffusers(vae))
        assert np.abs(sd_decode_step(pipe.vae, processor, x, "np") - reference).max() <= DECODER_FP32_REL
        images = sd_decode_step(pipe.vae, processor, x, "pil")
        assert [im.size for im in images] == [(8, 8), (8, 8)]
        assert torch.equal(sd_decode_step(pipe.vae, processor, x, "latent"), x)


def test_force_upcast_decodes_in_fp32_and_casts_back():
    vae = tiny_vae(force_upcast=True)
    x = latents(1, 4, 2, 2)
    with torch.no_grad():
        reference = vae.decode(x / vae.config.scaling_factor).sample
    decoder = AutoencoderKLDecoder.from_diffusers(vae)
    assert decoder.force_upcast
    pipe = types.SimpleNamespace(vae=vae.half(), vae_scale_factor=2)
    wrapper = swap_vae(pipe, decoder.half())
    assert wrapper.config.force_upcast and wrapper.dtype == torch.float16
    seen = []
    wrapper.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    record = []
    with torch.no_grad():
        image = sdxl_decode_step(wrapper, x.half(), record)
    assert record == [True] and seen == [torch.float32] and image.dtype == torch.float32
    assert wrapper.dtype == torch.float16 and all(p.dtype == torch.float16 for p in wrapper.parameters())
    # fp16 latents and weights, fp32 decode: only their rounding separates it from the fp32 VAE.
    assert torch.isfinite(image).all()
    assert (image - reference).abs().max().item() <= UPCAST_FROM_FP16_REL * reference.abs().max().item()


def test_force_upcast_follows_the_decoder_unless_told():
    vae = tiny_vae(force_upcast=True)
    assert not FastdecVAE(vae, tiny_taesd()).config.force_upcast  # TAESD decoders run in fp16
    assert FastdecVAE(vae, tiny_taesd(), force_upcast=True).config.force_upcast
    # Everything else in the config is the original's: the pipeline's vae_scale_factor and scaling stay the same.
    config = FastdecVAE(vae, tiny_taesd()).config
    assert {k: v for k, v in config.items() if k != "force_upcast"} == {
        k: v for k, v in vae.config.items() if k != "force_upcast"
    }
    fp16_taesd = FastdecVAE(vae, tiny_taesd()).half()
    record = []
    with torch.no_grad():
        sdxl_decode_step(fp16_taesd, latents(1, 4, 2, 2).half(), record)
    assert record == [False]


def test_latents_mean_and_std_are_undone():
    """SDXL's pipeline with latents_mean/std: z = x * std / s + mean; the TAESD decoder must see x itself."""
    mean, std = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0]
    vae = tiny_vae(scaling_factor=0.5, latents_mean=mean, latents_std=std)
    decoder = tiny_taesd()
    wrapper = swap_vae(types.SimpleNamespace(vae=vae, vae_scale_factor=2), decoder)
    x = latents(1, 4, 3, 3)
    with torch.no_grad():
        image = sdxl_decode_step(wrapper, x, [])
        expected = decoder(x) * 2 - 1
    torch.testing.assert_close(image, expected, **OUTPUT_ROUNDING[torch.float32])


def test_exact_decoder_of_a_latents_mean_and_std_vae():
    """The exact decoder of a Playground v2.5-style VAE: the wrapper passes z untouched and matches the VAE; a
    decoder of another convention gets the composed per-channel map."""
    vae = tiny_vae(scaling_factor=0.5, latents_mean=[0.58, 0.25, -0.2, 0.1], latents_std=[3.5, 2.0, 1.5, 4.0])
    wrapper = swap_vae(types.SimpleNamespace(vae=vae, vae_scale_factor=2), AutoencoderKLDecoder.from_diffusers(vae))
    assert wrapper.input_scale is None
    x = latents(1, 4, 3, 3)
    with torch.no_grad():
        reference = sdxl_decode_step(vae, x, [])
        assert (sdxl_decode_step(wrapper, x, []) - reference).abs().max() <= DECODER_FP32_REL * reference.abs().max()
        other_vae = tiny_vae(seed=1, scaling_factor=0.25, latents_mean=[0.0, 1.0, 2.0, 3.0],
                             latents_std=[1.0, 2.0, 3.0, 4.0])
        other = AutoencoderKLDecoder.from_diffusers(other_vae)
        mapped = swap_vae(types.SimpleNamespace(vae=vae, vae_scale_factor=2), other)
        expected = other(other.to_decoder_space(x))
        image = sdxl_decode_step(mapped, x, [])
    assert (image - expected).abs().max() <= DECODER_FP32_REL * expected.abs().max()


def test_scaling_and_shift_map_to_the_decoders_convention():
    """FLUX.1/SD3-style config (z = x / s + t) into a decoder with another convention (x / s_d + t_d)."""
    vae = tiny_vae(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, norm_num_groups=16)
    decoder = AutoencoderKLDecoder(latent_channels=16, block_out_channels=(32, 64), norm_num_groups=16,
                                   layers_per_block=1, scaling_factor=1.5305, shift_factor=0.0609).eval()
    wrapper = swap_vae(types.SimpleNamespace(vae=vae, vae_scale_factor=2), decoder)
    x = latents(1, 16, 3, 3)
    with torch.no_grad():
        image = wrapper.decode((x / 0.3611) + 0.1159, return_dict=False)[0]
        expected = decoder(x / 1.5305 + 0.0609)
    # The decoder's input is rounded differently (one affine map vs two), then goes through dozens of layers.
    assert torch.isfinite(image).all()
    assert (image - expected).abs().max().item() <= DECODER_FP32_REL * expected.abs().max().item()


def test_same_convention_passes_z_untouched():
    vae = tiny_vae()
    wrapper = FastdecVAE(vae, AutoencoderKLDecoder.from_diffusers(vae))
    assert wrapper.input_scale is None and wrapper.input_offset is None
    # An AutoencoderTiny (scaling 1, no shift) swapped for a TAESD decoder: the identity too.
    assert FastdecVAE(AutoencoderTiny(latent_channels=4), tiny_taesd()).input_scale is None


def test_flux2_decode_step_with_taef2():
    """pipeline_flux2.py: the pipeline undoes its BatchNorm on vae.bn and passes raw VAE latents, taef2's input."""
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                             latent_channels=32).eval()
    vae.bn.running_mean.normal_()
    decoder = TAESDDecoder("taef2", blocks=(1, 1, 1, 1)).eval()
    wrapper = swap_vae(types.SimpleNamespace(vae=vae, vae_scale_factor=8), decoder)
    packed = latents(1, 128, 2, 2)
    with torch.no_grad():
        mean = wrapper.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(wrapper.bn.running_var.view(1, -1, 1, 1) + wrapper.config.batch_norm_eps)
        raw = torch.nn.functional.pixel_shuffle(packed * std + mean, 2)  # _unpatchify_latents
        image = wrapper.decode(raw, return_dict=False)[0]
        expected = decoder(raw) * 2 - 1
    assert image.shape == (1, 3, 32, 32)
    torch.testing.assert_close(image, expected, rtol=0, atol=0)
    with pytest.raises(AttributeError, match="'bn'"):
        _ = FastdecVAE(tiny_vae(), tiny_taesd()).bn


def test_swap_by_name_loads_on_the_vaes_device_and_dtype(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FASTDEC_HOME", str(tmp_path))
    torch.save(TAESDDecoder("taesd").state_dict(), tmp_path / "taesd_decoder.pth")
    vae = tiny_vae(block_out_channels=(8, 8, 8, 8), norm_num_groups=4,
                   down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    wrapper = swap_vae(types.SimpleNamespace(vae=vae.double()), "taesd")  # no vae_scale_factor: from the config
    assert isinstance(wrapper.decoder, TAESDDecoder) and wrapper.dtype == torch.float64
    images = wrapper.decode(latents(1, 4, 2, 2)).sample
    assert images.shape == (1, 3, 16, 16) and images.dtype == torch.float64


def test_decoder_output_kinds_and_bad_input():
    wrapper = FastdecVAE(tiny_vae(), tiny_taesd())
    x = latents(1, 4, 2, 2)
    with torch.no_grad():
        assert torch.equal(wrapper.decode(x).sample, wrapper.decode(x, return_dict=False)[0])
        assert torch.equal(wrapper(x), wrapper.decode(x, return_dict=False)[0])
    with pytest.raises(ValueError, match="\\(B, C, h, w\\)"):
        wrapper.decode(x[0])
    with pytest.raises(ValueError, match="no VAE"):
        swap_vae(types.SimpleNamespace(vae=None), tiny_taesd())


# --- the real pipelines, where transformers is installed -------------------------------------------------------------


@pytest.fixture
def transformers():
    return pytest.importorskip("transformers", reason="diffusers' StableDiffusion pipelines import transformers")


def tiny_sd_unet(**config):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=8, attention_head_dim=4, **config,
    ).eval()


def test_stable_diffusion_pipeline(transformers):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=tiny_sd_unet(), scheduler=DDIMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)

    def run(output_type):
        return pipe(prompt_embeds=latents(1, 5, 16), guidance_scale=1.0, num_inference_steps=2, height=16,
                    width=16, output_type=output_type, generator=torch.Generator().manual_seed(0)).images

    reference, reference_latents = run("np"), run("latent")
    swap_vae(pipe, AutoencoderKLDecoder.from_diffusers(pipe.vae))
    assert np.abs(run("np") - reference).max() <= DECODER_FP32_REL
    assert run("pil")[0].size == (16, 16)
    assert torch.equal(run("latent"), reference_latents)
    # The pipeline's own switches: its VAE is still an AutoencoderKL, so fuse_qkv_projections accepts it, and
    # enable_vae_tiling / enable_vae_slicing select fastdec's exact slabs and per-sample decoding.
    assert isinstance(pipe.vae, AutoencoderKL)
    pipe.fuse_qkv_projections()
    assert np.abs(run("np") - reference).max() <= DECODER_FP32_REL
    pipe.unfuse_qkv_projections()
    pipe.vae.enable_tiling()
    pipe.vae.enable_slicing()
    pipe.vae.tile_sample_min_size = 12  # 144 pixels a tile: slabs of 8 whole rows of a 16x16 image
    assert swapped(pipe.vae).tile_size_for(torch.zeros(1, 4, 8, 8)) == 8
    assert np.abs(run("np") - reference).max() <= DECODER_FP32_REL


def test_stable_diffusion_xl_pipeline_fp16_vae_upcasts(transformers):
    from diffusers import StableDiffusionXLPipeline

    unet = tiny_sd_unet(addition_embed_type="text_time", addition_time_embed_dim=8,
                        projection_class_embeddings_input_dim=6 * 8 + 16, use_linear_projection=True)
    vae = tiny_vae(force_upcast=True)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=unet,
        scheduler=DDIMScheduler(), add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(prompt_embeds=latents(1, 5, 16), pooled_prompt_embeds=latents(1, 16, seed=1), guidance_scale=1.0,
                    num_inference_steps=2, height=16, width=16, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    reference = run()
    vae.half()  # the pipeline's VAE in fp16: swap_vae puts the decoder in the VAE's dtype
    wrapper = swap_vae(pipe, AutoencoderKLDecoder.from_diffusers(vae).half())
    seen = []
    wrapper.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    images = run()
    assert seen == [torch.float32] and wrapper.dtype == torch.float16
    assert np.isfinite(images).all() and np.abs(images - reference).max() <= UPCAST_FROM_FP16_REL
