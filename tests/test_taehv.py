"""TAEHV family: parity with the reference implementation's outputs (../shared/data/taehv), whole-clip, chunked and
streaming decode, encode, loading madebyollin's files strictly, every variant's shapes.

CPU, fp32. TAEHV runs convolutions and ops.pixel_shuffle (C++) only: no Triton kernel, so the "fused" path and the
reference ops run the same code apart from the op registry's switch; both are checked.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from helpers import compile_fullgraph, relative_error
from tolerances import DECODER_FP32_REL

import fastdec
from fastdec import ops
from fastdec.models import taehv
from fastdec.models.taehv import VARIANTS, TAEHVDecoder, TAEHVEncoder

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "taehv"
WEIGHTS = DATA / "taew2_1_arch_random.safetensors"
REFERENCE = DATA / "taew2_1_arch_random_reference.safetensors"
needs_fixtures = pytest.mark.skipif(
    not (WEIGHTS.is_file() and REFERENCE.is_file()), reason=f"TAEHV fixtures not found in {DATA.resolve()}"
)


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(REFERENCE))


@pytest.fixture(scope="module")
def decoder() -> TAEHVDecoder:
    return TAEHVDecoder.from_file(WEIGHTS)


def video_latents(reference) -> torch.Tensor:
    """The fixture's latents in diffusers' layout (B, C, T, h, w); the reference works in (B, T, C, h, w)."""
    return reference["latents_ntchw"].transpose(1, 2)


# --- parity with the reference implementation ----------------------------------------------------------------------


@needs_fixtures
@pytest.mark.parametrize("reference_ops", [False, True], ids=["fused", "reference-ops"])
@torch.no_grad()
def test_whole_clip_matches_reference(decoder, reference, reference_ops, triton_launches):
    expected = reference["frames_ntchw"]
    assert expected.shape == (1, 21, 3, 96, 96) and expected.std() > 0.05  # 6 latent frames -> 4 * 5 + 1 frames
    if reference_ops:
        with ops.reference_ops():
            frames = decoder.decode(video_latents(reference), chunk_frames=None)
    else:
        frames = decoder.decode(video_latents(reference))
    assert not triton_launches  # TAEHV has no Triton op: convs and the C++ pixel_shuffle only
    assert relative_error(frames, expected) <= DECODER_FP32_REL


@needs_fixtures
@torch.no_grad()
def test_chunked_decode_matches_reference(decoder, reference):
    """Bounded-memory whole-clip mode: chunks of latent frames with the state carried give the same frames."""
    frames = decoder.decode(video_latents(reference), chunk_frames=4)  # chunks of 4 and 2
    assert relative_error(frames, reference["frames_ntchw"]) <= DECODER_FP32_REL
    # forward (unclamped, what training and the benchmark call) follows the chunk_frames attribute.
    chunked = TAEHVDecoder.from_file(WEIGHTS)
    chunked.chunk_frames = 5
    assert relative_error(chunked(video_latents(reference)).clamp(0, 1), frames) <= DECODER_FP32_REL


@needs_fixtures
@torch.no_grad()
def test_streaming_matches_reference_streaming(decoder, reference):
    """One latent frame per push: the first gives 1 frame (3 start-up frames dropped), every later one 4."""
    stream = decoder.stream()
    pieces = [stream.push(frame) for frame in video_latents(reference).split(1, dim=2)]
    assert [piece.shape[1] for piece in pieces] == [1, 4, 4, 4, 4, 4]
    frames = torch.cat([*pieces, stream.flush()], 1)
    assert relative_error(frames, reference["frames_streaming_ntchw"]) <= DECODER_FP32_REL
    # A new clip after reset() starts from empty state: the same first frame again.
    stream.reset()
    assert torch.equal(stream.push(video_latents(reference)[:, :, :1]), pieces[0])


@needs_fixtures
@torch.no_grad()
def test_encode_matches_reference(reference):
    encoder = TAEHVEncoder.from_file(WEIGHTS)
    latents = encoder.encode(reference["frames_ntchw"])
    assert latents.shape == (1, 16, 6, 12, 12)  # 21 frames padded to 24, time / 4
    assert relative_error(latents, reference["encoded_latents_ntchw"].transpose(1, 2)) <= DECODER_FP32_REL


@needs_fixtures
@torch.no_grad()
def test_decode_picks_chunks_over_the_memory_budget(decoder, reference, monkeypatch):
    latents = video_latents(reference)[:, :, :2, :4, :4]
    assert decoder.auto_chunk_frames(latents) == 2  # small: the whole clip at once
    per_latent_frame = 4 * 64 * 32 * 32 * 4 * 2  # t_upscale * width * H * W * fp32 bytes * (input + output)
    monkeypatch.setattr(taehv, "WHOLE_CLIP_BUDGET_BYTES", per_latent_frame)
    assert decoder.auto_chunk_frames(latents) == 1
    chunked = decoder.decode(latents)
    monkeypatch.undo()
    assert relative_error(chunked, decoder.decode(latents)) <= DECODER_FP32_REL


@torch.no_grad()
def test_streaming_peak_memory_does_not_grow_with_the_clip():
    """torch's CPU allocator peak (bench.call_peak_memory): whole-clip decoding grows with T, a stream that hands
    each frame on does not."""
    from fastdec.bench import call_peak_memory

    torch.manual_seed(0)
    decoder = TAEHVDecoder("taew2_1").eval()
    cpu = torch.device("cpu")

    def streamed(latents):
        stream = decoder.stream()
        for frame in latents.split(1, dim=2):
            stream.push(frame)  # handed on (to a screen, an mp4): not kept

    peaks = {}
    for frames in (2, 8):
        latents = torch.randn(1, 16, frames, 4, 4)
        whole = functools.partial(decoder.decode, latents, chunk_frames=frames)  # chunk_frames=T: the whole clip
        peaks["whole", frames] = call_peak_memory(whole, cpu)[1]
        peaks["stream", frames] = call_peak_memory(lambda latents=latents: streamed(latents), cpu)[1]
    assert peaks["whole", 8] > 2 * peaks["whole", 2], peaks  # measured 8.1 -> 21 MB for 5 -> 29 frames
    assert peaks["stream", 8] <= 1.05 * peaks["stream", 2], peaks


# --- streaming API -------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_stream_refuses_a_shape_change_and_bad_chunks():
    decoder = TAEHVDecoder("taew2_1").eval()
    stream = decoder.stream()
    first = stream.push(torch.randn(1, 16, 1, 2, 2, dtype=torch.float64))  # cast to the decoder's dtype
    assert first.shape == (1, 1, 3, 16, 16) and first.dtype == torch.float32
    with pytest.raises(ValueError, match=r"call reset\(\)"):
        stream.push(torch.randn(1, 16, 1, 2, 3))
    with pytest.raises(ValueError, match="chunk_frames must be a positive int"):
        decoder.decode(torch.randn(1, 16, 2, 2, 2), chunk_frames=0)
    with pytest.raises(ValueError, match="before any push"):
        decoder.stream().flush()


def test_compiles_fullgraph():
    """Whole clip (chunks run the same run_frames; measured to compile too, left out for CI time)."""
    torch.manual_seed(0)
    decoder = TAEHVDecoder("taew2_1").eval()
    compiled, eager = compile_fullgraph(decoder, torch.randn(1, 16, 2, 2, 2))
    assert compiled.shape == (1, 5, 3, 16, 16) and relative_error(compiled, eager) <= DECODER_FP32_REL


# --- every variant -------------------------------------------------------------------------------------------------

# variant -> (latent T, output frames, pixels per latent pixel)
SHAPES = {"taehv": (2, 5, 8), "taew2_1": (2, 5, 8), "taew2_2": (2, 5, 16), "taehv1_5": (2, 5, 16),
          "taecvx": (2, 8, 8), "taeltx_2": (2, 9, 32)}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@torch.no_grad()
def test_every_variant_decodes_and_encodes_its_shapes(variant):
    assert set(SHAPES) == set(VARIANTS)
    frames_in, frames_out, scale = SHAPES[variant]
    torch.manual_seed(0)
    decoder, encoder = TAEHVDecoder(variant).eval(), TAEHVEncoder(variant).eval()
    channels = VARIANTS[variant].latent_channels
    latents = torch.randn(1, channels, frames_in, 2, 2)
    frames = decoder.decode(latents)
    assert frames.shape == (1, frames_out, 3, 2 * scale, 2 * scale) and decoder.frames_out(frames_in) == frames_out
    assert 0 <= frames.min() and frames.max() <= 1
    if variant in ("taecvx", "taeltx_2"):  # keeps its start-up frames for even T / drops 7 of them: chunks agree
        assert relative_error(decoder.decode(latents, chunk_frames=1), frames) <= DECODER_FP32_REL
    encoded = encoder.encode(frames)
    assert encoded.shape[:2] == (1, channels) and encoded.shape[-2:] == (2, 2)


# --- loading -------------------------------------------------------------------------------------------------------


def madebyollin_state(variant: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = {f"decoder.{k}": v for k, v in TAEHVDecoder(variant).state_dict().items()}
    state |= {f"encoder.{k}": v for k, v in TAEHVEncoder(variant).state_dict().items()}
    return state


@needs_fixtures
@torch.no_grad()
def test_pth_and_safetensors_load_key_for_key(decoder, tmp_path):
    from safetensors.torch import load_file

    state = load_file(str(WEIGHTS))
    assert {f"decoder.{key}" for key in decoder.state_dict()} == {key for key in state if key.startswith("decoder.")}
    torch.save(state, tmp_path / "taew2_1.pth")
    from_pth = TAEHVDecoder.from_file(tmp_path / "taew2_1.pth")
    latents = torch.randn(1, 16, 1, 2, 2)
    assert torch.equal(from_pth(latents), decoder(latents))
    # fastdec.load reads the file (variant from the name) and save_pretrained folders round-trip strictly.
    loaded = fastdec.load(tmp_path / "taew2_1.pth")
    assert isinstance(loaded, TAEHVDecoder) and loaded.variant == "taew2_1"
    loaded.save_pretrained(tmp_path / "saved")
    again = fastdec.load(tmp_path / "saved")
    assert torch.equal(again.decode(latents), decoder.decode(latents))


def test_a_file_of_another_variant_says_which_it_looks_like(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "taew2_1_finetune.safetensors"
    save_file(madebyollin_state("taew2_2"), str(path))
    with pytest.raises(ValueError, match=r"48 latent channels, patch 2, which looks like taew2_2, not taew2_1"):
        TAEHVDecoder.from_file(path)
    assert TAEHVDecoder.from_file(path, "taew2_2").latent_channels == 48  # named explicitly, it loads
    renamed = tmp_path / "weights.safetensors"
    path.rename(renamed)
    assert fastdec.load(renamed).variant == "taew2_2"  # no name: the shapes pick the only match


def test_strict_load_names_missing_keys_and_tgrow_rule(tmp_path):
    from safetensors.torch import save_file

    state = madebyollin_state("taew2_1")
    # madebyollin's rule: a TGrow trained for 2 frames where the variant makes 1 keeps the last frame's channels.
    doubled = dict(state)
    doubled["decoder.7.conv.weight"] = torch.cat([torch.zeros_like(state["decoder.7.conv.weight"]),
                                                 state["decoder.7.conv.weight"]])
    save_file(doubled, str(tmp_path / "taew2_1.safetensors"))
    loaded = TAEHVDecoder.from_file(tmp_path / "taew2_1.safetensors")
    assert torch.equal(loaded[7].conv.weight, state["decoder.7.conv.weight"])
    del state["decoder.4.conv.2.bias"]
    save_file(state, str(tmp_path / "taew2_1.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \(1\): 4.conv.2.bias"):
        TAEHVDecoder.from_file(tmp_path / "taew2_1.safetensors")


def test_unreadable_or_foreign_files_raise(tmp_path):
    (tmp_path / "taew2_1.pth").write_bytes(b"<html>not found</html>")
    with pytest.raises(ValueError, match="truncated or not a TAEHV checkpoint"):
        TAEHVDecoder.from_file(tmp_path / "taew2_1.pth")
    torch.save({"1.weight": torch.zeros(64, 4, 3, 3)}, tmp_path / "taehv.pth")  # a TAESD-style state dict
    with pytest.raises(ValueError, match="not a TAEHV checkpoint"):
        TAEHVDecoder.from_file(tmp_path / "taehv.pth")
    with pytest.raises(FileNotFoundError, match="github.com/madebyollin/taehv"):
        TAEHVDecoder.from_file(tmp_path / "missing.pth")
