"""TAESD family: parity with diffusers' AutoencoderTiny, the real TAEF2 weights, loading, decode(), torch.compile.

CPU, fp32. Run with FASTDEC_TRITON_INTERPRET=1 TRITON_INTERPRET=1 so that the fused path runs the Triton kernels
through triton's interpreter; tests that need that skip otherwise.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import compile_fullgraph, edit_config, needs_interpreter, relative_error
from tolerances import DECODER_FP32_REL, RECONSTRUCTION_PSNR_DB

import fastdec.kernels.group_norm_act as group_norm_act_kernels
from fastdec import ops
from fastdec.models.taesd import VARIANTS, TAESDDecoder, TAESDEncoder

TAEF2 = Path(__file__).resolve().parents[1] / ".." / "shared" / "weights" / "taef2"
needs_taef2 = pytest.mark.skipif(
    not (TAEF2 / "taef2_decoder.pth").is_file(), reason=f"real TAEF2 weights not found in {TAEF2.resolve()}"
)
# Reconstruction PSNR (dB) of scikit-image's images through TAEF2, measured with a reference implementation
# (shared/README.md).
TAEF2_PSNR = {"astronaut": 31.19, "chelsea": 32.70, "coffee": 29.62, "rocket": 30.49}


def tiny_autoencoder(latent_channels: int, decoder_width: int = 64):
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    return AutoencoderTiny(latent_channels=latent_channels, decoder_block_out_channels=(decoder_width,) * 4).eval()


PARITY_CASES = [("taesd", 4, 64), ("taef1", 16, 64), ("tae-192", 4, 192)]


# --- parity with diffusers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant, latent_channels, width", PARITY_CASES)
@torch.no_grad()
def test_decoder_matches_diffusers(variant, latent_channels, width):
    vae = tiny_autoencoder(latent_channels, width)
    decoder = TAESDDecoder.from_diffusers(vae, variant)
    assert (decoder.latent_channels, decoder.config["width"]) == (latent_channels, width)
    latents = torch.randn(2, latent_channels, 5, 7, generator=torch.Generator().manual_seed(1)) * 2
    expected = vae.decode(latents).sample  # diffusers clamps with tanh(x/3)*3 too, and returns [-1, 1]
    assert expected.shape == (2, 3, 40, 56) and expected.std() > 0
    assert relative_error(decoder(latents) * 2 - 1, expected) <= DECODER_FP32_REL
    # decode(): the [0, 1] image diffusers' image processor makes of the same output.
    assert relative_error(decoder.decode(latents), (expected * 0.5 + 0.5).clamp(0, 1)) <= DECODER_FP32_REL


@pytest.mark.parametrize("variant, latent_channels, width", PARITY_CASES)
@torch.no_grad()
def test_encoder_matches_diffusers(variant, latent_channels, width):
    vae = tiny_autoencoder(latent_channels, width)
    encoder = TAESDEncoder.from_diffusers(vae, variant)
    images = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(2))
    expected = vae.encode(images * 2 - 1).latents  # diffusers' encoder takes [-1, 1]
    assert expected.shape == (2, latent_channels, 5, 7) and expected.std() > 0
    assert relative_error(encoder.encode(images), expected) <= DECODER_FP32_REL


@torch.no_grad()
def test_diffusers_folder_loads_like_the_instance(tmp_path):
    vae = tiny_autoencoder(16)
    vae.save_pretrained(tmp_path)
    latents, images = torch.randn(1, 16, 3, 4), torch.rand(1, 3, 24, 32)
    from_folder, from_instance = (TAESDDecoder.from_diffusers(src, "taef1") for src in (tmp_path, vae))
    assert torch.equal(from_folder(latents), from_instance(latents))
    encoder = TAESDEncoder.from_diffusers(tmp_path, "taef1")
    assert torch.equal(encoder.encode(images), vae.encode(images * 2 - 1).latents)


# --- real TAEF2 weights ------------------------------------------------------------------------------------------


def skimage_image(name: str) -> torch.Tensor:
    """scikit-image's RGB image in [0, 1], (1, 3, H, W), cropped (top left) to multiples of 16."""
    import skimage.data

    image = torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1)[None].float() / 255
    return image[..., : image.shape[-2] // 16 * 16, : image.shape[-1] // 16 * 16]


@pytest.fixture(scope="module")
def taef2():
    """The real TAEF2 encoder and decoder, and a cache of each image's latents (encoded on the reference ops)."""
    return (TAESDEncoder.from_pth(TAEF2 / "taef2_encoder.pth", "taef2"),
            TAESDDecoder.from_pth(TAEF2 / "taef2_decoder.pth", "taef2"), {})


@torch.no_grad()
def encoded(taef2, name: str) -> torch.Tensor:
    encoder, _, latents = taef2
    if name not in latents:
        with ops.reference_ops():
            latents[name] = encoder.encode(skimage_image(name))
    return latents[name]


@torch.no_grad()
def reconstruction_psnr(taef2, name: str) -> float:
    image, latents = skimage_image(name), encoded(taef2, name)
    decoded = taef2[1].decode(latents)
    assert torch.isfinite(decoded).all() and decoded.shape == image.shape
    return (10 * torch.log10(1 / (decoded - image).square().mean())).item()


@needs_taef2
@pytest.mark.parametrize("name", list(TAEF2_PSNR))
def test_taef2_psnr_reference_ops(taef2, name):
    with ops.reference_ops():
        psnr = reconstruction_psnr(taef2, name)
    assert abs(psnr - TAEF2_PSNR[name]) <= RECONSTRUCTION_PSNR_DB, f"{name}: {psnr:.3f} dB"


@needs_taef2
@needs_interpreter("group_norm_act")
@pytest.mark.parametrize("name", ["chelsea"])
@torch.no_grad()
def test_taef2_psnr_fused(taef2, name, monkeypatch):
    """Encoder and decoder on the fused path (Triton group_norm_act through the interpreter, folded upsamplers,
    C++ pixel shuffle) with the real weights; the reference GroupNorm must not run. The smallest image only: every
    image is checked on the reference ops above, and the four interpreted took 26 s of CI."""
    monkeypatch.setattr(group_norm_act_kernels, "group_norm_act_reference", _must_not_run)
    encoder, decoder, _ = taef2
    image = skimage_image(name)
    decoded = decoder.decode(encoder.encode(image))
    assert torch.isfinite(decoded).all() and decoded.shape == image.shape
    psnr = (10 * torch.log10(1 / (decoded - image).square().mean())).item()
    assert abs(psnr - TAEF2_PSNR[name]) <= RECONSTRUCTION_PSNR_DB, f"{name}: {psnr:.3f} dB"


def _must_not_run(*args, **kwargs):
    raise AssertionError("the eager group_norm_act reference ran on the fused path")


# --- fused vs reference ------------------------------------------------------------------------------------------


@needs_interpreter("group_norm_act")
@pytest.mark.parametrize("channels_last", [False, True])
@torch.no_grad()
def test_fused_matches_reference_and_runs_triton(monkeypatch, channels_last):
    """taef2 encoder and decoder (random weights, GroupNorm branches included): fused == reference ops."""
    torch.manual_seed(3)
    encoder, decoder = TAESDEncoder("taef2").eval(), TAESDDecoder("taef2").eval()
    images, latents = torch.rand(1, 3, 48, 40), torch.randn(1, 32, 3, 5) * 2
    with ops.reference_ops():
        expected = encoder.encode(images), decoder(latents)
    if channels_last:
        encoder, decoder = (m.to(memory_format=torch.channels_last) for m in (encoder, decoder))
        images, latents = (x.contiguous(memory_format=torch.channels_last) for x in (images, latents))
    launches = []

    def counting_triton(*args, **kwargs):
        launches.append(args[0].shape)
        return triton_launcher(*args, **kwargs)

    triton_launcher = group_norm_act_kernels.group_norm_act_triton
    monkeypatch.setattr(group_norm_act_kernels, "group_norm_act_triton", counting_triton)
    monkeypatch.setattr(group_norm_act_kernels, "group_norm_act_reference", _must_not_run)
    fused = encoder.encode(images), decoder(latents)
    assert len(launches) == 6  # three GroupNorm branches in each
    assert all(x.is_contiguous(memory_format=torch.channels_last) == channels_last for x in fused)
    for got, want in zip(fused, expected, strict=True):
        assert relative_error(got, want) <= DECODER_FP32_REL


# --- loading -----------------------------------------------------------------------------------------------------


def saved(tmp_path: Path, state: dict, name: str = "weights.pth") -> Path:
    torch.save(state, tmp_path / name)
    return tmp_path / name


def test_pth_round_trip_fp16_cast_to_requested_dtype(tmp_path):
    torch.manual_seed(4)
    source = TAESDDecoder("taef2").half()
    path = saved(tmp_path, source.state_dict())
    for dtype, expect in ((None, torch.float32), (torch.float64, torch.float64), (torch.float16, torch.float16)):
        loaded = TAESDDecoder.from_pth(path, "taef2", dtype=dtype)
        assert all(p.dtype == expect for p in loaded.parameters())
        for key, value in source.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value.to(expect)), key
    encoder = TAESDEncoder("taef2").half()
    loaded = TAESDEncoder.from_pth(saved(tmp_path, encoder.state_dict(), "enc.pth"), "taef2")
    assert loaded.latent_channels == 32 and next(loaded.parameters()).dtype == torch.float32


