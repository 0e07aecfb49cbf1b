"""Lightweight decoders (EfficientViT/DC-AE-style and ViT): presets, shapes, strict save/load, fused ops against
their references, torch.compile, gradients, a short training run, BatchNorm at inference, parameter and FLOP counts.

Most tests use tiny configs (fp32, CPU); the full presets are built on the meta device to check sizes cheaply."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import compile_fullgraph, fused_vs_reference_error, needs_interpreter, relative_error
from safetensors.torch import load_file, save_file
from tolerances import DECODER_FP32_REL
from torch import nn

from fastdec.models import efficientvit, vit
from fastdec.models.efficientvit import EfficientViTDecoder, ResBlock
from fastdec.models.stats import count_params, flops
from fastdec.models.vit import Attention, ViTDecoder, sincos_position_encoding

# Tiny configs, 8x upsampling each: four stages whose two non-empty ones upsample, plus the head's x2.
TINY = {
    "efficientvit": (EfficientViTDecoder, dict(widths=(16, 16, 16, 32), depths=(0, 1, 1, 0), norm_groups=8)),
    "efficientvit-group-silu": (
        EfficientViTDecoder,
        dict(widths=(16, 16, 16, 32), depths=(0, 1, 1, 0), norm="group", act="silu", norm_groups=8),
    ),
    "efficientvit-attn": (
        EfficientViTDecoder,
        dict(widths=(16, 16, 16, 32), depths=(0, 1, 1, 2), block_types=("res", "res", "res", "attn"),
             norm_groups=8, head_dim=16),
    ),
    "vit-patch1": (ViTDecoder, dict(dim=32, depth=2, num_heads=2, latent_patch=1)),
    "vit-patch2": (ViTDecoder, dict(dim=32, depth=2, num_heads=2, latent_patch=2)),
}
PRESETS = {**efficientvit.PRESETS, **vit.PRESETS}

# Parameters with 4 latent channels. efficientvit: project_in 9,472; upsample 256->128 1,180,160; 15 ResBlocks
# of 128 at 295,296 (two 3x3 convs, the first biased, plus BatchNorm's affine); upsample 128->128 590,336; head
# 14,092 (GroupNorm + 3x3 conv to 12 channels). efficientvit-attn adds two 256-wide blocks (789,760 each) and
# the depthwise position conv (2,560). vit-*: ViT-S/B depth 12 plus patch embed (2x2 conv) and a 768-wide head.
PRESET_PARAMS = {"efficientvit": 6_223_500, "efficientvit-attn": 7_805_580, "vit-s": 21_596_544, "vit-b": 85_659_648}
# Forward FLOPs (2 per multiply-add) on one 64x64 latent, i.e. a 512x512 image.
PRESET_GFLOPS_512 = {"efficientvit": 320.8, "efficientvit-attn": 368.1, "vit-s": 63.4, "vit-b": 213.8}


def build(name: str, latent_channels: int = 4, seed: int = 0, **overrides) -> nn.Module:
    cls, kwargs = TINY[name]
    torch.manual_seed(seed)
    return cls(**{**kwargs, "latent_channels": latent_channels, **overrides})


def latents(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(module, nn.BatchNorm2d) for module in model.modules())


def settle_batch_norm(model: nn.Module, latent_channels: int = 4) -> None:
    """A few train-mode forwards so that the running statistics are no longer the initial (0, 1)."""
    model.train()
    with torch.no_grad():
        for seed in range(3):
            model(latents(4, latent_channels, 4, 4, seed=seed) * 2 + 0.5)
    model.eval()


def expected_launches(model: nn.Module) -> dict[str, int]:
    group_norms = sum(isinstance(m, nn.GroupNorm) for m in model.modules())
    attentions = sum(isinstance(m, Attention) for m in model.modules())
    unembeds = int(isinstance(model, ViTDecoder))
    counts = {"group_norm_act_triton": group_norms, "attention_triton": attentions, "patch_unembed_triton": unembeds}
    return {name: count for name, count in counts.items() if count}


# --- presets --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_sizes_and_output_shapes(name):
    cls, kwargs = PRESETS[name]
    for channels in (4, 16, 32):
        with torch.device("meta"):  # full size, nothing computed
            model = cls(**kwargs, latent_channels=channels)
            image = model(torch.empty(1, channels, 8, 6))
        assert image.shape == (1, 3, 64, 48)
        assert model.config["latent_channels"] == channels
        if channels == 4:
            assert count_params(model) == PRESET_PARAMS[name]
            assert flops(model, (1, 4, 64, 64)) / 1e9 == pytest.approx(PRESET_GFLOPS_512[name], abs=0.05)


def test_efficientvit_attn_preset_has_attention_and_vit_presets_use_attention():
    for name in ("efficientvit-attn", "vit-s", "vit-b"):
        cls, kwargs = PRESETS[name]
        with torch.device("meta"):
            model = cls(**kwargs)
        heads = [m for m in model.modules() if isinstance(m, Attention)]
        assert heads and all(32 <= m.qkv.in_features // m.num_heads <= 128 for m in heads)


def test_efficientvit_preset_runs_on_real_latents():
    cls, kwargs = PRESETS["efficientvit"]
    torch.manual_seed(0)
    model = cls(**kwargs, latent_channels=16).eval()
    with torch.no_grad():
        image = model.decode(latents(1, 16, 4, 4))
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
    assert image.min() >= 0 and image.max() <= 1


# --- tiny configs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("channels", [4, 16, 32])
def test_output_is_8x_the_latent(name, channels):
    model = build(name, latent_channels=channels).eval()
    with torch.no_grad():
        raw = model(latents(2, channels, 4, 6))
        image = model.decode(latents(2, channels, 4, 6))
    assert raw.shape == image.shape == (2, 3, 32, 48)
    assert torch.isfinite(raw).all() and model.output_range == "-1,1"
    assert image.min() >= 0 and image.max() <= 1


@pytest.mark.parametrize("name", ["efficientvit", "efficientvit-attn"])
def test_channels_last_gives_the_same_image_and_keeps_the_layout(name):
    model = build(name).eval()
    z = latents(2, 4, 4, 6)
    with torch.no_grad():
        expected = model(z)
        image = model.to(memory_format=torch.channels_last)(z.contiguous(memory_format=torch.channels_last))
    assert image.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(image, expected) <= DECODER_FP32_REL


@pytest.mark.parametrize("name", list(TINY))
def test_save_and_load_round_trip_is_bitwise(name, tmp_path):
    model = build(name, scaling_factor=0.5, shift_factor=0.1)
    if has_batch_norm(model):
        settle_batch_norm(model)
    model.eval().save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert json.loads((tmp_path / "config.json").read_text())["class"] == type(model).__name__
    assert not loaded.training
    z = latents(2, 4, 4, 4)
    with torch.no_grad():
        assert torch.equal(loaded(z), model(z))
        assert torch.equal(loaded.decode(z), model.decode(z))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda state: state.pop(next(iter(state))), "missing keys"),
        (lambda state: state.update(extra=torch.zeros(1)), "unexpected keys"),
        (lambda state: state.update({k: torch.zeros(3) for k in [next(iter(state))]}), "shape mismatches"),
    ],
)
@pytest.mark.parametrize("name", ["efficientvit", "vit-patch2"])
def test_strict_loading_names_the_problem(name, edit, message, tmp_path):
    build(name).save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    edit(state)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=message):
        type(build(name)).from_pretrained(tmp_path)


def test_loading_refuses_another_class_and_another_config(tmp_path):
    build("vit-patch2").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="describes a ViTDecoder"):
        EfficientViTDecoder.from_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "latent_channels": 16}))
    with pytest.raises(ValueError, match="shape mismatches"):
        ViTDecoder.from_pretrained(tmp_path)


@needs_interpreter("group_norm_act", "attention", "patch_unembed")
@pytest.mark.parametrize("name", list(TINY))
def test_fused_ops_match_reference_ops(name, triton_launches):
    model = build(name).eval()
    z = latents(2, 4, 4, 4)
    assert fused_vs_reference_error(model, z, triton_launches, expected_launches(model)) <= DECODER_FP32_REL


@pytest.mark.parametrize("name", ["efficientvit-attn", "vit-patch2"])
def test_compiles_to_one_graph(name):
    model = build(name).eval()
    z = latents(1, 4, 4, 4)
    with torch.no_grad():
        assert relative_error(*compile_fullgraph(model, z)) <= DECODER_FP32_REL
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["efficientvit-group-silu", "efficientvit-attn", "vit-patch1"])
def test_every_parameter_gets_a_gradient(name):
    model = build(name).train()
    image = model(latents(2, 4, 4, 4))
    (image * latents(*image.shape, seed=5)).sum().backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, f"{param_name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{param_name} has a non-finite gradient"
        assert param.grad.abs().max() > 0, f"{param_name} got an all-zero gradient"


@pytest.mark.parametrize("name", ["efficientvit", "vit-patch2"])
def test_a_few_adam_steps_lower_the_loss(name):
    model = build(name).train()
    z = latents(2, 4, 4, 4)
    target = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(7)) * 2 - 1
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(z), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < 0.7 * losses[0], losses


# --- BatchNorm at inference -----------------------------------------------------------------------------------


def test_decode_uses_running_statistics_even_in_train_mode():
    model = build("efficientvit")
    settle_batch_norm(model)
    z = latents(3, 4, 4, 4)
    with torch.no_grad():
        expected = model.eval().decode(z)
        model.train()
        in_train_mode = model.decode(z)
        one_image = model.decode(z[:1])  # with batch statistics it would depend on the rest of the batch
        assert not torch.equal(model(z), model.eval()(z)), "the test needs batch and running statistics to differ"
    assert torch.equal(in_train_mode, expected)
    torch.testing.assert_close(one_image, expected[:1], rtol=1e-5, atol=1e-6)


def test_decode_restores_train_mode():
    model = build("efficientvit").train()
    model.stages[0][1].norm.eval()  # a mixed state is kept as it was
    with torch.no_grad():
        model.decode(latents(1, 4, 4, 4))
    modes = {name: m.training for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert modes == {"stages.0.1.norm": False, "stages.1.1.norm": True}


def test_fuse_for_inference_removes_batch_norm_and_keeps_the_output(tmp_path):
    model = build("efficientvit")
    settle_batch_norm(model)
    z = latents(2, 4, 4, 4)
    with torch.no_grad():
        expected = model.eval()(z)
        fused = model.fuse_for_inference()
        assert fused is model and not model.training and not has_batch_norm(model)
        assert model.config["fused"] is True
        torch.testing.assert_close(model(z), expected, rtol=1e-5, atol=1e-5)
        model.save_pretrained(tmp_path)
        loaded = EfficientViTDecoder.from_pretrained(tmp_path)
        assert not has_batch_norm(loaded)
        assert torch.equal(loaded(z), model(z))
        assert model.fuse_for_inference() is model  # fusing again changes nothing
        assert torch.equal(model(z), loaded(z))


def test_resblock_fold_matches_conv_then_eval_batch_norm():
    torch.manual_seed(0)
    block = ResBlock(8, "batch", "relu", norm_groups=8, fused=False)
    with torch.no_grad():
        block.norm.running_mean.normal_()
        block.norm.running_var.uniform_(0.5, 2.0)
        block.norm.weight.normal_()
        block.norm.bias.normal_()
    x = latents(2, 8, 5, 7)
    with torch.no_grad():
        expected = block.eval()(x)
        block.fuse_batch_norm()
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_group_norm_model_has_no_batch_norm_and_fuse_is_a_no_op():
    model = build("efficientvit-group-silu")
    assert not has_batch_norm(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.fuse_for_inference()
    assert model.config["fused"] is False
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


# --- structure and validation ---------------------------------------------------------------------------------


def test_duplicating_shortcuts_follow_dc_ae():
    """project_in adds the latent with each channel repeated; an upsample adds its input repeated to 4*C_out
    channels and pixel-shuffled, i.e. output channel c at sub-pixel (a, b) is input channel (4c + 2a + b) // r."""
    model = build("efficientvit", latent_channels=4)
    with torch.no_grad():
        for conv in (model.project_in, model.stages[0][0].conv):
            conv.weight.zero_()
            conv.bias.zero_()
        z = latents(1, 4, 3, 3)
        x = model.project_in(z) + efficientvit.duplicate_channels(z, 32)
        assert torch.equal(x, z.repeat_interleave(8, dim=1))
        upsampled = model.stages[0][0](x)  # 32 -> 16 channels: repeats = 4 * 16 / 32 = 2
    for c, a, b in [(0, 0, 0), (3, 1, 0), (15, 1, 1)]:
        assert torch.equal(upsampled[0, c, a::2, b::2], x[0, (4 * c + 2 * a + b) // 2])


def test_spatial_factor_follows_the_stages():
    assert build("efficientvit").spatial_factor == 8
    four_x = EfficientViTDecoder(widths=(16, 16, 32), depths=(1, 1, 1), norm_groups=8)  # no head x2
    assert four_x.spatial_factor == 4
    assert four_x(latents(1, 4, 3, 3)).shape == (1, 3, 12, 12)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(widths=(16, 32), depths=(1,)), "one entry per stage"),
        (dict(widths=(16, 32), depths=(1, -1)), "non-negative"),
        (dict(widths=(16, 32), depths=(1, 1), norm="layer"), "norm must be one of"),
        (dict(widths=(16, 32), depths=(1, 1), act="gelu"), "act must be one of"),
        (dict(widths=(16, 32), depths=(1, 1), block_types=("res", "conv")), "block type must be one of"),
        (dict(widths=(16, 30), depths=(1, 1), latent_channels=4), "multiple of latent_channels"),
        (dict(widths=(20, 32), depths=(1, 1), norm_groups=4), "4\\*20 to be a multiple of 32"),
        (dict(widths=(16, 32), depths=(1, 1), block_types="attn", head_dim=12, norm_groups=8), "head_dim 12"),
    ],
)
def test_efficientvit_refuses_bad_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EfficientViTDecoder(**kwargs)


