"""fastdec.encode and `fastdec encode`: photo -> latents -> pixels in three lines, with the real TAEF2 files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastdec
from fastdec.cli import main

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
TAEF2 = SHARED / "weights" / "taef2"
PHOTO = SHARED / "data" / "bsds500" / "test" / "100007.jpg"
needs_taef2 = pytest.mark.skipif(not (TAEF2 / "taef2_encoder.pth").is_file() or not PHOTO.is_file(),
                                 reason=f"real TAEF2 weights or BSDS500 photos not found under {SHARED.resolve()}")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / (a.float() - b.float()).square().mean()))


@needs_taef2
@torch.no_grad()
def test_photo_to_latents_to_pixels_in_three_lines():
    photo = Image.open(PHOTO).convert("RGB").crop((0, 0, 160, 96))  # sides: multiples of 8
    latents = fastdec.encode(photo, encoder=TAEF2 / "taef2_encoder.pth")
    images = fastdec.decode(latents, decoder=str(TAEF2 / "taef2_decoder.pth"))
    assert latents.shape == (1, 32, 12, 20) and images.shape == (1, 3, 96, 160)
    original = torch.from_numpy(np.asarray(photo)).permute(2, 0, 1)[None] / 255
    assert psnr(images, original) > 24  # TAEF2 reconstructs BSDS500 photos at ~29 dB on average


@needs_taef2
def test_cli_encode_then_decode(tmp_path, capsys):
    photo = tmp_path / "photo.png"
    Image.open(PHOTO).convert("RGB").crop((0, 0, 64, 48)).save(photo)
    latents = tmp_path / "photo.safetensors"
    assert main(["encode", str(photo), str(photo), "--encoder", str(TAEF2 / "taef2_encoder.pth"),
                 "-o", str(latents)]) == 0
    assert main(["decode", str(latents), "--decoder", str(TAEF2 / "taef2_decoder.pth"), "-o", str(tmp_path),
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out.split()
    assert out == [str(latents), str(tmp_path / "photo_000.png"), str(tmp_path / "photo_001.png")]
    assert Image.open(tmp_path / "photo_001.png").size == (64, 48)


@needs_taef2
def test_encode_errors_say_what_to_do(tmp_path, capsys):
    encoder = TAEF2 / "taef2_encoder.pth"
    with pytest.raises(ValueError, match=r"multiples of 8; crop them, e.g. image.crop\(\(0, 0, 64, 40\)\)"):
        fastdec.encode(torch.rand(3, 45, 70), encoder=encoder)
    with pytest.raises(ValueError, match="float tensor"):
        fastdec.encode(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), encoder=encoder)
    with pytest.raises(ValueError, match="different sizes"):
        fastdec.encode([Image.new("RGB", (8, 8)), Image.new("RGB", (16, 8))], encoder=encoder)
    assert main(["encode", str(PHOTO), "--encoder", str(encoder), "-o", str(tmp_path / "x.pt")]) == 2
    assert main(["encode", str(tmp_path / "missing.png"), "--encoder", str(encoder), "-o",
                 str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "written as .safetensors" in err and "missing.png" in err
