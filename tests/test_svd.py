"""SVDDecoder against diffusers.AutoencoderKLTemporalDecoder (random weights, fp32): per-frame and clip entries, the
fused ops (interpreter) and their references, loading (instance, folder, pipeline folder, Hub id, strict), decode()'s
latent convention and decode_chunk_size, bad input, torch.compile, and swap_vae in a tiny StableVideoDiffusionPipeline.
"""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLTemporalDecoder
from helpers import compile_fullgraph, edit_weights, fused_vs_reference_error, jitter, needs_interpreter, relative_error
from safetensors.torch import load_file
from tolerances import DECODER_FP32_REL
from torch import nn

import fastdec
from fastdec import ops
from fastdec.models.autoencoder_kl import SelfAttention
from fastdec.models.svd import SVDDecoder

# Two levels (one upsampler), layers_per_block 2: the mid-block runs resnet, attention, resnet.
TINY = dict(block_out_channels=(32, 64), layers_per_block=2)


def diffusers_svd_vae(seed: int = 0, **config) -> AutoencoderKLTemporalDecoder:
    """A tiny AutoencoderKLTemporalDecoder with random weights, norm affines and mix factors included."""
    torch.manual_seed(seed)
    config = {**TINY, **config}
    levels = len(config["block_out_channels"])
    vae = AutoencoderKLTemporalDecoder(down_block_types=("DownEncoderBlock2D",) * levels, **config).eval()
    return jitter(vae, lambda name: "norm" in name or "mix_factor" in name)  # diffusers initialises them to 1, 0 and 0


def latents(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def vae() -> AutoencoderKLTemporalDecoder:
    return diffusers_svd_vae()


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize(("batch", "frames", "layers_per_block"), [(2, 3, 2), (1, 1, 2), (1, 4, 1)])
def test_matches_diffusers(batch, frames, layers_per_block, memory_format):
    """Per-frame entry, reference ops (the fused path: next test). layers_per_block 1: diffusers' mid-block holds an
    attention it never runs; the same parameters load and the same output comes out."""
    vae = diffusers_svd_vae(layers_per_block=layers_per_block)
    model = SVDDecoder.from_diffusers(vae)
    z = latents(batch * frames, 4, 6, 5, seed=1)
    with torch.no_grad(), ops.reference_ops():
        ref = vae.decode(z, num_frames=frames).sample
        out = model.decode_frames(z.contiguous(memory_format=memory_format), frames)
    assert out.shape == ref.shape == (batch * frames, 3, 12, 10)
    assert relative_error(out, ref) <= DECODER_FP32_REL
    assert out.is_contiguous(memory_format=memory_format)


@needs_interpreter("group_norm_act", "attention")
def test_fused_ops_match_diffusers_and_the_reference_ops(vae, triton_launches):
    model = SVDDecoder.from_diffusers(vae)
    z = latents(1, 4, 2, 4, 4, seed=2)  # (B, C, T, h, w)
    expected = {"group_norm_act_triton": sum(isinstance(m, nn.GroupNorm) for m in model.modules()),
                "attention_triton": sum(isinstance(m, SelfAttention) for m in model.modules())}
    assert fused_vs_reference_error(model, z, triton_launches, expected) <= DECODER_FP32_REL
    with torch.no_grad():
        ref = vae.decode(z.transpose(1, 2).flatten(0, 1), num_frames=2).sample
        assert relative_error(model(z).flatten(0, 1), ref) <= DECODER_FP32_REL


def test_full_width_svd_architecture_has_diffusers_names_and_shapes():
    with torch.device("meta"):
        model = SVDDecoder()
        vae = AutoencoderKLTemporalDecoder(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4
        )
    expected = {k: v.shape for k, v in vae.state_dict().items() if k.startswith("decoder.")}
    assert {k: v.shape for k, v in model.state_dict().items()} == expected
    assert (model.scaling_factor, model.force_upcast, model.latent_ndim) == (0.18215, True, 5)


def test_decode_takes_diffusion_latents_and_chunks_like_the_pipeline(vae):
    """decode((B, C, T, h, w) diffusion latents) -> (B, T, 3, H, W) in [0, 1]; decode_chunk_size n decodes chunks of n
    frames as separate clips, as StableVideoDiffusionPipeline.decode_latents does."""
    model = SVDDecoder.from_diffusers(vae)
    x = latents(1, 4, 5, 4, 4, seed=3) * 2
    per_frame = x.transpose(1, 2).flatten(0, 1) / 0.18215
    with torch.no_grad(), ops.reference_ops():
        whole = model.decode(x)
        chunked = model.decode(x, decode_chunk_size=2)
        expected_whole = vae.decode(per_frame, num_frames=5).sample
        expected_chunked = torch.cat([vae.decode(c, num_frames=len(c)).sample for c in per_frame.split(2)])
    assert whole.shape == (1, 5, 3, 8, 8) and whole.min() >= 0 and whole.max() <= 1
    for out, ref in ((whole, expected_whole), (chunked, expected_chunked)):
        torch.testing.assert_close(out[0], (ref * 0.5 + 0.5).clamp(0, 1), rtol=0, atol=2 * DECODER_FP32_REL)
    assert (whole - chunked).abs().max() > 1e-3, "chunk borders see no neighbours: the two must differ"


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda m: m.decode_frames(latents(7, 4, 4, 4), 3), ValueError, "7 latent frames are not whole clips"),
        (lambda m: m.decode_frames(latents(3, 4, 4, 4), 0), ValueError, "num_frames must be a positive int"),
        (lambda m: m.decode_frames(latents(1, 4, 3, 4, 4), 3), ValueError, r"per-frame latents \(B\*T, 4, h, w\)"),
        (lambda m: m(latents(3, 4, 4, 4)), ValueError, r"video latents \(B, 4, T, h, w\)"),
        (lambda m: m.decode(latents(3, 4, 4, 4)), ValueError, "add the time axis"),
        (lambda m: m.decode(latents(1, 16, 2, 4, 4)), ValueError, "16 channels but SVDDecoder expects 4"),
        (lambda m: m.decode(latents(1, 4, 0, 4, 4)), ValueError, "time is 0"),
        (lambda m: m.decode(latents(1, 4, 2, 4, 4) * float("nan")), ValueError, "NaN"),
        (lambda m: m.decode(latents(1, 4, 2, 4, 4), decode_chunk_size=0), ValueError, "decode_chunk_size"),
    ],
)
def test_bad_input_gets_a_clear_error(vae, call, error, message):
    with pytest.raises(error, match=message):
        call(SVDDecoder.from_diffusers(vae))