@needs_taef2
def test_real_taef2_files_load_as_madebyollin_keys():
    state = torch.load(TAEF2 / "taef2_decoder.pth", weights_only=True)
    decoder = TAESDDecoder.from_pth(TAEF2 / "taef2_decoder.pth", "taef2")
    assert sorted(decoder.state_dict()) == sorted(state)  # identity key map
    assert sum(p.numel() for p in decoder.parameters()) == 1_338_499  # shared/README.md
    assert decoder.state_dict()["3.pool.1.weight"].dtype == torch.float32
    with pytest.raises(ValueError, match=r"variant 'taef1' has 16 latent channels but .* 32: .*'taef2'"):
        TAESDDecoder.from_pth(TAEF2 / "taef2_decoder.pth", "taef1")
    with pytest.raises(ValueError, match="variant 'taesd' has 4 latent channels"):
        TAESDEncoder.from_pth(TAEF2 / "taef2_encoder.pth", "taesd")
    with pytest.raises(ValueError, match="not a TAESD decoder.*TAESDEncoder.from_pth"):
        TAESDDecoder.from_pth(TAEF2 / "taef2_encoder.pth", "taef2")
    with pytest.raises(ValueError, match="not a TAESD encoder.*TAESDDecoder.from_pth"):
        TAESDEncoder.from_pth(TAEF2 / "taef2_decoder.pth", "taef2")


