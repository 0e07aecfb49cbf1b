"""swap_vae keeps a pipeline an ordinary diffusers pipeline (issue 20), for every VAE class fastdec takes, with an
exact decoder and with a tiny one: the VAE object, class, config and encode stay; decode returns what diffusers'
returns; save_pretrained writes the original VAE byte for byte; the VAE's tiling and slicing switches run fastdec's
exact slabs and per-sample decoding; .to(), dtypes, accelerate's offloading and torch.compile work; the exact
decoder shares the VAE's weights (one copy); unswap_vae restores the original.

The pipeline is the smallest diffusers pipeline, the VAE alone (what save/load, offload and .to() act on); the real
pipelines (DiT, SD, SDXL, FLUX.2, Wan, SVD) are in test_diffusers_swap.py, test_flux2.py, test_wan_pipeline.py and
test_svd.py. Tiny random components, CPU, the ops' references (their kernels are tested on their own).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    AutoencoderKLQwenImage,
    AutoencoderKLTemporalDecoder,
    AutoencoderKLWan,
    AutoencoderTiny,
    DiffusionPipeline,
)
from diffusers.models.autoencoders.autoencoder_kl_flux2 import AutoencoderKLFlux2
from diffusers.models.autoencoders.vae import DecoderOutput
from helpers import relative_error
from tolerances import DECODER_FP32_REL

import fastdec
from fastdec import ops
from fastdec.diffusers import FastdecVAE, swap_vae, swapped, unswap_vae, weight_bytes
from fastdec.models.tae_temporal import TAETemporalDecoder
from fastdec.models.taehv import TAEHVDecoder
from fastdec.models.taesd import TAESDDecoder


class VaeOnlyPipeline(DiffusionPipeline):
    """A diffusers pipeline whose one component is the VAE: decode(latents) -> the VAE's decode(...).sample."""

    model_cpu_offload_seq = "vae"

    def __init__(self, vae):
        super().__init__()
        self.register_modules(vae=vae)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, **kwargs) -> torch.Tensor:
        sample = self.vae.decode(latents, **kwargs).sample
        self.maybe_free_model_hooks()
        return sample


def randomised(vae: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial norm affines, gammas, mix factors and latent statistics (diffusers initialises them to 1 and 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in (*vae.named_parameters(), *vae.named_buffers()):
            if tensor.is_floating_point() and any(key in name for key in ("norm", "gamma", "mix_factor", "running")):
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.3)
    return vae.eval()


WAN_STATS = dict(latents_mean=[0.1 * i for i in range(16)], latents_std=[1.0 + 0.1 * i for i in range(16)])


@dataclass
class Case:
    name: str
    vae: Callable[[], torch.nn.Module]
    tiny: Callable[[], fastdec.Decoder]  # a small decoder of the same latent space and upsampling
    latents: tuple[int, ...]  # (B, C, ..., h, w), h the latent rows that tiling splits
    kwargs: dict  # what the pipeline passes to decode besides the latents


def _seeded(make):
    def build():
        torch.manual_seed(0)
        return make()
    return build


CASES = [
    Case("AutoencoderKL", _seeded(lambda: randomised(AutoencoderKL(
        block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1, sample_size=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2))),
        _seeded(lambda: TAESDDecoder("taesd", width=16, blocks=(1, 1))), (2, 4, 10, 6), {}),
    Case("AutoencoderKL-latents-mean-std", _seeded(lambda: randomised(AutoencoderKL(
        block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1, sample_size=8, scaling_factor=0.5,
        latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0],
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2))),
        _seeded(lambda: TAESDDecoder("taesd", width=16, blocks=(1, 1))), (2, 4, 10, 6), {}),
    Case("AutoencoderKLFlux2", _seeded(lambda: randomised(AutoencoderKLFlux2(
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=16))),
        _seeded(lambda: TAESDDecoder("taef2", width=16, blocks=(1, 1, 1, 1))), (2, 32, 6, 3), {}),
    Case("AutoencoderDC", _seeded(lambda: randomised(AutoencoderDC(
        latent_channels=8, attention_head_dim=4, encoder_block_out_channels=(8,) * 3,
        encoder_layers_per_block=(0,) * 3, encoder_qkv_multiscales=((),) * 3, encoder_block_types="ResBlock",
        decoder_block_out_channels=(8, 8, 16), decoder_layers_per_block=(1, 1, 1),
        decoder_qkv_multiscales=((), (), (5,)), decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_norm_types="rms_norm", decoder_act_fns="silu"))),
        _seeded(lambda: TAESDDecoder("tae-192", latent_channels=8, width=16, blocks=(1, 1, 1))), (2, 8, 6, 3), {}),
    Case("AutoencoderKLWan", _seeded(lambda: randomised(AutoencoderKLWan(
        base_dim=4, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, **WAN_STATS))),
        _seeded(lambda: TAEHVDecoder("taew2_1")), (2, 16, 2, 6, 3), {}),
    Case("AutoencoderKLQwenImage", _seeded(lambda: randomised(AutoencoderKLQwenImage(
        base_dim=4, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, **WAN_STATS))),
        _seeded(lambda: TAEHVDecoder("taew2_1")), (2, 16, 1, 6, 3), {}),
    Case("AutoencoderKLTemporalDecoder", _seeded(lambda: randomised(AutoencoderKLTemporalDecoder(
        block_out_channels=(32, 64), layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2))),
        _seeded(lambda: TAETemporalDecoder(width=32, blocks=(1, 1), attention_head_dim=16)), (6, 4, 6, 3),
        {"num_frames": 3}),
    Case("AutoencoderTiny", _seeded(lambda: randomised(AutoencoderTiny(
        encoder_block_out_channels=(16, 16), decoder_block_out_channels=(16, 16), num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1), latent_channels=4))),
        _seeded(lambda: TAESDDecoder("taesd", width=8, blocks=(1, 1))), (2, 4, 10, 6), {}),
]
IDS = [case.name for case in CASES]


