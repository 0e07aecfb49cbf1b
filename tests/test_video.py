"""Video latents through the public API: fastdec.decode on (B, C, T, h, w), defaults by channel count, load names,
bad input, fastdec.save_video, and `fastdec decode` writing an mp4 of the real Wan latent (../shared/data/wan)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import fastdec
from fastdec import cli
from fastdec.models.base import Decoder
from fastdec.models.taehv import TAEHVDecoder
from fastdec.models.taesd import TAESDDecoder
from fastdec.validate import check_latents

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
WEIGHTS = SHARED / "taehv" / "taew2_1_arch_random.safetensors"
WAN_LATENTS = SHARED / "wan" / "test_latents_wan.pth"
needs_weights = pytest.mark.skipif(not WEIGHTS.is_file(), reason=f"TAEHV fixture weights not found: {WEIGHTS}")
av = pytest.importorskip("av", reason="PyAV (pip install av) writes and reads the mp4 files")


@pytest.fixture(scope="module")
def decoder() -> TAEHVDecoder:
    torch.manual_seed(0)
    return TAEHVDecoder("taew2_1").eval()


def read_video(path: Path) -> tuple[int, int, int, float, str]:
    """(frames, height, width, fps, codec) of an mp4, read back with PyAV."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        return len(frames), *frames[0].shape[:2], float(stream.average_rate), stream.codec_context.name


# --- fastdec.decode ------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_decode_video_latents_in_every_output_kind(decoder):
    latents = torch.randn(2, 16, 2, 3, 4, generator=torch.Generator().manual_seed(0))
    frames = fastdec.decode(latents, decoder)
    assert frames.shape == (2, 5, 3, 24, 32) and frames.dtype == torch.float32
    assert 0 <= frames.min() and frames.max() <= 1
    assert torch.equal(frames, decoder.decode(latents))
    pixels = fastdec.decode(latents, decoder, output="uint8")
    assert pixels.shape == (2, 5, 24, 32, 3) and pixels.dtype == torch.uint8
    assert torch.equal(pixels, (frames * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2))
    pils = fastdec.decode(latents, decoder, output="pil")
    assert [len(video) for video in pils] == [5, 5] and pils[1][4].size == (32, 24)


class FrameByFrame(Decoder):
    """The smallest video decoder: any Decoder with latent_ndim 5 goes through fastdec.decode's video path."""

    latent_ndim, latent_channels, output_range = 5, 4, "-1,1"

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 3 * 4, 1)
        self.config = {}

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        frames = z.transpose(1, 2).flatten(0, 1)
        images = torch.nn.functional.pixel_shuffle(self.conv(frames), 2)
        return images.unflatten(0, z.shape[:1] + z.shape[2:3])

    def decode(self, latents, check_finite=None):
        check_latents(latents, self, check_finite)
        return (self(latents) * 0.5 + 0.5).clamp(0, 1)


@torch.no_grad()
def test_any_video_decoder_goes_through_decode():
    decoder = FrameByFrame().eval()
    latents = torch.randn(2, 4, 3, 5, 6)
    assert fastdec.decode(latents, decoder).shape == (2, 3, 3, 10, 12)
    assert fastdec.decode(latents, decoder, output="uint8").shape == (2, 3, 10, 12, 3)


@needs_weights
@torch.no_grad()
def test_default_video_decoder_by_channels_and_names(offline):
    latents = torch.randn(1, 16, 1, 2, 2)
    with pytest.raises(FileNotFoundError, match=r"taew2_1.pth not found in .*github.com/madebyollin/taehv/raw/main"):
        fastdec.decode(latents)  # 16 channels: taew2_1, not downloaded
    (offline / "taew2_1.safetensors").symlink_to(WEIGHTS.resolve())
    frames = fastdec.decode(latents)
    assert frames.shape == (1, 1, 3, 16, 16)
    assert torch.equal(frames, fastdec.load("taew2_1").decode(latents))
    with pytest.raises(ValueError, match=r"17-channel video latents.*taehv \(HunyuanVideo, 16 ch\).*taeltx_2"):
        fastdec.decode(torch.randn(1, 17, 1, 2, 2))
    assert {"taehv", "taew2_1", "taew2_2", "taehv1_5", "taecvx", "taeltx_2"} <= set(fastdec.api.names())


# --- bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "latents, message",
    [
        (torch.randn(1, 4, 2, 3, 3), r"latents have 4 channels but TAEHVDecoder expects 16"),
        (torch.randn(1, 16, 3, 3), r"TAEHVDecoder decodes video latents \(B, C, T, h, w\): add the time axis"),
        (torch.randn(1, 16, 0, 3, 3), r"empty \(time is 0\)"),
        (torch.full((1, 16, 2, 3, 3), float("nan")), "NaN or Inf"),
    ],
    ids=["channels", "4-D", "T=0", "NaN"],
)
def test_bad_video_latents_raise_clearly(decoder, latents, message):
    with pytest.raises(ValueError, match=message):
        fastdec.decode(latents, decoder)
    with pytest.raises(ValueError, match=message):
        decoder.stream().push(latents)


