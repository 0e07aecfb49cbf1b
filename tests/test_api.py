"""fastdec.load (every kind of source, names offline, FASTDEC_HOME, the real taef2 weights, broken files) and
fastdec.decode (shapes, dtypes, output kinds, default decoders and their cache, every bad input)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from helpers import latents
from PIL import Image
from tolerances import DECODER_FP32_REL, OUTPUT_ROUNDING

import fastdec
from fastdec import api
from fastdec.models.autoencoder_kl import AutoencoderKLDecoder
from fastdec.models.dcae import DCAEDecoder
from fastdec.models.taesd import TAESDDecoder, TAESDEncoder

SHARED_TAEF2 = Path(__file__).resolve().parents[1].parent / "shared" / "weights" / "taef2"
# A TAESD decoder with one block per stage and two stages: x2 upsampling, cheap enough for every decode test.
TINY_TAESD = dict(variant="taesd", blocks=(1, 1))


pytestmark = pytest.mark.usefixtures("offline")  # tests/conftest.py: no network, empty caches


def tiny_autoencoder_kl(latent_channels: int = 4, seed: int = 0, **config) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=1, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, **config,
    ).eval()


def tiny_autoencoder_tiny(seed: int = 0) -> AutoencoderTiny:
    torch.manual_seed(seed)
    return AutoencoderTiny(
        encoder_block_out_channels=(16, 16), decoder_block_out_channels=(16, 16), num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1), latent_channels=4,
    ).eval()


def tiny_taesd(seed: int = 0, **config) -> TAESDDecoder:
    torch.manual_seed(seed)
    return TAESDDecoder(**{**TINY_TAESD, **config}).eval()


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key].float(), state_b[key].float()), key


# --- load: modules ----------------------------------------------------------------------------------------------------


def test_load_decoder_module_is_moved_and_cast_in_place():
    decoder = tiny_taesd()
    loaded = fastdec.load(decoder, dtype=torch.float64)
    assert loaded is decoder
    assert all(p.dtype == torch.float64 for p in decoder.parameters())
    with pytest.raises(TypeError, match="random presets"):
        fastdec.load(decoder, latent_channels=16)


def test_load_diffusers_autoencoder_kl_decodes_like_diffusers():
    vae = tiny_autoencoder_kl()
    decoder = fastdec.load(vae)
    assert isinstance(decoder, AutoencoderKLDecoder)
    assert (decoder.latent_channels, decoder.scaling_factor, decoder.shift_factor) == (4, 0.18215, 0.0)
    x = latents(1, 4, 4, 4)
    with torch.no_grad():
        expected = (vae.decode(x / vae.config.scaling_factor).sample * 0.5 + 0.5).clamp(0, 1)
    got = fastdec.decode(x, decoder)
    assert torch.isfinite(got).all()
    assert (got - expected).abs().max().item() <= DECODER_FP32_REL


def test_load_diffusers_module_keeps_its_dtype_unless_told():
    vae = tiny_autoencoder_kl().to(torch.float64)
    assert next(fastdec.load(vae).parameters()).dtype == torch.float64
    assert next(fastdec.load(vae, dtype=torch.float32).parameters()).dtype == torch.float32


def test_load_diffusers_autoencoder_tiny_decodes_like_diffusers():
    vae = tiny_autoencoder_tiny()
    decoder = fastdec.load(vae)
    assert isinstance(decoder, TAESDDecoder) and decoder.config["variant"] == "taesd"
    x = latents(2, 4, 4, 4)
    with torch.no_grad():
        expected = (vae.decode(x).sample * 0.5 + 0.5).clamp(0, 1)  # AutoencoderTiny decodes to [-1, 1]
    got = fastdec.decode(x, decoder)
    torch.testing.assert_close(got, expected, rtol=DECODER_FP32_REL, atol=DECODER_FP32_REL)


def test_load_rejects_other_modules_and_objects():
    every_vae = ("AutoencoderKL / AutoencoderKLFlux2 / AutoencoderDC / AutoencoderKLWan / AutoencoderKLQwenImage / "
                 "AutoencoderKLTemporalDecoder / AutoencoderTiny")
    with pytest.raises(TypeError, match=every_vae):
        fastdec.load(torch.nn.Conv2d(4, 4, 1))
    with pytest.raises(TypeError, match="a name, a path"):
        fastdec.load(42)
    with pytest.raises(FileNotFoundError, match="neither an existing path, a Hub repo id"):
        fastdec.load("no-such-decoder")


def test_load_names_a_missing_file_and_suggests_a_close_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for missing in ("weights/taef2_decoder.pth", "./taef2_decoder.pth", str(tmp_path / "a" / "decoder.safetensors")):
        with pytest.raises(FileNotFoundError, match="^no such file or folder: ") as error:
            fastdec.load(missing)
        assert "Hub" not in str(error.value) and "names:" not in str(error.value)
    assert "relative to the working directory" in str(pytest.raises(FileNotFoundError, fastdec.load, "x.pth").value)
    with pytest.raises(FileNotFoundError, match="did you mean 'efficientvit-taef2'") as error:
        fastdec.load("efficientvit-taef")
    assert "names:" not in str(error.value)


# --- load: folders and files ------------------------------------------------------------------------------------------


def test_load_fastdec_saved_folder(tmp_path):
    decoder = tiny_taesd(seed=1)
    decoder.save_pretrained(tmp_path / "saved")
    loaded = fastdec.load(tmp_path / "saved")
    assert isinstance(loaded, TAESDDecoder) and loaded.config == decoder.config
    assert_same_weights(loaded, decoder)
    torch.manual_seed(0)
    other = DCAEDecoder(latent_channels=4, block_out_channels=(16, 16, 32), layers_per_block=(0, 1, 0),
                        qkv_multiscales=((),) * 3).eval()
    other.save_pretrained(tmp_path / "efficientvit")
    assert_same_weights(fastdec.load(str(tmp_path / "efficientvit")), other)


def test_load_folder_of_unknown_class(tmp_path):
    tiny_taesd().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"class": "NotADecoder"}))
    with pytest.raises(ValueError, match="unknown decoder class 'NotADecoder'"):
        fastdec.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="UNet2DModel"):
        fastdec.load(tmp_path)


def test_load_diffusers_folders_and_pipeline_folder(tmp_path):
    vae = tiny_autoencoder_kl(seed=2)
    vae.save_pretrained(tmp_path / "vae_kl")
    assert_same_weights(fastdec.load(tmp_path / "vae_kl"), AutoencoderKLDecoder.from_diffusers(vae))
    tiny = tiny_autoencoder_tiny(seed=3)
    tiny.save_pretrained(tmp_path / "taesdxl")  # the folder's name gives the variant
    loaded = fastdec.load(tmp_path / "taesdxl")
    assert loaded.config["variant"] == "taesdxl"
    assert_same_weights(loaded, TAESDDecoder.from_diffusers(tiny, "taesdxl"))
    # A pipeline folder: model_index.json and one folder per component; load() reads vae/.
    vae.save_pretrained(tmp_path / "pipeline" / "vae")
    (tmp_path / "pipeline" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert_same_weights(fastdec.load(tmp_path / "pipeline"), AutoencoderKLDecoder.from_diffusers(vae))
    # The weights file itself, next to its config.json, means its folder.
    assert isinstance(fastdec.load(tmp_path / "vae_kl" / "diffusion_pytorch_model.safetensors"), AutoencoderKLDecoder)


def test_load_madebyollin_pth_variant_from_name_or_weights(tmp_path):
    taesdxl = tiny_taesd(variant="taesdxl", blocks=None)
    torch.save(taesdxl.state_dict(), tmp_path / "taesdxl_decoder.pth")
    loaded = fastdec.load(tmp_path / "taesdxl_decoder.pth")
    assert loaded.config["variant"] == "taesdxl"
    assert_same_weights(loaded, taesdxl)
    # No variant in the file name: 32 channels with the GroupNorm branch is taef2, 16 channels taef1.
    for variant in ("taef2", "taef1"):
        state = TAESDDecoder(variant).state_dict()
        torch.save({k: v.half() for k, v in state.items()}, tmp_path / "weights.pth")  # madebyollin's are fp16
        loaded = fastdec.load(tmp_path / "weights.pth")
        assert loaded.config["variant"] == variant and next(loaded.parameters()).dtype == torch.float32
    torch.save(TAESDEncoder("taesd").state_dict(), tmp_path / "taesd_encoder.pth")
    with pytest.raises(ValueError, match="not a TAESD decoder"):
        fastdec.load(tmp_path / "taesd_encoder.pth")
    (tmp_path / "model.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="load\\(\\) reads folders"):
        fastdec.load(tmp_path / "model.ckpt")


def test_config_overrides_only_for_random_presets(tmp_path):
    tiny_taesd().save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="fixes its architecture"):
        fastdec.load(tmp_path, latent_channels=16)
    with pytest.raises(TypeError, match="fixes its architecture"):
        fastdec.load("taesd", width=32)


# --- load: broken and missing files -----------------------------------------------------------------------------------


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_safetensors_say_which_file_and_to_redownload(tmp_path):
    tiny_taesd().save_pretrained(tmp_path / "saved")
    truncate(tmp_path / "saved" / "model.safetensors")
    with pytest.raises(ValueError, match="re-download it") as error:
        fastdec.load(tmp_path / "saved")
    assert str(tmp_path / "saved") in str(error.value)
    tiny_autoencoder_kl().save_pretrained(tmp_path / "vae")
    truncate(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match="re-download it"):
        fastdec.load(tmp_path / "vae")


def test_truncated_pth_says_which_file_and_to_download_again(tmp_path):
    path = tmp_path / "taesd_decoder.pth"
    torch.save(tiny_taesd(blocks=None).state_dict(), path)
    truncate(path)
    with pytest.raises(ValueError, match="download it again") as error:
        fastdec.load(path)
    assert str(path) in str(error.value)
    # No variant in the name: the weights are read to find it, with the same message.
    path.rename(tmp_path / "weights.pth")
    with pytest.raises(ValueError, match="download it again"):
        fastdec.load(tmp_path / "weights.pth")


def test_missing_weights_and_config(tmp_path):
    tiny_taesd().save_pretrained(tmp_path / "saved")
    (tmp_path / "saved" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        fastdec.load(tmp_path / "saved")
    tiny_autoencoder_kl().save_pretrained(tmp_path / "vae")
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model"):
        fastdec.load(tmp_path / "vae")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        fastdec.load(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        fastdec.load(tmp_path / "empty")


# --- load: names ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, repo",
    [
        ("taesd", "madebyollin/taesd"),
        ("taesdxl", "madebyollin/taesdxl"),
        ("taesd3", "madebyollin/taesd3"),
        ("taef1", "madebyollin/taef1"),
        ("sd", "stabilityai/sd-vae-ft-mse"),
        ("sd2", "stabilityai/sd-vae-ft-mse"),
        ("sdxl", "stabilityai/sdxl-vae"),
        ("sd3", "stabilityai/stable-diffusion-3-medium-diffusers"),
        ("flux1", "black-forest-labs/FLUX.1-schnell"),
    ],
)
def test_names_offline_and_uncached_say_what_to_fetch_and_where(offline, name, repo):
    with pytest.raises(FileNotFoundError) as error:
        fastdec.load(name)
    message = str(error.value)
    canonical = api.ALIASES.get(name, name)
    for expected in (f"https://huggingface.co/{repo}", "diffusion_pytorch_model.safetensors", "config.json",
                     str(offline / canonical), "HF_HUB_OFFLINE", "pass a path"):
        assert expected in message, (expected, message)


def test_taef2_name_points_to_github(offline):
    with pytest.raises(FileNotFoundError) as error:
        fastdec.load("taef2")
    message = str(error.value)
    assert "https://github.com/madebyollin/taesd/raw/main/taef2_decoder.pth" in message
    assert str(offline) in message and "pass its path" in message


def test_names_found_in_fastdec_home(offline):
    taesd = tiny_taesd(variant="taesd", blocks=None, seed=4)
    torch.save(taesd.state_dict(), offline / "taesd_decoder.pth")
    loaded = fastdec.load("TAESD", dtype=torch.float64)
    assert loaded.config["variant"] == "taesd" and next(loaded.parameters()).dtype == torch.float64
    assert_same_weights(loaded, taesd)
    vae = tiny_autoencoder_kl(seed=5)
    vae.save_pretrained(offline / "sd")  # a diffusers VAE folder named after the name
    assert_same_weights(fastdec.load("sd1"), AutoencoderKLDecoder.from_diffusers(vae))
    tiny = tiny_autoencoder_tiny(seed=6)
    tiny.save_pretrained(offline / "taesdxl")
    assert fastdec.load("taesdxl").config["variant"] == "taesdxl"


def test_existing_path_wins_over_name(tmp_path, monkeypatch):
    tiny_taesd(seed=7).save_pretrained(tmp_path / "taesd")
    monkeypatch.chdir(tmp_path)
    assert_same_weights(fastdec.load("taesd"), tiny_taesd(seed=7))


@pytest.mark.parametrize("name", api.RANDOM_PRESETS)
def test_random_presets_warn_and_take_overrides(name):
    with pytest.warns(api.RandomWeightsWarning, match="random weights.*save_pretrained"):
        decoder = fastdec.load(name, device="meta", latent_channels=16)
    assert decoder.latent_channels == 16 and next(decoder.parameters()).device.type == "meta"


def test_random_preset_decodes():
    with pytest.warns(api.RandomWeightsWarning):
        decoder = fastdec.load("tae-192", blocks=(1, 1), width=16)
    out = fastdec.decode(latents(4, 3, 5), decoder)
    assert out.shape == (3, 6, 10) and torch.isfinite(out).all()


# --- the real TAEF2 weights -------------------------------------------------------------------------------------------


@pytest.fixture
def taef2_path() -> Path:
    path = SHARED_TAEF2 / "taef2_decoder.pth"
    if not path.is_file():
        pytest.skip(f"{path} absent (shared/ weights not available here)")
    return path


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return (10 * torch.log10(1 / ((a.double() - b.double()) ** 2).mean())).item()


def test_real_taef2_by_path_and_by_name(taef2_path, offline):
    by_path = fastdec.load(taef2_path)
    assert isinstance(by_path, TAESDDecoder) and by_path.config["variant"] == "taef2"
    assert (by_path.latent_channels, by_path.scaling_factor, by_path.shift_factor) == (32, 1.0, 0.0)
    os.symlink(taef2_path, offline / "taef2_decoder.pth")
    by_name = fastdec.load("taef2")
    assert_same_weights(by_name, by_path)
    # A real photo through the real encoder and back: 22.2 dB measured at 64x64 (25.8 at 128x128; 31.2 at full size
    # per shared/README.md). A flat grey image scores about 10 dB against it.
    skimage_data = pytest.importorskip("skimage.data")
    image = torch.from_numpy(skimage_data.astronaut()).permute(2, 0, 1)[None].float() / 255
    image = torch.nn.functional.interpolate(image, size=(64, 64), mode="area")
    with torch.no_grad():
        encoded = TAESDEncoder.from_pth(taef2_path.with_name("taef2_encoder.pth"), "taef2").encode(image)
    decoded = fastdec.decode(encoded)  # the default decoder for 32 channels: taef2, found in FASTDEC_HOME
    assert decoded.shape == image.shape and psnr(decoded, image) > 20


# --- decode -----------------------------------------------------------------------------------------------------------


@pytest.fixture
def decoder() -> TAESDDecoder:
    return tiny_taesd()


def test_decode_batched_and_unbatched_every_output_kind(decoder):
    batch = latents(2, 4, 3, 5)
    images = fastdec.decode(batch, decoder)
    assert images.shape == (2, 3, 6, 10) and images.dtype == torch.float32
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    with torch.no_grad():
        torch.testing.assert_close(images, decoder.decode(batch), rtol=0, atol=0)
    pixels = fastdec.decode(batch, decoder, output="uint8")
    assert pixels.shape == (2, 6, 10, 3) and pixels.dtype == torch.uint8
    assert torch.equal(pixels, (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1))
    pil = fastdec.decode(batch, decoder, output="pil")
    assert isinstance(pil, list) and len(pil) == 2
    assert all(isinstance(im, Image.Image) and im.size == (10, 6) and im.mode == "RGB" for im in pil)
    assert np.array_equal(np.asarray(pil[1]), pixels[1].numpy())
    # Unbatched: one image of each kind, equal to the first of a batch of one.
    single = fastdec.decode(batch[0], decoder)
    assert single.shape == (3, 6, 10)
    torch.testing.assert_close(single, images[0], **OUTPUT_ROUNDING[torch.float32])  # conv sums vary with batch
    single_pixels = fastdec.decode(batch[0], decoder, output="uint8")
    assert torch.equal(single_pixels, (single * 255).round().to(torch.uint8).permute(1, 2, 0))
    image = fastdec.decode(batch[0], decoder, output="pil")
    assert isinstance(image, Image.Image) and np.array_equal(np.asarray(image), single_pixels.numpy())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_decode_casts_latents_to_the_decoders_dtype(decoder, dtype):
    x = latents(1, 4, 3, 3, dtype=dtype)
    out = fastdec.decode(x, decoder)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, fastdec.decode(x.float(), decoder), rtol=0, atol=0)


def test_decode_with_a_name_a_path_and_a_diffusers_module(offline, decoder, tmp_path):
    torch.save(tiny_taesd(blocks=None).state_dict(), offline / "taesd_decoder.pth")
    x = latents(4, 2, 2)
    assert fastdec.decode(x, "taesd").shape == (3, 16, 16)
    decoder.save_pretrained(tmp_path / "saved")
    torch.testing.assert_close(fastdec.decode(x, str(tmp_path / "saved")), fastdec.decode(x, decoder))
    vae = tiny_autoencoder_tiny()
    torch.testing.assert_close(fastdec.decode(x, vae), fastdec.decode(x, fastdec.load(vae)))


def test_default_decoder_by_channel_count_is_loaded_once(offline, monkeypatch):
    torch.save(tiny_taesd(blocks=None).state_dict(), offline / "taesd_decoder.pth")
    loads = []
    real_load = api.load
    monkeypatch.setattr(api, "load", lambda *args, **kwargs: loads.append(args) or real_load(*args, **kwargs))
    first = fastdec.decode(latents(4, 2, 2))
    second = fastdec.decode(latents(2, 4, 2, 2), output="uint8")
    assert first.shape == (3, 16, 16) and second.shape == (2, 16, 16, 3)
    assert loads == [("taesd",)]
    assert api._cached_decoder.cache_info().currsize == 1


def test_decoders_loaded_by_name_on_cuda_take_the_layout_the_gpu_benchmarks_time(monkeypatch):
    """2-D conv decoders run channels_last on a GPU, as the benchmarks time them (a CPU model stands in for the
    CUDA one here); video decoders (Conv3d) keep the default layout; on the CPU nothing changes."""
    from fastdec.bench.contenders import Contender
    from fastdec.models.wan import WanDecoder

    wan = WanDecoder(base_dim=8, z_dim=4, dim_mult=(1, 1), num_res_blocks=1, temporal_downsample=(False,),
                     latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)
    built = {"taesd": tiny_taesd(blocks=None), "wan": wan}
    monkeypatch.setattr(api, "load", lambda name, device, dtype: built[name])
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    image = api._cached_decoder("taesd", cuda, torch.float32)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in image.parameters() if p.dim() == 4)
    assert Contender("taesd", image, None, "", None).channels_last
    video = api._cached_decoder("wan", cuda, torch.float32)
    assert all(p.is_contiguous() for p in video.parameters())
    assert not Contender("wan", video, None, "", None).channels_last
    built["taesd"] = tiny_taesd(blocks=None)
    assert all(p.is_contiguous() for p in api._cached_decoder("taesd", cpu, torch.float32).parameters())


@pytest.mark.parametrize("channels, name", [(16, "taef1"), (32, "taef2")])
def test_default_decoder_names_for_16_and_32_channels(channels, name):
    with pytest.raises(FileNotFoundError, match=f"load\\('{name}'\\)"):
        fastdec.decode(latents(channels, 2, 2))


def test_decode_bad_inputs_say_what_to_do(decoder):
    good = latents(1, 4, 2, 2)
    with pytest.raises(ValueError, match="no default decoder for 7-channel latents"):
        fastdec.decode(latents(7, 2, 2))
    with pytest.raises(ValueError, match="latents have 16 channels but TAESDDecoder expects 4.*taef1"):
        fastdec.decode(latents(1, 16, 2, 2), decoder)
    for bad in (float("nan"), float("inf"), -float("inf")):
        poisoned = good.clone()
        poisoned[0, 1, 1, 0] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            fastdec.decode(poisoned, decoder)
    with pytest.raises(ValueError, match="\\(C, h, w\\) or \\(B, C, h, w\\)"):
        fastdec.decode(latents(4, 2), decoder)
    with pytest.raises(ValueError, match="look like video latents \\(B, C, T, h, w\\).*use a video decoder"):
        fastdec.decode(latents(1, 1, 4, 2, 2), decoder)  # 5-D: the video path, which refuses an image decoder
    with pytest.raises(TypeError, match="float tensor.*latents.float\\(\\)"):
        fastdec.decode(torch.ones(1, 4, 2, 2, dtype=torch.int64), decoder)
    with pytest.raises(TypeError, match="torch.from_numpy"):
        fastdec.decode(good.numpy(), decoder)
    with pytest.raises(ValueError, match="unknown output kind 'png'"):
        fastdec.decode(good, decoder, output="png")
    with pytest.raises(ValueError, match="move the latents .* or the decoder"):
        fastdec.decode(good, tiny_taesd().to("meta"))


def test_decode_never_builds_a_graph(decoder):
    x = latents(1, 4, 2, 2).requires_grad_()
    assert not fastdec.decode(x, decoder).requires_grad


def test_names_lists_every_kind():
    assert set(api.names()) >= {"taesd", "taef2", "sd", "sd1", "flux", "flux1", "tae-192", "vit-b"}
    assert [api.default_decoder_name(c) for c in (4, 16, 32)] == ["taesd", "taef1", "taef2"]


def test_hub_repo_id_offline_says_what_to_fetch(offline):
    with pytest.raises(FileNotFoundError) as error:
        fastdec.load("someone/some-vae")
    assert "https://huggingface.co/someone/some-vae" in str(error.value) and "HF_HUB_OFFLINE" in str(error.value)


@pytest.mark.parametrize(("hub_id", "stored_in"), [("org/vae-repo", ""), ("org/pipeline-repo", "vae"),
                                                   ("org/other-repo/decoder_vae", "decoder_vae")])
def test_hub_repo_ids_resolve_repo_and_subfolder(offline, tmp_path, monkeypatch, hub_id, stored_in):
    """owner/repo, a pipeline repo whose VAE is in vae/, and owner/repo/subfolder, with the Hub's download faked by a
    folder that diffusers' save_pretrained wrote."""
    import huggingface_hub

    vae = tiny_autoencoder_kl()
    vae.save_pretrained(tmp_path / "hub" / stored_in)
    requests = []

    def fake_download(repo_id, filename, subfolder=None, **kwargs):
        requests.append((repo_id, subfolder))
        path = tmp_path / "hub" / (subfolder or "") / filename
        if (subfolder or "") != stored_in or not path.is_file():
            raise huggingface_hub.errors.EntryNotFoundError(f"{filename} not in {repo_id}/{subfolder}")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    decoder = fastdec.load(hub_id)
    assert all(repo == "/".join(hub_id.split("/")[:2]) for repo, _ in requests)
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(decoder(z), vae.decode(z).sample, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("hub_id", ["madebyollin/taesd", "org/pipeline-repo", "org/repo/decoder_vae"])
def test_hub_id_offline_advice_followed_literally_loads(offline, hub_id):
    """The offline error names a folder under FASTDEC_HOME; files put exactly there are found by the same call."""
    with pytest.raises(FileNotFoundError) as error:
        fastdec.load(hub_id)
    match = re.search(r"Fetch config\.json and (\S+) from .*? into (\S+)/ ", str(error.value))
    assert match, str(error.value)
    weights, folder = match.group(1), Path(match.group(2))
    assert folder == offline / hub_id
    tiny = tiny_autoencoder_tiny(seed=8)
    if hub_id == "org/pipeline-repo":
        tiny.save_pretrained(folder / "vae")  # a pipeline's layout: its VAE in vae/
    else:
        tiny.save_pretrained(folder)
    assert (folder / weights).is_file() or (folder / "vae" / weights).is_file()
    loaded = fastdec.load(hub_id)
    assert_same_weights(loaded, fastdec.load(tiny))