def test_strict_loading_names_the_problem(tmp_path):
    state = TAESDDecoder("taef1").state_dict()
    missing = {k: v for k, v in state.items() if k != "8.conv.2.bias"}
    with pytest.raises(ValueError, match=r"missing keys \(1\): .*8\.conv\.2\.bias"):
        TAESDDecoder.from_pth(saved(tmp_path, missing), "taef1")
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): .*3\.pool\.0\.weight"):
        TAESDDecoder.from_pth(saved(tmp_path, {**state, "3.pool.0.weight": torch.zeros(256, 64, 1, 1)}), "taef1")
    with pytest.raises(ValueError, match=r"shape mismatches: .*7\.weight: file \(64, 64, 1, 1\) vs model"):
        TAESDDecoder.from_pth(saved(tmp_path, {**state, "7.weight": torch.zeros(64, 64, 1, 1)}), "taef1")
    with pytest.raises(ValueError, match="variant 'taef2' has 32 latent channels but .* 16"):
        TAESDDecoder.from_pth(saved(tmp_path, state), "taef2")
    with pytest.raises(ValueError, match="missing keys.*pool"):  # right channels, but no GroupNorm branches
        TAESDDecoder.from_pth(saved(tmp_path, TAESDDecoder("tae-192", 32, width=64).state_dict()), "taef2")
    with pytest.raises(ValueError, match="unknown TAESD variant 'taesd4'"):
        TAESDDecoder.from_pth(saved(tmp_path, state), "taesd4")


def test_missing_or_broken_files_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothere_decoder.pth not found: download .*madebyollin/taesd"):
        TAESDDecoder.from_pth(tmp_path / "nothere_decoder.pth", "taesd")
    path = saved(tmp_path, TAESDEncoder("taesd").state_dict())
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"could not read .*truncated.pth .*truncated or not a TAESD encoder"):
        TAESDEncoder.from_pth(truncated, "taesd")
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        TAESDEncoder.from_pth(saved(tmp_path, [torch.zeros(1)], "list.pth"), "taesd")
    with pytest.raises(FileNotFoundError, match="not a diffusers AutoencoderTiny folder"):
        TAESDDecoder.from_diffusers(tmp_path, "taesd")
    with pytest.raises(ValueError, match="variant 'tae-192' fits any latent space: pass latent_channels"):
        TAESDDecoder("tae-192")


