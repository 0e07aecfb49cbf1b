"""tae-temporal: the preset (fastdec.load, RandomWeightsWarning, the paper's architecture), the temporal mid-block
against diffusers' MidBlockTemporalDecoder with its weights loaded strictly, training (every parameter gets a
gradient, Adam lowers a loss), strict save/load, the fused ops, torch.compile, and swap_vae in an SVD pipeline's
decode step."""

from __future__ import annotations

import math
import types

import pytest
import torch
from diffusers.models.unets.unet_3d_blocks import MidBlockTemporalDecoder
from helpers import compile_fullgraph, edit_weights, fused_vs_reference_error, jitter, needs_interpreter, relative_error
from tolerances import DECODER_FP32_REL
from torch import nn

import fastdec
from fastdec import ops
from fastdec.api import RandomWeightsWarning
from fastdec.models.autoencoder_kl import SelfAttention
from fastdec.models.base import load_state_dict_strict
from fastdec.models.tae_temporal import TAETemporalDecoder

# Width 64 with heads of 32 (2 heads, as the paper's 192 = 2 x 96), two stages: 2x upsampling.
TINY = dict(width=64, blocks=(1, 1), attention_head_dim=32)


def tiny(seed: int = 0, **overrides) -> TAETemporalDecoder:
    torch.manual_seed(seed)
    return TAETemporalDecoder(**{**TINY, **overrides})


# One stage (no upsampling) at width 32, one head: the smallest graph with every kind of layer, for compile and
# training loops.
SMALLEST = dict(width=32, blocks=(1,), attention_head_dim=32)