@pytest.fixture(autouse=True)
def reference_ops():
    with ops.reference_ops():
        yield


def latents(case: Case, seed: int = 0) -> torch.Tensor:
    return torch.randn(*case.latents, generator=torch.Generator().manual_seed(seed))


def build(case: Case) -> tuple[VaeOnlyPipeline, torch.Tensor, torch.Tensor]:
    """(pipeline, latents, the unswapped VAE's decode of them)."""
    pipe = VaeOnlyPipeline(case.vae())
    pipe.set_progress_bar_config(disable=True)
    z = latents(case)
    with torch.no_grad():
        reference = pipe.vae.decode(z, **case.kwargs).sample
    return pipe, z, reference


def decoder_of(case: Case, kind: str, vae) -> fastdec.Decoder:
    return fastdec.load(vae) if kind == "exact" else case.tiny()


def own_tensors(adapter: FastdecVAE) -> list[torch.Tensor]:
    """The fastdec decoder's tensors that are not the VAE's."""
    return [(module._parameters if kind == "p" else module._buffers)[name]
            for module, name, kind in adapter.weights.own]


def check_output(out: torch.Tensor, reference: torch.Tensor, kind: str, adapter: FastdecVAE, z: torch.Tensor,
                 case: Case) -> None:
    """diffusers' shape and dtype; exact decoders: diffusers' values, tiny ones: the fastdec decoder's."""
    assert out.shape == reference.shape and out.dtype == reference.dtype and torch.isfinite(out).all()
    if kind == "exact":
        assert relative_error(out, reference) <= DECODER_FP32_REL
    else:
        with torch.no_grad():
            expected = adapter(z.to(out.dtype), case.kwargs.get("num_frames"))
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