def test_diffusers_key_map_is_strict(tmp_path):
    from safetensors.torch import load_file, save_file

    vae = tiny_autoencoder(4)
    vae.save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    save_file({**state, "decoder.layers.99.weight": torch.zeros(1)}, str(weights))
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): .*100\.weight"):
        TAESDDecoder.from_diffusers(tmp_path, "taesd")
    save_file({**state, "decoder.extra": torch.zeros(1)}, str(weights))
    with pytest.raises(ValueError, match="key 'decoder.extra' is not an AutoencoderTiny decoder key"):
        TAESDDecoder.from_diffusers(tmp_path, "taesd")
    save_file({k: v for k, v in state.items() if k != "encoder.layers.14.bias"}, str(weights))
    with pytest.raises(ValueError, match=r"missing keys \(1\): .*14\.bias"):
        TAESDEncoder.from_diffusers(tmp_path, "taesd")
    with pytest.raises(ValueError, match="variant 'taef1' has 16 latent channels but .* 4"):
        TAESDDecoder.from_diffusers(vae, "taef1")
    with pytest.raises(ValueError, match="TAESD layers need .* has {'upsample_fn': 'bilinear'}"):
        TAESDDecoder.from_diffusers(type(vae)(upsample_fn="bilinear"), "taesd")
    with pytest.raises(ValueError, match=r"one block width .* widths \[64, 32, 64, 64\]"):
        TAESDEncoder.from_diffusers(type(vae)(encoder_block_out_channels=(64, 32, 64, 64)), "taesd")
    edit_config(tmp_path, {"scaling_factor": 0.5})
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"scaling_factor, shift_factor\) = \(0.5, 0.0\)"):
        TAESDDecoder.from_diffusers(tmp_path, "taesd")


# --- conventions, save/load, compile -----------------------------------------------------------------------------


@torch.no_grad()
def test_save_pretrained_round_trip(tmp_path):
    torch.manual_seed(5)
    decoder = TAESDDecoder("tae-192", latent_channels=16, blocks=(1, 2, 1)).eval()
    decoder.save_pretrained(tmp_path)
    loaded = TAESDDecoder.from_pretrained(tmp_path)
    assert loaded.config == decoder.config == {
        "variant": "tae-192", "latent_channels": 16, "width": 192, "blocks": [1, 2, 1], "midblock_gn": False,
    }
    latents = torch.randn(1, 16, 4, 3)
    assert torch.equal(loaded(latents), decoder(latents)) and loaded(latents).shape == (1, 3, 16, 12)


@torch.no_grad()
def test_decode_and_encode_conventions(monkeypatch):
    """decode: latents / scaling_factor + shift_factor -> forward -> clamp [0, 1]; encode is its inverse map."""
    torch.manual_seed(6)
    encoder, decoder = TAESDEncoder("taesd3").eval(), TAESDDecoder("taesd3").eval()
    assert decoder.output_range == "0,1"
    for model in (encoder, decoder):
        monkeypatch.setattr(model, "scaling_factor", 1.5)
        monkeypatch.setattr(model, "shift_factor", 0.25)
    images = torch.rand(1, 3, 32, 24)
    raw = encoder(images)
    latents = encoder.encode(images)
    torch.testing.assert_close(latents, (raw - 0.25) * 1.5, rtol=0, atol=0)
    torch.testing.assert_close(decoder.decode(latents), decoder(latents / 1.5 + 0.25).clamp(0, 1))
    torch.testing.assert_close(decoder.decode(latents), decoder(raw).clamp(0, 1))
    # The presets: every TAESD decoder reads diffusion latents as they are (see VARIANTS).
    assert {(v.scaling_factor, v.shift_factor) for v in VARIANTS.values()} == {(1.0, 0.0)}
    with pytest.raises(ValueError, match=r"RGB images \(B, 3, H, W\)"):
        encoder.encode(torch.rand(1, 4, 8, 8))


def test_taef2_decoder_compiles_without_graph_breaks():
    torch.manual_seed(7)
    decoder = TAESDDecoder("taef2").eval()
    latents = torch.randn(1, 32, 2, 3)
    torch.testing.assert_close(*compile_fullgraph(decoder, latents), rtol=0, atol=0)