def latents(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_preset_is_the_papers_architecture():
    with pytest.warns(RandomWeightsWarning, match="tae-temporal"):
        model = fastdec.load("tae-temporal")
    assert isinstance(model, TAETemporalDecoder) and not model.training
    assert model.config == dict(latent_channels=4, width=192, blocks=[3, 2, 2, 1], attention_head_dim=96,
                                mid_block_layers=2)
    assert (model.latent_ndim, model.scaling_factor, model.shift_factor) == (5, 1.0, 0.0)
    (attention,) = [m for m in model.modules() if isinstance(m, SelfAttention)]
    assert attention.heads == 2 and attention.to_q.weight.shape == (192, 192)
    assert sum(isinstance(m, nn.Upsample) and m.mode == "bilinear" for m in model.modules()) == 3
    assert sum(isinstance(m, nn.Conv3d) for m in model.modules()) == 4  # two temporal resnets, two convs each
    with torch.no_grad():
        frames = model.decode(latents(1, 4, 2, 2, 3))
    assert frames.shape == (1, 2, 3, 16, 24) and frames.min() >= 0 and frames.max() <= 1


def test_mid_block_loads_diffusers_weights_and_matches():
    """A MidBlockTemporalDecoder built in diffusers with the same config: its state dict loads strictly into
    ``mid_block`` (same names and shapes) and both compute the same."""
    model = tiny()
    torch.manual_seed(1)
    block = MidBlockTemporalDecoder(64, 64, attention_head_dim=32, num_layers=2).eval()
    jitter(block, lambda name: True, scale=0.2)
    load_state_dict_strict(model.mid_block, block.state_dict(), "diffusers MidBlockTemporalDecoder")
    x = latents(6, 64, 5, 4, seed=2)
    with torch.no_grad():
        reference = block(x, image_only_indicator=torch.zeros(2, 3))
        assert relative_error(model.mid_block(x, 3), reference) <= DECODER_FP32_REL
        with ops.reference_ops():
            assert relative_error(model.mid_block(x, 3), reference) <= DECODER_FP32_REL


def test_frames_of_a_clip_interact_and_clips_do_not():
    """Changing latent frame 0 of clip 0 changes every frame of clip 0 (the temporal resnets' (3, 1, 1) convs, and
    their GroupNorm statistics over the whole clip) and nothing in clip 1."""
    model = tiny()
    z = latents(2, 4, 6, 3, 3)
    changed = z.clone()
    changed[0, :, 0] += 1
    with torch.no_grad(), ops.reference_ops():
        before, after = model(z), model(changed)
    moved = (after - before).abs().flatten(2).amax(-1)  # (B, T)
    assert moved[0].min() > 0 and moved[1].max() == 0


def test_every_parameter_gets_a_gradient_and_adam_lowers_the_loss():
    model = tiny(**SMALLEST).train()
    z = latents(1, 4, 3, 4, 4)
    target = torch.rand(1, 3, 3, 4, 4, generator=torch.Generator().manual_seed(7))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for step in range(6):
        optimizer.zero_grad()
        with ops.reference_ops():  # the same ops and autograd; the interpreter is slow for 6 steps
            loss = nn.functional.mse_loss(model(z), target)
            loss.backward()
        if step == 0:
            for name, param in model.named_parameters():
                assert param.grad is not None and param.grad.abs().max() > 0, f"{name} got no gradient"
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < 0.7 * losses[0], losses


def test_save_and_load_round_trip_is_strict(tmp_path):
    model = tiny().eval()
    model.save_pretrained(tmp_path)
    loaded = fastdec.load(tmp_path)
    assert isinstance(loaded, TAETemporalDecoder) and loaded.config == model.config
    z = latents(1, 4, 2, 4, 4)
    with torch.no_grad():
        assert torch.equal(loaded(z), model(z))
    edit_weights(tmp_path, lambda state: state.pop("mid_block.resnets.1.time_mixer.mix_factor"), "model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \(1\): mid_block\.resnets\.1\.time_mixer\.mix_factor"):
        fastdec.load(tmp_path)


@needs_interpreter("group_norm_act", "attention")
def test_fused_ops_match_reference_ops(triton_launches):
    model = tiny().eval()
    expected = {"group_norm_act_triton": sum(isinstance(m, nn.GroupNorm) for m in model.modules()),
                "attention_triton": 1}
    assert fused_vs_reference_error(model, latents(1, 4, 2, 4, 4), triton_launches, expected) <= DECODER_FP32_REL


def test_compiles_to_one_graph():
    model = tiny(**SMALLEST).eval()
    with torch.no_grad(), ops.reference_ops():
        assert relative_error(*compile_fullgraph(model, latents(1, 4, 3, 4, 4))) <= DECODER_FP32_REL
    torch._dynamo.reset()


def test_frame_count_check_accepts_a_dynamic_frame_count():
    """Under torch.compile with the frame axis traced as dynamic (dynamic=True, or automatically after a second clip
    length), num_frames is a SymInt: the frame check takes it (and still refuses clips that do not divide)."""
    model = tiny(**SMALLEST)

    def checked(z: torch.Tensor) -> torch.Tensor:
        model.check_frames(z, z.shape[0] // 2)
        return z + 1

    compiled = torch.compile(checked, fullgraph=True, dynamic=True, backend="eager")
    for frames in (4, 6):
        z = latents(frames, 4, 2, 2)
        assert torch.equal(compiled(z), z + 1)
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="not whole clips"):
        model.check_frames(latents(5, 4, 2, 2), 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [(dict(width=48), "multiple of 32"), (dict(attention_head_dim=48), "attention heads of 48"),
     (dict(mid_block_layers=1), "mid_block_layers must be >= 2"), (dict(blocks=()), "blocks must be")],
)
def test_bad_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TAETemporalDecoder(**{**TINY, **kwargs})


def test_swap_into_an_svd_pipeline_decode_step():
    """StableVideoDiffusionPipeline.decode_latents, run on the swapped VAE: per-frame latents in chunks."""
    from diffusers import AutoencoderKLTemporalDecoder, StableVideoDiffusionPipeline

    from fastdec.diffusers import swap_vae

    torch.manual_seed(0)
    vae = AutoencoderKLTemporalDecoder(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2)
    pipe = types.SimpleNamespace(vae=vae, vae_scale_factor=2)  # all the decode step reads
    model = tiny()
    wrapper = swap_vae(pipe, model)
    x = latents(1, 5, 4, 4, 4)  # the pipeline's (B, T, C, h, w)
    with torch.no_grad(), ops.reference_ops():
        frames = StableVideoDiffusionPipeline.decode_latents(pipe, x, num_frames=5, decode_chunk_size=3)
        expected = model.decode(x.transpose(1, 2), decode_chunk_size=3)  # (B, T, 3, H, W) in [0, 1]
    assert pipe.vae is wrapper.original and frames.shape == (1, 3, 5, 8, 8)  # (B, 3, T, H, W) in [-1, 1]
    torch.testing.assert_close((frames * 0.5 + 0.5).clamp(0, 1).transpose(1, 2), expected, rtol=0, atol=1e-5)


def test_fastdec_decode_and_the_cli_take_video_latents(offline, tmp_path):
    """fastdec.decode with (B, C, T, h, w) latents returns (B, T, 3, H, W) (uint8: (B, T, H, W, 3)); the CLI writes
    an mp4 of T frames."""
    av = pytest.importorskip("av")
    from fastdec.cli import main

    model = tiny().eval()
    model.save_pretrained(tmp_path / "decoder")
    z = latents(2, 4, 3, 4, 5)
    with ops.reference_ops():
        frames = fastdec.decode(z, model)
        pixels = fastdec.decode(z, model, output="uint8")
        with torch.no_grad():
            assert torch.equal(frames, model.decode(z))
        assert frames.shape == (2, 3, 3, 8, 10) and pixels.shape == (2, 3, 8, 10, 3)
        assert torch.equal(pixels, (frames * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2))
        torch.save(z[:1], tmp_path / "clip.pt")
        args = ["decode", str(tmp_path / "clip.pt"), "--decoder", str(tmp_path / "decoder"), "-o", str(tmp_path),
                "--fps", "8", "--no-progress"]
        assert main(args) == 0
    with av.open(str(tmp_path / "clip.mp4")) as container:
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(decoded) == 3 and decoded[0].shape == (8, 10, 3)