def test_video_latents_to_an_image_decoder_say_what_to_do():
    with pytest.raises(ValueError, match=r"look like video latents.*fastdec.load\('taew2_1'\).*transpose\(1, 2\)"):
        fastdec.decode(torch.randn(1, 4, 2, 3, 3), TAESDDecoder("taesd"))
    with pytest.raises(ValueError, match=r"channels but TAEHVDecoder expects 16: .* \(e.g. decoder='taew2_2'\)"):
        fastdec.decode(torch.randn(1, 48, 1, 2, 2), TAEHVDecoder("taew2_1"))


# --- save_video ----------------------------------------------------------------------------------------------------


def test_save_video_writes_h264_at_the_fps(tmp_path):
    frames = torch.rand(1, 7, 3, 24, 32, generator=torch.Generator().manual_seed(0))
    path = fastdec.save_video(frames, tmp_path / "clip.mp4", fps=12)
    assert read_video(path) == (7, 24, 32, 12.0, "h264")
    # uint8 (T, H, W, 3) chunks, written as they come: the same container.
    pixels = (frames[0] * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    chunked = fastdec.save_video(iter(pixels.split(3)), tmp_path / "chunks.mp4", fps=12)
    assert read_video(chunked) == (7, 24, 32, 12.0, "h264")


@pytest.mark.parametrize(
    "frames, message",
    [
        (torch.rand(5, 3, 23, 32), "even frame size"),
        (torch.rand(5, 3, 24, 32) * 2, r"lie in \[0, 1\]"),
        (torch.rand(2, 5, 3, 24, 32), "hold 2 videos"),
        (torch.rand(5, 24, 32, 3), r"\(T, 3, H, W\) floats"),
        (torch.rand(0, 3, 24, 32), "no frames"),
    ],
    ids=["odd-size", "out-of-range", "batch", "layout", "empty"],
)
def test_save_video_refuses_bad_frames_and_leaves_no_file(tmp_path, frames, message):
    with pytest.raises(ValueError, match=message):
        fastdec.save_video(frames, tmp_path / "bad.mp4", fps=16)
    assert not (tmp_path / "bad.mp4").exists()


def test_save_video_without_pyav_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ImportError, match="pip install av"):
        fastdec.save_video(torch.rand(2, 3, 8, 8), tmp_path / "x.mp4")


# --- CLI -----------------------------------------------------------------------------------------------------------


@needs_weights
def test_cli_decodes_a_video_latent_to_mp4(tmp_path, capsys):
    """The CLI's video path end to end at a small size (the real latent's full size is the slow test below)."""
    latents = tmp_path / "clip.pt"
    torch.save(torch.randn(1, 16, 2, 4, 6), latents)
    code = cli.main(["decode", str(latents), "--decoder", str(WEIGHTS), "-o", str(tmp_path), "--fps", "8",
                     "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    path = tmp_path / "clip.mp4"
    assert out.split() == [str(path)] and "2/2 latent frames" in err
    assert read_video(path) == (5, 32, 48, 8.0, "h264")


@needs_weights
def test_cli_ctrl_c_mid_video_leaves_no_half_file(tmp_path, capsys, monkeypatch):
    """Ctrl-C while a long video is decoded and written: status 130, a message, and no half-written mp4."""
    stream = TAEHVDecoder.decode_stream

    def interrupted_after_one_chunk(self, *args, **kwargs):
        yield next(iter(stream(self, *args, **kwargs)))
        raise KeyboardInterrupt

    monkeypatch.setattr(TAEHVDecoder, "decode_stream", interrupted_after_one_chunk)
    latents = tmp_path / "clip.pt"
    torch.save(torch.randn(1, 16, 3, 4, 6), latents)
    code = cli.main(["decode", str(latents), "--decoder", str(WEIGHTS), "-o", str(tmp_path), "--chunk-frames", "1",
                     "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert not (tmp_path / "clip.mp4").exists()


@pytest.mark.slow  # ~40 s on 2 cores: 61 frames of 320x512
@needs_weights
@pytest.mark.skipif(not WAN_LATENTS.is_file(), reason=f"real Wan latent not found: {WAN_LATENTS}")
def test_cli_decodes_the_real_wan_latent_to_mp4(tmp_path, capsys):
    """The real Wan 2.1 latent (16 x 40 x 64, saved on CUDA: the CLI maps it to the CPU) with the fixture weights:
    61 frames of 320x512 at the requested fps (random weights: the pixels mean nothing)."""
    code = cli.main(["decode", str(WAN_LATENTS), "--decoder", str(WEIGHTS), "-o", str(tmp_path), "--fps", "16",
                     "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    path = tmp_path / "test_latents_wan.mp4"
    assert out.split() == [str(path)] and "16/16 latent frames" in err  # the progress bar
    assert read_video(path) == (61, 320, 512, 16.0, "h264")


def test_cli_video_errors(tmp_path, capsys):
    latents = tmp_path / "clip.pt"
    torch.save(torch.randn(1, 16, 2, 2, 2), latents)
    assert cli.main(["decode", str(latents), "--decoder", str(tmp_path / "none.pth"), "-o", str(tmp_path)]) == 2
    assert cli.main(["decode", str(latents), "--fps", "0", "-o", str(tmp_path)]) == 2
    torch.save(torch.randn(1, 17, 2, 2, 2), latents)
    assert cli.main(["decode", str(latents), "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "none.pth" in err and "--fps must be positive" in err and "17-channel video latents" in err