def test_compiles_to_one_graph():
    """One level, one layer per block: the smallest SVD graph (the mid-block attention's compile: tae-temporal)."""
    model = SVDDecoder.from_diffusers(diffusers_svd_vae(block_out_channels=(32,), layers_per_block=1))
    with torch.no_grad(), ops.reference_ops():  # dynamo sees the custom ops, whichever backend runs them
        assert relative_error(*compile_fullgraph(model, latents(1, 4, 3, 4, 4))) <= DECODER_FP32_REL
    torch._dynamo.reset()


# --- loading -----------------------------------------------------------------------------------------------------


@pytest.fixture
def vae_folder(tmp_path, vae):
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    return tmp_path / "vae"


def check_same_decoder(model, vae) -> None:
    z = latents(2, 4, 4, 4, seed=4)
    with torch.no_grad(), ops.reference_ops():
        assert relative_error(model.decode_frames(z, 2), vae.decode(z, num_frames=2).sample) <= DECODER_FP32_REL


def test_loads_from_an_instance_a_folder_and_a_pipeline_folder(vae, vae_folder):
    check_same_decoder(fastdec.load(vae), vae)
    model = fastdec.load(vae_folder)
    assert isinstance(model, SVDDecoder) and set(model.state_dict()) == {
        k for k in load_file(str(vae_folder / "diffusion_pytorch_model.safetensors")) if k.startswith("decoder.")
    }
    check_same_decoder(model, vae)
    check_same_decoder(fastdec.load(vae_folder.parent), vae)  # a pipeline folder: its vae/ subfolder


