"""``fastdec decode``: latents in .safetensors / .pt / .npy (and .npz) to one PNG per batch item, and its errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import latents as batch
from PIL import Image
from safetensors.torch import save_file

import fastdec
from fastdec.cli import main
from fastdec.models.taesd import TAESDDecoder

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("offline")  # tests/conftest.py: no network, empty caches


def pngs(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.glob("*.png"))


def expected_pixels(latents: torch.Tensor, decoder_dir: Path) -> np.ndarray:
    return fastdec.decode(latents, fastdec.load(decoder_dir), output="uint8").numpy()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".npy", ".npz"])
def test_decode_each_format_writes_one_png_per_item(tmp_path, decoder_dir, suffix, capsys):
    latents = batch(2, 4, 3, 5)
    path = tmp_path / f"sample{suffix}"
    if suffix == ".safetensors":
        save_file({"latents": latents}, str(path))
    elif suffix == ".pt":
        torch.save(latents, path)
    elif suffix == ".npy":
        np.save(path, latents.numpy())
    else:
        np.savez(path, latents=latents.numpy())
    out = tmp_path / "out"
    assert main(["decode", str(path), "--decoder", str(decoder_dir), "-o", str(out), "--device", "cpu"]) == 0
    assert pngs(out) == ["sample_000.png", "sample_001.png"]
    assert capsys.readouterr().out.split() == [str(out / "sample_000.png"), str(out / "sample_001.png")]
    pixels = expected_pixels(latents, decoder_dir)
    for index, name in enumerate(pngs(out)):
        image = Image.open(out / name)
        assert image.size == (10, 6) and image.mode == "RGB"
        assert np.array_equal(np.asarray(image), pixels[index])


def test_unbatched_latents_and_dict_files(tmp_path, decoder_dir):
    latents = batch(4, 2, 2)
    torch.save({"samples": latents}, tmp_path / "one.pt")  # a dict with one tensor: no --key needed
    assert main(["decode", str(tmp_path / "one.pt"), "--decoder", str(decoder_dir), "-o", str(tmp_path)]) == 0
    assert pngs(tmp_path) == ["one_000.png"] and Image.open(tmp_path / "one_000.png").size == (4, 4)
    save_file({"a": batch(1, 4, 2, 2), "b": batch(3, 4, 2, 3)}, str(tmp_path / "two.safetensors"))
    args = ["decode", str(tmp_path / "two.safetensors"), "--decoder", str(decoder_dir), "-o", str(tmp_path / "b")]
    assert main([*args, "--key", "b"]) == 0
    assert pngs(tmp_path / "b") == ["two_000.png", "two_001.png", "two_002.png"]


def test_default_decoder_and_dtype(tmp_path, offline):
    torch.manual_seed(0)
    torch.save(TAESDDecoder("taesd").state_dict(), offline / "taesd_decoder.pth")
    np.save(tmp_path / "z.npy", batch(1, 4, 2, 2).numpy().astype(np.float16))
    assert main(["decode", str(tmp_path / "z.npy"), "-o", str(tmp_path), "--dtype", "float32"]) == 0
    assert Image.open(tmp_path / "z_000.png").size == (16, 16)


def run_error(args: list[str], capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastdec decode: error: ")
    return err


def test_errors_are_reported_not_raised(tmp_path, decoder_dir, capsys):
    decoder = ["--decoder", str(decoder_dir), "-o", str(tmp_path / "out")]
    assert "not found" in run_error(["decode", str(tmp_path / "missing.pt"), *decoder], capsys)
    (tmp_path / "latents.txt").write_text("1 2 3")
    assert "unsupported latents file type" in run_error(["decode", str(tmp_path / "latents.txt"), *decoder], capsys)
    save_file({"a": batch(4, 2, 2), "b": batch(4, 2, 2)}, str(tmp_path / "two.safetensors"))
    assert "pick one with --key" in run_error(["decode", str(tmp_path / "two.safetensors"), *decoder], capsys)
    err = run_error(["decode", str(tmp_path / "two.safetensors"), *decoder, "--key", "c"], capsys)
    assert "no tensor 'c'" in err and "['a', 'b']" in err
    torch.save(batch(4, 2, 2), tmp_path / "single.pt")
    assert "drop --key" in run_error(["decode", str(tmp_path / "single.pt"), *decoder, "--key", "a"], capsys)
    for name, content in [("broken.pt", b"not a zip"), ("broken.safetensors", b"\x00" * 3), ("broken.npy", b"??")]:
        (tmp_path / name).write_bytes(content)
        assert "could not read latents" in run_error(["decode", str(tmp_path / name), *decoder], capsys)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))
    err = run_error(["decode", str(tmp_path / "objects.npy"), *decoder], capsys)
    assert "could not read latents" in err and "allow_pickle" in err
    torch.save(batch(16, 2, 2), tmp_path / "flux.pt")
    assert "16 channels" in run_error(["decode", str(tmp_path / "flux.pt"), *decoder], capsys)
    torch.save(batch(2, 2), tmp_path / "flat.pt")
    assert "(C, h, w) or (B, C, h, w)" in run_error(["decode", str(tmp_path / "flat.pt"), *decoder], capsys)
    assert "taef2_decoder.pth" in run_error(["decode", str(tmp_path / "single.pt"), "--decoder", "taef2"], capsys)
    assert "not a device" in run_error(["decode", str(tmp_path / "single.pt"), *decoder, "--device", "gpu7"], capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_requested_without_cuda(tmp_path, decoder_dir, capsys):
    torch.save(batch(4, 2, 2), tmp_path / "z.pt")
    args = ["decode", str(tmp_path / "z.pt"), "--decoder", str(decoder_dir), "--device", "cuda"]
    assert "use --device cpu" in run_error(args, capsys)


def test_python_dash_m_entry_point(tmp_path, decoder_dir):
    torch.save(batch(2, 4, 2, 2), tmp_path / "z.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "fastdec.cli", "decode", str(tmp_path / "z.pt"), "--decoder", str(decoder_dir),
         "-o", str(tmp_path / "out"), "--device", "cpu"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert pngs(tmp_path / "out") == ["z_000.png", "z_001.png"]
    assert Image.open(tmp_path / "out" / "z_001.png").size == (4, 4)
