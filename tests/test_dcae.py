"""DC-AE: DCAEDecoder against diffusers' AutoencoderDC (random weights, fp32) for the f32c32 layout, the default
config and the interpolating (SANA-style) variant; strict loading from instances, folders, Hub ids and names; the
fused rms_norm_act path; the paper's EfficientViT presets as DC-AE configurations (sizes, strict loading of the DC-AE
key layout); BatchNorm at inference; torch.compile.

Widths are reduced in CI (8..32 instead of 128..1024, every other config field as named); at full width the key
layout and shapes are compared on the meta device, which is what strict loading of a real checkpoint needs."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from diffusers import AutoencoderDC
from helpers import compile_fullgraph, fused_on_cpu, fused_vs_reference_error, needs_interpreter, relative_error
from tolerances import DECODER_FP32_REL
from torch import nn

import fastdec
from fastdec import ops
from fastdec.models import dcae
from fastdec.models.dcae import F32C32, PRESETS, ChannelRMSNorm, DCAEDecoder, ResBlock
from fastdec.models.stats import count_params, flops

SMALL = (8, 8, 16, 16, 32, 32)
# decoder_* fields of AutoencoderDC, per case; widths reduced, the rest as in the named configuration.
CONFIGS = {
    "f32c32": dict({k: v for k, v in F32C32.items() if k != "block_out_channels"}, block_out_channels=SMALL,
                   layers_per_block=(0, 1, 2, 1, 1, 1), attention_head_dim=8),
    "default": dict(block_out_channels=SMALL, attention_head_dim=8),  # AutoencoderDC() but the widths
    "interpolate_evit": dict(block_out_channels=SMALL, upsample_block_type="interpolate", attention_head_dim=8,
                             layers_per_block=(1, 1, 1, 1, 1, 1),
                             block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3),
}
FUSED_ON_CPU = fused_on_cpu("rms_norm_act")


def diffusers_config(latent_channels: int = 32, **ours) -> dict:
    """AutoencoderDC kwargs for a DCAEDecoder config (a minimal encoder: it is dropped on load)."""
    stages = len(ours.get("block_out_channels", SMALL))
    config = {"latent_channels": latent_channels, "encoder_block_out_channels": (8,) * stages,
              "encoder_layers_per_block": (0,) * stages, "encoder_qkv_multiscales": ((),) * stages}
    for name, value in ours.items():  # the per-stage decoder fields carry a decoder_ prefix in diffusers
        unprefixed = name in ("attention_head_dim", "upsample_block_type", "scaling_factor")
        config[name if unprefixed else f"decoder_{name}"] = value
    return config


def diffusers_dc(seed: int = 0, **ours) -> AutoencoderDC:
    """A random AutoencoderDC, norms and BatchNorm statistics included (diffusers inits them to 1/0)."""
    torch.manual_seed(seed)
    vae = AutoencoderDC(**diffusers_config(**ours)).eval()
    with torch.no_grad():
        for name, param in vae.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.3)
        for name, buffer in vae.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(std=0.3)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
    return vae


def latents(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers(name, triton_launches):
    vae = diffusers_dc(**CONFIGS[name])
    model = DCAEDecoder.from_diffusers(vae)
    z = latents(1, 32, 2, 3)  # the latent-end EfficientViT stages run quadratic attention (h*w <= 8), later linear
    with torch.no_grad():
        reference = vae.decode(z).sample
        out = model(z)
    assert out.shape == reference.shape == (1, 3, 64, 96)
    assert relative_error(out, reference) <= DECODER_FP32_REL
    if FUSED_ON_CPU:
        norms = sum(isinstance(m, ChannelRMSNorm) for m in model.modules())
        assert dict(triton_launches) == {"rms_norm_act_triton": norms}


def test_channels_last_and_scaled_decode():
    vae = diffusers_dc(**CONFIGS["f32c32"], scaling_factor=0.41407)
    model = DCAEDecoder.from_diffusers(vae).to(memory_format=torch.channels_last)
    assert model.scaling_factor == 0.41407 and model.spatial_factor == 32
    x = latents(1, 32, 1, 2)
    with torch.no_grad(), ops.reference_ops():
        expected = (vae.decode(x / 0.41407).sample / 2 + 0.5).clamp(0, 1)
        assert relative_error(model.decode(x.contiguous(memory_format=torch.channels_last)), expected) <= (
            DECODER_FP32_REL)


@needs_interpreter("rms_norm_act")
def test_fused_ops_match_reference_ops(triton_launches):
    model = DCAEDecoder.from_diffusers(diffusers_dc(**CONFIGS["interpolate_evit"]))
    norms = sum(isinstance(m, ChannelRMSNorm) for m in model.modules())
    with torch.no_grad():
        error = fused_vs_reference_error(model, latents(1, 32, 1, 1), triton_launches, {"rms_norm_act_triton": norms})
    assert error <= DECODER_FP32_REL


@pytest.mark.parametrize("config", [{}, F32C32], ids=["default", "f32c32"])
def test_full_width_key_layout_matches_diffusers(config):
    """At full width (meta device), every decoder key and shape of AutoencoderDC, and nothing else."""
    with torch.device("meta"):
        vae = AutoencoderDC(**diffusers_config(**config))
        model = DCAEDecoder(**config)
    theirs = {f"decoder.{k}": v.shape for k, v in vae.decoder.state_dict().items()}
    assert {k: v.shape for k, v in model.state_dict().items()} == theirs


def test_loads_from_folder_pipeline_folder_name_and_hub_id(offline, tmp_path, monkeypatch):
    import huggingface_hub

    vae = diffusers_dc(**CONFIGS["f32c32"])
    vae.save_pretrained(tmp_path / "sana" / "vae", safe_serialization=True)
    vae.save_pretrained(offline / "dc-ae", safe_serialization=True)

    def fake_download(repo_id, filename, subfolder=None, **kwargs):
        assert (repo_id, subfolder) == ("org/sana", "vae")
        return str(tmp_path / "sana" / "vae" / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    z = latents(1, 32, 1, 1)
    with torch.no_grad(), ops.reference_ops():
        reference = vae.decode(z).sample
        for source in (vae, tmp_path / "sana", tmp_path / "sana" / "vae", "dc-ae", "org/sana/vae"):
            decoder = fastdec.load(source)
            assert isinstance(decoder, DCAEDecoder)
            assert relative_error(decoder(z), reference) <= DECODER_FP32_REL
        decoder.save_pretrained(tmp_path / "saved")
        assert torch.equal(fastdec.load(tmp_path / "saved")(z), decoder(z))


def test_strict_loading_names_the_bad_key(tmp_path):
    from helpers import edit_weights

    diffusers_dc(**CONFIGS["f32c32"]).save_pretrained(tmp_path, safe_serialization=True)
    edit_weights(tmp_path, lambda state: state.pop("decoder.norm_out.bias"))
    with pytest.raises(ValueError, match="decoder\\.norm_out\\.bias"):
        DCAEDecoder.from_diffusers(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(norm_types="layer_norm"), "norm_types entries"),
        (dict(block_types=("ResBlock",) * 5), "one entry per stage"),
        (dict(upsample_block_type="bilinear"), "upsample_block_type"),
        (dict(latent_channels=12), "multiple of latent_channels"),
        (dict(attention_head_dim=12, block_types="EfficientViTBlock"), "attention_head_dim 12"),
        (dict(block_out_channels=(8, 8, 16, 16, 24, 32)), "4\\*16 to be a multiple of 24"),
        (dict(block_out_channels=(8, 8, 16, 16, 32, 64), layers_per_block=(1, 1, 1, 1, 0, 1)), "skipped stages"),
    ],
)
def test_bad_configs_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        DCAEDecoder(**{**CONFIGS["default"], **change})


def test_compiles_to_one_graph():
    model = DCAEDecoder(latent_channels=4, block_out_channels=(8, 16, 32), layers_per_block=(1, 1, 1),
                        block_types=("ResBlock", "ResBlock", "EfficientViTBlock"), qkv_multiscales=((), (), (5,)),
                        attention_head_dim=8, upsample_block_type="interpolate").eval()
    with torch.no_grad():
        assert relative_error(*compile_fullgraph(model, latents(1, 4, 3, 3))) <= DECODER_FP32_REL
    torch._dynamo.reset()


# --- the paper's EfficientViT presets: DC-AE configurations ------------------------------------------------------

# 4 latent channels. efficientvit: conv_in 9,472; upsample 256->128 1,180,160; 15 BatchNorm ResBlocks of 128 at
# 295,296; upsample 128->128 590,336; head 14,092 (RMSNorm with bias, 3x3 conv to 12 channels, pixel shuffle).
# efficientvit-attn adds two DC-AE EfficientViT blocks of 256 (8 heads of 32, 5x5 multi-scale; 1,181,440 each).
PRESET_PARAMS = {"efficientvit": 6_223_500, "efficientvit-attn": 8_586_380}
PRESET_GFLOPS_512 = {"efficientvit": 320.8, "efficientvit-attn": 340.6}  # one 64x64 latent (a 512x512 image)


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_sizes_and_diffusers_key_layout(name):
    cls, config = PRESETS[name]
    for channels in (4, 16, 32):
        with torch.device("meta"):
            model = cls(**config, latent_channels=channels)
            image = model(torch.empty(1, channels, 8, 6, device="meta"))
            vae = AutoencoderDC(**diffusers_config(**config, latent_channels=channels))
        assert image.shape == (1, 3, 64, 48) and model.spatial_factor == 8
        theirs = {f"decoder.{k}": v.shape for k, v in vae.decoder.state_dict().items()}
        assert {k: v.shape for k, v in model.state_dict().items()} == theirs
        if channels == 4:
            assert count_params(model) == PRESET_PARAMS[name]
            assert flops(model, (1, 4, 64, 64)) / 1e9 == pytest.approx(PRESET_GFLOPS_512[name], abs=0.05)
    if name == "efficientvit-attn":
        assert sum(isinstance(m, dcae.EfficientViTBlock) for m in model.modules()) == 2


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_load_dc_ae_weights_strictly(name):
    """A DC-AE-layout state dict (diffusers' AutoencoderDC with the preset's structure, widths / 8) loads strictly
    and decodes like diffusers."""
    _, config = PRESETS[name]
    small = dict(config, block_out_channels=(16, 16, 16, 32, 32, 32), attention_head_dim=8)
    vae = diffusers_dc(**small, latent_channels=4)
    model = DCAEDecoder.from_diffusers(vae)
    assert model.config == DCAEDecoder(**small, latent_channels=4).config
    z = latents(1, 4, 2, 2)
    with torch.no_grad(), ops.reference_ops():
        assert relative_error(model(z), vae.decode(z).sample) <= DECODER_FP32_REL


def settle_batch_norm(model: nn.Module) -> None:
    """A few train-mode forwards so that the running statistics are no longer the initial (0, 1)."""
    model.train()
    with torch.no_grad(), ops.reference_ops():
        for seed in range(3):
            model(latents(4, 4, 2, 2, seed=seed) * 2 + 0.5)
    model.eval()


def tiny_efficientvit() -> DCAEDecoder:
    torch.manual_seed(0)
    return DCAEDecoder(**dict(PRESETS["efficientvit"][1], block_out_channels=(8, 8, 8, 16, 16, 16),
                              layers_per_block=(0, 1, 1, 0, 0, 0)), latent_channels=4)


def test_decode_uses_running_statistics_even_in_train_mode():
    model = tiny_efficientvit()
    settle_batch_norm(model)
    z = latents(3, 4, 2, 2)
    with torch.no_grad(), ops.reference_ops():
        expected = model.eval().decode(z)
        model.train()
        assert torch.equal(model.decode(z), expected)
        assert all(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))  # restored
        assert not torch.equal(model(z), model.eval()(z)), "batch and running statistics must differ here"


def test_fuse_for_inference_folds_batch_norm(tmp_path):
    model = tiny_efficientvit()
    settle_batch_norm(model)
    z = latents(2, 4, 2, 2)
    with torch.no_grad(), ops.reference_ops():
        expected = model(z)
        assert model.fuse_for_inference() is model and model.config["fused"] is True
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        torch.testing.assert_close(model(z), expected, rtol=1e-5, atol=1e-5)
        model.save_pretrained(tmp_path)
        assert torch.equal(DCAEDecoder.from_pretrained(tmp_path)(z), model(z))
    block = ResBlock(8, "rms_norm", "silu")
    assert block.norm is not None and DCAEDecoder(**CONFIGS["default"]).fuse_for_inference().config["fused"] is False


def test_efficientvit_trains():
    model = tiny_efficientvit().train()
    z = latents(2, 4, 2, 2)
    target = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(7)) * 2 - 1
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    with ops.reference_ops():
        for _ in range(6):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(z), target)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert all(p.grad is not None for p in model.parameters())
    assert losses[-1] < 0.8 * losses[0], losses


def test_saved_config_round_trips(tmp_path):
    model = DCAEDecoder(**CONFIGS["interpolate_evit"], scaling_factor=0.5)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["class"] == "DCAEDecoder"
    assert DCAEDecoder.from_pretrained(tmp_path).config == model.config


@torch.no_grad()
def test_no_stage_input_outlives_its_first_layer():
    """The decoder runs layer by layer, so that a stage's input is freed once the stage's first layer has run, not
    held through the stage (1024^2 bf16, counted: 2304 -> 2048 MiB at the peak)."""
    decoder = DCAEDecoder(block_out_channels=(8, 8, 16, 16, 32, 32), attention_head_dim=8).eval()
    stage = next(stage for stage in decoder.decoder.up_blocks if len(stage) > 1)
    stage_input, alive_at_second = {}, []
    stage[0].register_forward_pre_hook(lambda module, args: stage_input.update(x=weakref.ref(args[0])))
    stage[1].register_forward_pre_hook(lambda module, args: alive_at_second.append(stage_input["x"]() is not None))
    decoder.decode(torch.randn(1, decoder.latent_channels, 2, 2), check_finite=False)
    assert alive_at_second == [False]
