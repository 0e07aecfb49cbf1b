"""fastdec.models.wan: the exact Wan 2.1 / Qwen-Image VAE decoder against diffusers' AutoencoderKLWan and
AutoencoderKLQwenImage on random weights (tiny widths, odd sizes, 1 to 21 latent frames), on the fused ops (Triton
through the interpreter) and the reference ops; chunked decoding against frame-by-frame decoding; loading from
instances, folders and Hub ids; the latent convention; bad input."""

from __future__ import annotations

import functools
import weakref

import pytest
import torch
from diffusers import AutoencoderKLQwenImage, AutoencoderKLWan
from helpers import compile_fullgraph, edit_config, edit_weights, fused_on_cpu, jitter, relative_error
from safetensors.torch import load_file
from tolerances import DECODER_FP32_REL
from torch.utils._python_dispatch import TorchDispatchMode

import fastdec
from fastdec import ops
from fastdec.models import wan
from fastdec.models.wan import AttentionBlock, RMSNorm, WanDecoder

FUSED_ON_CPU = fused_on_cpu("rms_norm_act", "attention")
MEAN, STD = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0]
TINY = dict(base_dim=4, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1, latents_mean=MEAN, latents_std=STD)
# Chunk equality: the same frames up to the summation order of convolutions over runs of different lengths.
CHUNK_REL = 1e-5


def tiny_vae(cls=AutoencoderKLWan, seed: int = 0, **config):
    """A diffusers Wan-design VAE with random weights; the norms' gamma moved off 1 (diffusers inits it to 1)."""
    torch.manual_seed(seed)
    return jitter(cls(**{**TINY, **config}).eval(), lambda name: name.endswith("gamma"))


def latents(frames: int, height: int = 3, width: int = 5, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, frames, height, width, generator=torch.Generator().manual_seed(seed))


@functools.cache
def diffusers_output(frames: int) -> tuple[AutoencoderKLWan, torch.Tensor, torch.Tensor]:
    """(vae, VAE-space z, AutoencoderKLWan.decode(z)): diffusers' frame-by-frame loop is slow, so once per size."""
    vae, z = tiny_vae(), latents(frames)
    with torch.no_grad():
        return vae, z, vae.decode(z).sample


def expected_launches(model: WanDecoder) -> dict[str, int]:
    """A whole-clip forward: one rms_norm_act per RMSNorm module, one attention per AttentionBlock."""
    return {
        "rms_norm_act_triton": sum(isinstance(m, RMSNorm) for m in model.modules()),
        "attention_triton": sum(isinstance(m, AttentionBlock) for m in model.modules()),
    }


@pytest.mark.parametrize(
    ("frames", "fused"), [(1, True), (2, True), (5, True), (21, True), (1, False), (2, False), (5, False)]
)
def test_matches_diffusers(frames, fused, triton_launches):
    if fused and not FUSED_ON_CPU:
        pytest.skip("the Triton kernels do not run on CPU here (set FASTDEC_TRITON_INTERPRET=1 TRITON_INTERPRET=1)")
    vae, z, reference = diffusers_output(frames)
    model = WanDecoder.from_diffusers(vae)
    with torch.no_grad():
        if fused:
            out = model(z)
            assert dict(triton_launches) == expected_launches(model)
        else:
            with ops.reference_ops():
                out = model(z)
            assert not triton_launches
    assert out.shape == (1, 3, 1 + 4 * (frames - 1), 24, 40) == reference.shape
    assert relative_error(out, reference) <= DECODER_FP32_REL
    assert (reference.abs() < 1).float().mean() > 0.95, "the clamp must not hide the comparison"


def test_qwen_image_vae_matches_diffusers():
    """AutoencoderKLQwenImage: the same design and keys (its output channels are called input_channels)."""
    vae = tiny_vae(AutoencoderKLQwenImage, seed=3)
    model = fastdec.load(vae)
    assert isinstance(model, WanDecoder)
    z = latents(2, 5, 3, seed=4)
    with torch.no_grad(), ops.reference_ops():
        assert relative_error(model(z), vae.decode(z).sample) <= DECODER_FP32_REL


def test_chunked_decode_equals_frame_by_frame():
    """Chunks of 1 latent frame are diffusers' schedule; every other chunk size, and the whole clip, gives the
    same frames, including the first frame (the temporal upsamplers' special case) at every chunk boundary."""
    model = WanDecoder.from_diffusers(tiny_vae())
    x = latents(5, seed=5)
    with torch.no_grad(), ops.reference_ops():
        frame_by_frame = model.decode(x, chunk_frames=1)
        assert frame_by_frame.shape == (1, 17, 3, 24, 40)
        for chunk_frames in (2, 3, 100):
            assert relative_error(model.decode(x, chunk_frames=chunk_frames), frame_by_frame) <= CHUNK_REL