def test_vit_refuses_bad_configs():
    with pytest.raises(ValueError, match="not divisible by 5 heads"):
        ViTDecoder(dim=32, depth=1, num_heads=5)
    with pytest.raises(ValueError, match="divisible by 4"):
        ViTDecoder(dim=30, depth=1, num_heads=2)


@pytest.mark.parametrize("name", list(TINY))
def test_wrong_latent_channels_are_refused(name):
    with pytest.raises(ValueError, match="expected latents of shape \\(B, 4, h, w\\)"):
        build(name)(latents(1, 16, 4, 4))


@pytest.mark.parametrize("shape", [(1, 4, 5, 4), (1, 4, 4, 7)])
def test_vit_latent_not_a_multiple_of_the_patch_is_refused(shape):
    with pytest.raises(ValueError, match="not a multiple of the latent patch 2"):
        build("vit-patch2")(latents(*shape))


def test_sincos_position_encoding_any_grid():
    encoding = sincos_position_encoding(3, 5, 8)
    assert encoding.shape == (15, 8)
    row, col = 2, 4
    token = encoding[row * 5 + col]
    frequencies = torch.tensor([1.0, 0.01])  # 10000 ** (-i / 2)
    expected = torch.cat([(row * frequencies).sin(), (row * frequencies).cos(),
                          (col * frequencies).sin(), (col * frequencies).cos()])
    torch.testing.assert_close(token, expected)
    assert torch.equal(sincos_position_encoding(6, 5, 8)[:15], encoding)  # a taller grid extends the same rows


