"""Lightweight ViT decoders: presets, shapes, strict save/load, fused ops against their references, torch.compile,
gradients, a short training run, parameter and FLOP counts (the EfficientViT presets are DC-AE configurations:
tests/test_dcae.py).

Most tests use tiny configs (fp32, CPU); the full presets are built on the meta device to check sizes cheaply."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import compile_fullgraph, edit_weights, fused_vs_reference_error, needs_interpreter, relative_error
from tolerances import DECODER_FP32_REL
from torch import nn

from fastdec.models import vit
from fastdec.models.dcae import DCAEDecoder
from fastdec.models.stats import count_params, flops
from fastdec.models.vit import Attention, ViTDecoder, sincos_position_encoding

# Tiny configs, 8x upsampling each.
TINY = {
    "vit-patch1": (ViTDecoder, dict(dim=32, depth=2, num_heads=2, latent_patch=1)),
    "vit-patch2": (ViTDecoder, dict(dim=32, depth=2, num_heads=2, latent_patch=2)),
}
PRESETS = vit.PRESETS

# Parameters with 4 latent channels: ViT-S/B depth 12 plus patch embed (2x2 conv) and a 768-wide head.
PRESET_PARAMS = {"vit-s": 21_596_544, "vit-b": 85_659_648}
# Forward FLOPs (2 per multiply-add) on one 64x64 latent, i.e. a 512x512 image.
PRESET_GFLOPS_512 = {"vit-s": 63.4, "vit-b": 213.8}


def build(name: str, latent_channels: int = 4, seed: int = 0, **overrides) -> nn.Module:
    cls, kwargs = TINY[name]
    torch.manual_seed(seed)
    return cls(**{**kwargs, "latent_channels": latent_channels, **overrides})


def latents(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


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


def test_vit_presets_use_attention():
    for name in ("vit-s", "vit-b"):
        cls, kwargs = PRESETS[name]
        with torch.device("meta"):
            model = cls(**kwargs)
        heads = [m for m in model.modules() if isinstance(m, Attention)]
        assert heads and all(32 <= m.qkv.in_features // m.num_heads <= 128 for m in heads)


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


@pytest.mark.parametrize("name", list(TINY))
def test_save_and_load_round_trip_is_bitwise(name, tmp_path):
    model = build(name, scaling_factor=0.5, shift_factor=0.1)
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
@pytest.mark.parametrize("name", ["vit-patch2"])
def test_strict_loading_names_the_problem(name, edit, message, tmp_path):
    build(name).save_pretrained(tmp_path)
    edit_weights(tmp_path, edit, "model.safetensors")
    with pytest.raises(ValueError, match=message):
        type(build(name)).from_pretrained(tmp_path)


def test_loading_refuses_another_class_and_another_config(tmp_path):
    build("vit-patch2").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="describes a ViTDecoder"):
        DCAEDecoder.from_pretrained(tmp_path)
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


@pytest.mark.parametrize("name", ["vit-patch2"])
def test_compiles_to_one_graph(name):
    model = build(name).eval()
    z = latents(1, 4, 4, 4)
    with torch.no_grad():
        assert relative_error(*compile_fullgraph(model, z)) <= DECODER_FP32_REL
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["vit-patch1"])
def test_every_parameter_gets_a_gradient(name):
    model = build(name).train()
    image = model(latents(2, 4, 4, 4))
    (image * latents(*image.shape, seed=5)).sum().backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, f"{param_name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{param_name} has a non-finite gradient"
        assert param.grad.abs().max() > 0, f"{param_name} got an all-zero gradient"


@pytest.mark.parametrize("name", ["vit-patch2"])
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


# --- structure and validation ---------------------------------------------------------------------------------


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