def test_chunks_carry_only_two_frames_per_causal_conv(monkeypatch):
    """Bounded memory: decode() runs ceil(T / chunk_frames) chunks, and between chunks each causal conv keeps only
    its last two input frames (one frame's worth of activations per conv, whatever the clip length)."""
    model = WanDecoder.from_diffusers(tiny_vae())
    chunks, caches = [], []
    decode_chunk = WanDecoder.decode_chunk

    def spy(self, z, cache):
        out = decode_chunk(self, z, cache)
        chunks.append(z.shape[2])
        caches.append([None if t is None else t.shape[2] for t in cache])
        return out

    monkeypatch.setattr(WanDecoder, "decode_chunk", spy)
    with torch.no_grad(), ops.reference_ops():
        model.decode(latents(7), chunk_frames=3)
    assert chunks == [3, 3, 1]
    assert all(frames == [2] * model.decoder.cache_slots for frames in caches)


def test_auto_chunk_size_follows_the_memory_budget(monkeypatch):
    model = WanDecoder.from_diffusers(tiny_vae())
    x = latents(5)
    assert model.auto_chunk_frames(x) == 5  # a tiny clip fits: one call
    monkeypatch.setattr(wan, "WHOLE_CLIP_BUDGET_BYTES", 2 * 4 * 4 * 24 * 40 * 4 * 4)
    assert model.auto_chunk_frames(x) == 2
    monkeypatch.setattr(wan, "WHOLE_CLIP_BUDGET_BYTES", 1)
    assert model.auto_chunk_frames(x) == 1


def test_decode_maps_diffusion_latents_like_wan_pipeline():
    """decode() takes the latents a pipeline produces: WanPipeline decodes latents / (1 / std) + mean, then
    postprocesses (x / 2 + 0.5).clamp(0, 1); frames come back (B, T, 3, H, W)."""
    vae = tiny_vae(seed=6)
    model = WanDecoder.from_diffusers(vae)
    x = latents(2, batch=2, seed=7) * 2
    mean = torch.tensor(MEAN).view(1, 4, 1, 1, 1)
    std = 1.0 / torch.tensor(STD).view(1, 4, 1, 1, 1)
    with torch.no_grad(), ops.reference_ops():
        frames = model.decode(x)
        video = vae.decode(x / std + mean).sample
    expected = (video / 2 + 0.5).clamp(0, 1).transpose(1, 2)
    assert frames.shape == (2, 5, 3, 24, 40) and model.frames_out(2) == 5
    torch.testing.assert_close(frames, expected, rtol=0, atol=DECODER_FP32_REL * 2)


@pytest.fixture
def vae_folder(tmp_path):
    vae = tiny_vae(seed=8)
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    return tmp_path / "vae", vae


def test_folder_pipeline_folder_and_hub_id_load(vae_folder, offline, monkeypatch):
    import huggingface_hub

    folder, vae = vae_folder
    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))

    def fake_download(repo_id, filename, subfolder=None, **kwargs):
        path = folder.parent / (subfolder or "") / filename
        if not path.is_file():
            raise huggingface_hub.errors.EntryNotFoundError(f"{filename} not in {repo_id}/{subfolder}")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    z = latents(2, seed=9)
    with torch.no_grad():
        reference = vae.decode(z).sample
    for source in (folder, folder.parent, "org/wan-pipeline"):  # VAE folder, pipeline folder, Hub pipeline repo
        model = fastdec.load(source)
        assert isinstance(model, WanDecoder)
        assert set(model.state_dict()) == {k for k in state if k.startswith(("decoder.", "post_quant_conv."))}
        with torch.no_grad(), ops.reference_ops():
            assert relative_error(model(z), reference) <= DECODER_FP32_REL


def test_save_and_load_round_trip(tmp_path):
    model = WanDecoder.from_diffusers(tiny_vae(seed=10))
    model.save_pretrained(tmp_path)
    loaded = fastdec.load(tmp_path)
    assert isinstance(loaded, WanDecoder) and loaded.config == model.config
    z = latents(2)
    with torch.no_grad(), ops.reference_ops():
        assert torch.equal(loaded(z), model(z))