def test_vit_head_bias_is_added_by_patch_unembed():
    """Each token's head output is one 8q x 8q patch, (row, col, RGB) with RGB fastest, plus the head's bias."""
    model = build("vit-patch1").eval()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.arange(model.head.bias.numel(), dtype=torch.float32))
        image = model(latents(1, 4, 2, 3))
    assert image.shape == (1, 3, 16, 24)
    for y, x, c in [(0, 0, 0), (3, 5, 2), (15, 23, 1)]:
        assert image[0, c, y, x] == ((y % 8) * 8 + x % 8) * 3 + c


# --- stats ----------------------------------------------------------------------------------------------------


def test_flops_of_a_tiny_vit_match_the_formula():
    dim, depth, tokens, patch = 32, 2, 4 * 6, 8
    model = build("vit-patch1")
    per_block = 2 * tokens * (3 * dim * dim + dim * dim + 2 * 4 * dim * dim) + 2 * 2 * tokens * tokens * dim
    expected = 2 * tokens * 4 * dim + depth * per_block + 2 * tokens * dim * patch * patch * 3
    assert flops(model, (1, 4, 4, 6)) == expected
    assert count_params(model) == sum(p.numel() for p in model.parameters())
    assert flops(model, (2, 4, 4, 6)) == 2 * expected