def test_loads_from_a_hub_id(offline, vae, vae_folder, monkeypatch):
    import huggingface_hub

    def fake_download(repo_id, filename, subfolder=None, **kwargs):
        assert (repo_id, subfolder) == ("stabilityai/stable-video-diffusion-img2vid-xt", "vae"), (repo_id, subfolder)
        return str(vae_folder / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    check_same_decoder(fastdec.load("stabilityai/stable-video-diffusion-img2vid-xt/vae"), vae)
    check_same_decoder(fastdec.load("svd"), vae)


@pytest.mark.parametrize(
    ("edit", "named_key"),
    [
        (lambda s: s.pop("decoder.time_conv_out.bias"), "decoder.time_conv_out.bias"),
        (lambda s: s.pop("decoder.mid_block.resnets.0.time_mixer.mix_factor"), "time_mixer.mix_factor"),
        (lambda s: s.update({"decoder.extra.weight": torch.zeros(1)}), "decoder.extra.weight"),
    ],
    ids=["missing", "missing_mix_factor", "unexpected"],
)
def test_strict_loading_names_the_bad_key(vae_folder, edit, named_key):
    edit_weights(vae_folder, edit)
    with pytest.raises(ValueError, match=named_key.replace(".", r"\.")):
        fastdec.load(vae_folder)


def test_save_and_load_round_trip(vae, tmp_path):
    model = SVDDecoder.from_diffusers(vae)
    model.save_pretrained(tmp_path)
    loaded = fastdec.load(tmp_path)
    assert isinstance(loaded, SVDDecoder) and loaded.config == model.config
    z = latents(1, 4, 2, 4, 4)
    with torch.no_grad(), ops.reference_ops():
        assert torch.equal(loaded(z), model(z))


# --- swap_vae in StableVideoDiffusionPipeline ------------------------------------------------------------------


@pytest.fixture(scope="module")
def svd_pipeline():
    """A tiny, randomly initialised StableVideoDiffusionPipeline (two-level VAE: vae_scale_factor 2), built offline."""
    transformers = pytest.importorskip("transformers")
    from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline, UNetSpatioTemporalConditionModel

    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=8, out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), cross_attention_dim=32,
        num_attention_heads=8, projection_class_embeddings_input_dim=96, addition_time_embed_dim=32,
    )
    encoder = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=1, num_attention_heads=4, image_size=224,
        intermediate_size=37, patch_size=14,  # the pipeline resizes its image to 224 for CLIP
    ))
    scheduler = EulerDiscreteScheduler(prediction_type="v_prediction", use_karras_sigmas=True, sigma_max=700.0,
                                       sigma_min=0.002, timestep_type="continuous")
    pipe = StableVideoDiffusionPipeline(
        vae=diffusers_svd_vae(layers_per_block=1), image_encoder=encoder.eval(), unet=unet.eval(),
        scheduler=scheduler, feature_extractor=transformers.CLIPImageProcessor(crop_size=32, size=32),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, output_type: str):
    from PIL import Image

    image = Image.fromarray((np.random.RandomState(0).rand(16, 16, 3) * 255).astype(np.uint8))
    return pipe(image, height=16, width=16, num_frames=3, num_inference_steps=1, decode_chunk_size=2,
                output_type=output_type, generator=torch.Generator().manual_seed(0)).frames


def test_swap_into_stable_video_diffusion_pipeline(svd_pipeline):
    from PIL import Image

    from fastdec.diffusers import swap_vae, unswap_vae

    pipe = svd_pipeline
    original = pipe.vae
    try:
        reference = generate(pipe, "np")
        wrapper = swap_vae(pipe, fastdec.load(original))
        with ops.reference_ops():  # the kernels are checked above; this checks the pipeline's data flow
            frames = generate(pipe, "np")
            pils = generate(pipe, "pil")
        assert isinstance(wrapper.decoder, SVDDecoder) and frames.shape == reference.shape == (1, 3, 16, 16, 3)
        assert np.abs(frames - reference).max() <= DECODER_FP32_REL
        assert len(pils) == 1 and len(pils[0]) == 3 and all(isinstance(f, Image.Image) for f in pils[0])
        latent = generate(pipe, "latent")  # (B, T, C, h, w): the SVD pipeline's layout
        assert latent.shape == (1, 3, 4, 8, 8)
        # They decode through the fastdec API to the pipeline's frames: transpose to (B, C, T, h, w).
        with torch.no_grad(), ops.reference_ops():
            decoded = wrapper.decoder.decode(latent.transpose(1, 2), decode_chunk_size=2)
        np.testing.assert_allclose(decoded.permute(0, 1, 3, 4, 2).numpy(), reference, rtol=0,
                                   atol=2 * DECODER_FP32_REL)
    finally:
        pipe.vae = original
        unswap_vae(pipe)


def test_per_frame_decoders_need_num_frames(vae):
    from fastdec.diffusers import FastdecVAE

    wrapper = FastdecVAE(vae, SVDDecoder.from_diffusers(vae))
    with pytest.raises(ValueError, match="pass num_frames"):
        wrapper.decode(latents(2, 4, 4, 4))
    with torch.no_grad(), ops.reference_ops():
        out = wrapper.decode(latents(4, 4, 4, 4), num_frames=2).sample
        assert relative_error(out, vae.decode(latents(4, 4, 4, 4), num_frames=2).sample) <= DECODER_FP32_REL


@torch.no_grad()
def test_no_up_block_input_outlives_its_first_layer():
    """At 14 frames of 576x1024 the last up block's input is 4 GiB and each clip-layout copy 2 GiB; the H200 run
    peaked at 16 GiB, as diffusers. The decoder runs layer by layer (each resnet as its spatial and temporal halves),
    so a block's input is freed once the spatial half of its first resnet has run."""
    model = SVDDecoder(block_out_channels=(32, 32), layers_per_block=1).eval()
    first = model.decoder.up_blocks[-1].resnets[0]
    block_input, alive_in_temporal_half = {}, []
    first.spatial_res_block.register_forward_pre_hook(lambda module, args: block_input.update(x=weakref.ref(args[0])))
    first.temporal_res_block.conv1.register_forward_pre_hook(
        lambda module, args: alive_in_temporal_half.append(block_input["x"]() is not None))
    model.decode(torch.randn(1, 4, 2, 4, 4), check_finite=False)
    assert alive_in_temporal_half == [False]