def encode_input(case: Case) -> torch.Tensor:
    frames = (1,) if len(case.latents) == 5 else ()
    return torch.rand(1, 3, *frames, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1


def encoded(vae, images: torch.Tensor) -> torch.Tensor:
    """The tensor of an encode output (the posterior's mean for KL VAEs)."""
    with torch.no_grad():
        first = vae.encode(images)[0]
    return first if isinstance(first, torch.Tensor) else first.mean


@pytest.mark.parametrize("kind", ["exact", "tiny"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_vae_stays_itself_and_decode_returns_what_diffusers_returns(case, kind):
    pipe, z, reference = build(case)
    vae, config = pipe.vae, dict(pipe.vae.config)
    state = {name: tensor.clone() for name, tensor in vae.state_dict().items()}
    images = encode_input(case)
    before = encoded(vae, images)
    adapter = swap_vae(pipe, decoder_of(case, kind, vae))
    assert pipe.vae is vae and type(vae).__name__ == case.name.split("-")[0] and dict(vae.config) == config
    assert pipe.config.vae == ("diffusers", type(vae).__name__) and swapped(vae) is adapter
    assert vae.state_dict().keys() == state.keys()
    assert all(torch.equal(state[k], v) for k, v in vae.state_dict().items())
    with torch.no_grad():
        output = vae.decode(z, **case.kwargs)
        as_tuple = vae.decode(z, **case.kwargs, return_dict=False)
    assert type(output) is DecoderOutput and isinstance(as_tuple, tuple) and len(as_tuple) == 1
    check_output(output.sample, reference, kind, adapter, z, case)
    assert torch.equal(as_tuple[0], output.sample)
    # encode is diffusers' own: the class's method, the same values
    assert "encode" not in vae.__dict__ and torch.equal(encoded(vae, images), before)


@pytest.mark.parametrize("kind", ["exact", "tiny"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_save_writes_the_original_vae_and_loads_back(case, kind, tmp_path, caplog):
    pipe, z, reference = build(case)
    pipe.save_pretrained(tmp_path / "plain")
    swap_vae(pipe, decoder_of(case, kind, pipe.vae))
    with caplog.at_level(logging.WARNING, logger="fastdec"):
        pipe.save_pretrained(tmp_path / "swapped")
    assert "is not saved" in caplog.text and "swap_vae" in caplog.text  # said, never silent
    for name in ("model_index.json", "vae/config.json"):
        saved = [json.loads((tmp_path / folder / name).read_text()) for folder in ("swapped", "plain")]
        assert saved[0] == saved[1]
    weights = "vae/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "swapped" / weights).read_bytes() == (tmp_path / "plain" / weights).read_bytes()
    loaded = VaeOnlyPipeline.from_pretrained(tmp_path / "swapped")
    assert type(loaded.vae) is type(pipe.vae) and swapped(loaded.vae) is None
    torch.testing.assert_close(loaded(z, **case.kwargs), reference, rtol=0, atol=0)
    again = swap_vae(loaded, decoder_of(case, kind, loaded.vae))  # re-applied in one call
    check_output(loaded(z, **case.kwargs), reference, kind, again, z, case)
    typed = VaeOnlyPipeline.from_pretrained(tmp_path / "swapped", torch_dtype={"vae": torch.bfloat16})
    assert typed.vae.dtype == torch.bfloat16
    swap_vae(typed, decoder_of(case, kind, typed.vae))
    assert typed(z, **case.kwargs).dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["exact", "tiny"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_tiling_gives_the_untiled_pixels_and_slicing_one_sample_at_a_time(case, kind):
    pipe, z, _ = build(case)
    vae = pipe.vae
    adapter = swap_vae(pipe, decoder_of(case, kind, vae))
    with torch.no_grad():
        untiled = pipe(z, **case.kwargs)
    if not hasattr(vae, "use_tiling"):  # SVD's VAE: diffusers has no tiling or slicing for it, swapped or not
        with pytest.raises(NotImplementedError, match="Tiling"):
            vae.enable_tiling()
        with pytest.raises(NotImplementedError, match="Slicing"):
            vae.enable_slicing()
        return
    factor = adapter.upsampling
    width = z.shape[-1] * factor
    if hasattr(vae, "tile_sample_min_height"):  # DC-AE, Wan, Qwen-Image: enable_tiling takes the tile size
        vae.enable_tiling(tile_sample_min_height=2 * factor, tile_sample_min_width=width)
    else:
        vae.enable_tiling()
        vae.tile_sample_min_size = int((2 * factor * width) ** 0.5) + 1  # two latent rows per slab
    assert adapter.tile_size_for(z) == 2 * factor  # one of diffusers' tiles' worth of pixels per slab
    seen = []
    handle = adapter.register_forward_pre_hook(lambda module, args: seen.append(type(args[0]).__name__))
    with torch.no_grad():
        tiled = pipe(z, **case.kwargs)
    assert "SlabTensor" in seen
    torch.testing.assert_close(tiled, untiled, rtol=DECODER_FP32_REL, atol=DECODER_FP32_REL * untiled.abs().max())
    vae.disable_tiling()
    seen.clear()
    vae.enable_slicing()
    with torch.no_grad():
        sliced = pipe(z, **case.kwargs)
    handle.remove()
    assert adapter.tile_size_for(z) is None and "SlabTensor" not in seen
    torch.testing.assert_close(sliced, untiled, rtol=DECODER_FP32_REL, atol=DECODER_FP32_REL * untiled.abs().max())


@pytest.mark.parametrize("kind", ["exact", "tiny"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_slicing_decodes_one_sample_at_a_time(case, kind):
    pipe, z, _ = build(case)
    if not hasattr(pipe.vae, "use_slicing") or z.shape[0] < 2:
        pytest.skip("diffusers has no slicing for this VAE (or one sample)")
    adapter = swap_vae(pipe, decoder_of(case, kind, pipe.vae))
    batches = []
    adapter.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    pipe.vae.enable_slicing()
    with torch.no_grad():
        pipe(z, **case.kwargs)
    assert batches == [1] * z.shape[0]


@pytest.mark.parametrize("kind", ["exact", "tiny"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_to_and_dtypes_move_fastdecs_weights_with_the_vaes(case, kind):
    pipe, z, reference = build(case)
    adapter = swap_vae(pipe, decoder_of(case, kind, pipe.vae))
    pipe.to(torch.bfloat16)
    floats = [t for t in (*adapter.decoder.parameters(), *adapter.decoder.buffers()) if t.is_floating_point()]
    assert pipe.vae.dtype == torch.bfloat16 and all(t.dtype == torch.bfloat16 for t in floats)
    with torch.no_grad():
        assert pipe(z.bfloat16(), **case.kwargs).dtype == torch.bfloat16
    pipe.to("cpu", torch.float32)
    floats = [t for t in (*adapter.decoder.parameters(), *adapter.decoder.buffers()) if t.is_floating_point()]
    assert all(t.dtype == torch.float32 for t in floats)
    with torch.no_grad():  # diffusers' own decode (the class's), with the weights rounded to bf16 and back
        rounded = type(pipe.vae).decode(pipe.vae, z, **case.kwargs).sample
        check_output(pipe(z, **case.kwargs), rounded, kind, adapter, z, case)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_an_exact_decoder_holds_no_second_copy_of_the_weights(case):
    pipe, z, reference = build(case)
    plain = weight_bytes(pipe)
    adapter = swap_vae(pipe, fastdec.load(pipe.vae))
    assert weight_bytes(pipe) <= 1.02 * plain
    assert adapter.weights.shared and sum(t.numel() * t.element_size() for t in own_tensors(adapter)) <= 0.02 * plain
    with torch.no_grad():
        check_output(pipe(z, **case.kwargs), reference, "exact", adapter, z, case)
    tiny = case.tiny()
    swap_vae(pipe, tiny)  # a tiny decoder adds its own weights, and nothing else
    tiny_bytes = sum(t.numel() * t.element_size() for t in (*tiny.parameters(), *tiny.buffers()))
    assert weight_bytes(pipe) == plain + tiny_bytes


@pytest.mark.parametrize("kind", ["exact", "tiny"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_unswap_restores_the_original_exactly_and_swapping_twice_is_harmless(case, kind):
    pipe, z, reference = build(case)
    vae, attributes = pipe.vae, set(pipe.vae.__dict__)
    swap_vae(pipe, decoder_of(case, kind, vae))
    adapter = swap_vae(pipe, decoder_of(case, kind, vae))  # again: replaces the first swap
    with torch.no_grad():
        check_output(pipe(z, **case.kwargs), reference, kind, adapter, z, case)
    assert swapped(vae) is adapter
    assert unswap_vae(pipe) is vae and set(vae.__dict__) == attributes and swapped(vae) is None
    with torch.no_grad():
        torch.testing.assert_close(pipe(z, **case.kwargs), reference, rtol=0, atol=0)
    assert unswap_vae(pipe) is vae  # unswapping an unswapped VAE leaves it as it is


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_compiled_decode_has_no_graph_break(case):
    pipe, z, reference = build(case)
    adapter = swap_vae(pipe, fastdec.load(pipe.vae))
    torch._dynamo.reset()
    compiled = torch.compile(pipe.vae.decode, fullgraph=True, backend="eager")
    with torch.no_grad():
        out = compiled(z, **case.kwargs).sample
    check_output(out, reference, "exact", adapter, z, case)


@pytest.mark.parametrize("kind", ["exact", "tiny"])
@pytest.mark.parametrize("offload", ["model", "sequential"])
@pytest.mark.parametrize("case", CASES[:1] + CASES[2:], ids=IDS[:1] + IDS[2:])
def test_accelerate_offloading(case, offload, kind, monkeypatch):
    pytest.importorskip("accelerate", reason="diffusers' CPU offloading needs accelerate")
    pipe, z, reference = build(case)
    adapter = swap_vae(pipe, decoder_of(case, kind, pipe.vae))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 on the GPU too: compared to the CPU's
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif device == "cuda":
        pipe.enable_sequential_cpu_offload(device=device)
    else:  # what enable_sequential_cpu_offload does to each model; it asks accelerate for "cpu:0", which fails
        from accelerate import cpu_offload

        cpu_offload(pipe.vae, execution_device=torch.device("cpu"), offload_buffers=len(pipe.vae._parameters) > 0)
    if offload == "sequential":
        assert any(t.is_meta for t in pipe.vae.parameters())  # the weights live in accelerate's map meanwhile
    with torch.no_grad():
        out = pipe(z.to(device), **case.kwargs).cpu()
    check_output(out, reference, kind, adapter, z, case)
    if offload == "sequential":  # offloaded again after the decode, and fastdec's own tensors back where they were
        assert any(t.is_meta for t in pipe.vae.parameters())
        assert all(t.device.type == "cpu" for t in own_tensors(adapter))


def test_fuse_qkv_projections_keep_working():
    case = CASES[0]
    pipe, z, reference = build(case)
    adapter = swap_vae(pipe, fastdec.load(pipe.vae))
    pipe.vae.fuse_qkv_projections()
    with torch.no_grad():
        check_output(pipe(z), reference, "exact", adapter, z, case)
    pipe.vae.unfuse_qkv_projections()
    with torch.no_grad():
        check_output(pipe(z), reference, "exact", adapter, z, case)


def test_a_fastdec_vae_cannot_be_saved_or_swapped_into():
    case = CASES[0]
    pipe, _, _ = build(case)
    adapter = FastdecVAE(pipe.vae, case.tiny())
    with pytest.raises(TypeError, match="not a diffusers model"):
        adapter.save_pretrained("unused")
    pipe.register_modules(vae=adapter)
    with pytest.raises(TypeError, match="pipe.vae = pipe.vae.original"):
        swap_vae(pipe, case.tiny())


def test_decode_takes_the_classs_arguments():
    """AutoencoderTiny's decode is (x, generator, return_dict): positional arguments keep their meaning."""
    case = CASES[-1]
    pipe, z, reference = build(case)
    adapter = swap_vae(pipe, fastdec.load(pipe.vae))
    with torch.no_grad():
        out = pipe.vae.decode(z, None, False)
        assert isinstance(out, tuple)
        check_output(out[0], reference, "exact", adapter, z, case)
        with pytest.raises(TypeError, match="takes x, generator, return_dict"):
            pipe.vae.decode(z, sample=True)
    import inspect

    assert list(inspect.signature(pipe.vae.decode).parameters) == ["x", "generator", "return_dict"]


def test_what_cannot_work_says_so():
    case = CASES[0]
    pipe, z, _ = build(case)
    swap_vae(pipe, fastdec.load(pipe.vae))
    pipe.vae.enable_tiling()
    pipe.vae.tile_sample_min_size = 8
    torch._dynamo.reset()
    with pytest.raises(Exception, match="exact tiling .* does not run inside torch.compile: call disable_vae_tiling"):
        torch.compile(pipe.vae.decode, fullgraph=True, backend="eager")(z)
    unswap_vae(pipe)
    with torch.device("meta"):
        meta = case.vae()
    with pytest.raises(ValueError, match="meta device .* swap_vae before pipe.enable_sequential_cpu_offload"):
        swap_vae(VaeOnlyPipeline(meta), case.tiny())
    lora = type("Linear", (torch.nn.Module,), {"__module__": "peft.tuners.lora.layer"})  # how PEFT wraps a layer
    pipe.vae.decoder.conv_in = lora()
    with pytest.raises(ValueError, match=r"LoRA/PEFT adapters \(decoder\), which fastdec's decoder would not apply"):
        swap_vae(pipe, case.tiny())