@pytest.mark.parametrize(
    ("edit", "named_key"),
    [
        (lambda s: s.pop("decoder.norm_out.gamma"), "decoder.norm_out.gamma"),
        (lambda s: s.update({"decoder.extra.weight": torch.zeros(1)}), "decoder.extra.weight"),
        (lambda s: s.update({"post_quant_conv.weight": torch.zeros(4, 4, 1, 1)}), "post_quant_conv.weight"),
    ],
    ids=["missing", "unexpected", "wrong_shape"],
)
def test_strict_loading_names_the_bad_key(vae_folder, edit, named_key):
    folder, _ = vae_folder
    edit_weights(folder, edit)
    with pytest.raises(ValueError, match=named_key.replace(".", r"\.")):
        fastdec.load(folder)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"is_residual": True}, "is_residual"),
        ({"patch_size": 2}, "patch_size"),
        ({"_class_name": "AutoencoderKLLTXVideo"}, "AutoencoderKLLTXVideo"),
    ],
)
def test_unsupported_configs_are_refused(vae_folder, change, message):
    folder, _ = vae_folder
    edit_config(folder, change)
    with pytest.raises(ValueError, match=message):
        WanDecoder.from_diffusers(folder)


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: torch.randn(1, 4, 3, 5), ValueError, r"video latents \(B, C, T, h, w\)"),
        (lambda: torch.randn(1, 16, 2, 3, 5), ValueError, "16 channels"),
        (lambda: torch.randn(1, 4, 0, 3, 5), ValueError, "time is 0"),
        (lambda: torch.full((1, 4, 2, 3, 5), float("nan")), ValueError, "NaN"),
        (lambda: torch.ones(1, 4, 2, 3, 5, dtype=torch.int64), TypeError, "float tensor"),
    ],
    ids=["image_latents", "channels", "no_frames", "nan", "int"],
)
def test_bad_latents_get_clear_errors(make, error, message):
    model = WanDecoder(**TINY)
    with pytest.raises(error, match=message):
        model.decode(make())


def test_forward_refuses_other_shapes():
    with pytest.raises(ValueError, match=r"\(B, 4, T, h, w\)"):
        WanDecoder(**TINY)(torch.randn(1, 4, 3, 5))


@pytest.mark.parametrize("chunk_frames", [0, -1, 1.5, True])
def test_bad_chunk_size_is_refused(chunk_frames):
    with pytest.raises(ValueError, match="chunk_frames must be a positive int"):
        WanDecoder(**TINY).decode(latents(2), chunk_frames=chunk_frames)


def test_compiles_to_one_graph():
    model = WanDecoder.from_diffusers(tiny_vae(seed=11))
    with torch.no_grad(), ops.reference_ops():  # dynamo sees the custom ops, whichever backend runs them
        assert relative_error(*compile_fullgraph(model, latents(3))) <= DECODER_FP32_REL


def test_default_architecture_has_diffusers_parameter_names_and_shapes():
    with torch.device("meta"):
        model = WanDecoder()
        vae = AutoencoderKLWan()
    expected = {k: v.shape for k, v in vae.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}
    assert {k: v.shape for k, v in model.state_dict().items()} == expected
    assert model.latents_mean == vae.config.latents_mean and model.latents_std == vae.config.latents_std


def test_fastdec_decode_takes_video_latents():
    """fastdec.decode with 5-D latents and a WanDecoder: frames (B, T_out, 3, H, W), uint8 and PIL outputs."""
    model = WanDecoder.from_diffusers(tiny_vae(seed=12))
    x = latents(2, 4, 6, seed=13)
    with ops.reference_ops():
        frames = fastdec.decode(x, decoder=model)
        pixels = fastdec.decode(x, decoder=model, output="uint8")
        images = fastdec.decode(x, decoder=model, output="pil")
    with torch.no_grad(), ops.reference_ops():
        torch.testing.assert_close(frames, model.decode(x), rtol=0, atol=0)
    assert frames.shape == (1, 5, 3, 32, 48) and pixels.shape == (1, 5, 32, 48, 3) and pixels.dtype == torch.uint8
    assert len(images) == 1 and len(images[0]) == 5 and images[0][0].size == (48, 32)
    with pytest.raises(ValueError, match="add the time axis"):
        fastdec.decode(x[:, :, 0], decoder=model)


def test_cli_writes_an_mp4(tmp_path):
    """``fastdec decode latents.pt --decoder <WanDecoder folder>``: 2 latent frames -> a 5-frame H.264 mp4."""
    av = pytest.importorskip("av", reason="writing mp4 needs PyAV")
    from fastdec.cli import main

    WanDecoder.from_diffusers(tiny_vae(seed=14)).save_pretrained(tmp_path / "wan")
    torch.save(latents(2, 4, 6, seed=15), tmp_path / "clip.pt")
    with ops.reference_ops():
        assert main(["decode", str(tmp_path / "clip.pt"), "--decoder", str(tmp_path / "wan"), "-o",
                     str(tmp_path / "out"), "--chunk-frames", "1", "--no-progress"]) == 0
    with av.open(str(tmp_path / "out" / "clip.mp4")) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (32, 48, 3)


def test_bench_entry_twin_is_the_same_decoder_in_diffusers():
    """``fastdec bench --decoders wan2.1``: the diffusers twin carries the model's weights; the latents are video."""
    from fastdec.bench.decoders import DEFAULT_DECODERS, ENTRIES

    entry = ENTRIES["wan2.1"]
    assert "wan2.1" not in DEFAULT_DECODERS  # opt-in: slow on CPU
    model = WanDecoder.from_diffusers(tiny_vae(seed=16))
    twin, reason = entry.diffusers_twin(model)
    assert reason is None and isinstance(twin, AutoencoderKLWan)
    assert entry.latent_shape(model, 64, 1, 8) == (1, 4, 2, 8, 8)
    assert entry.latent_shape(model, 512, 1, 8) == (1, 4, 21, 64, 64)
    z = latents(2, seed=17)
    with torch.no_grad(), ops.reference_ops():
        assert relative_error(model(z), entry.twin_decode(twin, z)) <= DECODER_FP32_REL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 3-D convolutions on CPU are far too slow")
def test_bf16_error_no_larger_than_diffusers():
    """bf16 against the fp32 reference: fastdec's error at most DECODER_LOW_PRECISION_VS_DIFFUSERS x diffusers' own."""
    from tolerances import DECODER_LOW_PRECISION_VS_DIFFUSERS

    def error_rms(out, ref):
        assert torch.isfinite(out).all(), "non-finite output"
        return ((out.double() - ref.double()).pow(2).mean().sqrt() / ref.double().pow(2).mean().sqrt()).item()

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        vae = tiny_vae(base_dim=96, z_dim=16, latents_mean=wan.WAN21_LATENTS_MEAN, latents_std=wan.WAN21_LATENTS_STD,
                       num_res_blocks=2).cuda()
        z = torch.randn(1, 16, 5, 24, 40, generator=torch.Generator().manual_seed(18)).cuda()
        with torch.no_grad():
            reference = vae.decode(z).sample
            model = WanDecoder.from_diffusers(vae, device="cuda", dtype=torch.bfloat16)
            ours = error_rms(model(z.bfloat16()), reference)
            theirs = error_rms(vae.to(torch.bfloat16).decode(z.bfloat16()).sample, reference)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    assert ours <= DECODER_LOW_PRECISION_VS_DIFFUSERS * theirs, (ours, theirs)


class ConvOutputsAlive(TorchDispatchMode):
    """At each convolution, how many earlier convolution outputs are still alive."""

    def __init__(self):
        super().__init__()
        self.outputs, self.alive_at_each = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.alive_at_each.append(sum(ref() is not None for ref in self.outputs))
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.convolution.default:
            self.outputs.append(weakref.ref(out))
        return out


def test_residual_block_frees_conv1s_output_before_conv2():
    """H200, 2026-12-04: Wan 2.1's 480x832 decode peaked 274 MiB above diffusers' because conv1's output (a chunk
    of full-resolution frames) stayed alive through conv2."""
    block = wan.ResidualBlock(8, 8).eval()
    with torch.no_grad(), ops.reference_ops(), ConvOutputsAlive() as convs:
        block(torch.randn(1, 8, 3, 6, 6), None)
    assert convs.alive_at_each == [0, 0]


@torch.no_grad()
def test_no_up_block_input_outlives_its_first_layer():
    """The decoder runs layer by layer, so that an up block's input (a chunk of frames at the block's resolution) is
    freed once the block's first resnet has run, not held through the block."""
    decoder = wan.WanDecoder(base_dim=8, z_dim=4, dim_mult=(1, 1), num_res_blocks=1, temporal_downsample=(False,),
                             latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4).eval()
    block = decoder.decoder.up_blocks[-1]
    block_input, alive_at_second = {}, []
    block.resnets[0].register_forward_pre_hook(lambda module, args: block_input.update(x=weakref.ref(args[0])))
    block.resnets[1].register_forward_pre_hook(
        lambda module, args: alive_at_second.append(block_input["x"]() is not None))
    decoder.decode(torch.randn(1, 4, 2, 4, 4), check_finite=False)
    assert alive_at_second and not any(alive_at_second)
