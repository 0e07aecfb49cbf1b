"""fastdec train / fastdec eval on tiny runs: resume equality, atomic checkpoints, the eval report and grid, the
latent preview, SSIM, and the bad inputs of issue 9 (empty folders, odd image files, channel mismatches, crops larger
than images, bad --resume paths)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastdec.cli import main
from fastdec.models.dcae import DCAEDecoder
from fastdec.models.preview import LatentPreview
from fastdec.models.taesd import TAESDDecoder, TAESDEncoder
from fastdec.train import TrainConfig, train
from fastdec.train import checkpoint as ckpt
from fastdec.train.data import list_images, load_samples
from fastdec.train.losses import LPIPSUnavailable, load_lpips, lpips_unavailable_reason
from fastdec.train.scoring import ssim

CHANNELS = 4


def tiny_student() -> TAESDDecoder:
    torch.manual_seed(0)  # the same initial weights for every run that is compared
    return TAESDDecoder("tae-192", CHANNELS, width=8, blocks=(1, 1, 1, 1))


def tiny_efficientvit() -> DCAEDecoder:  # 8x: two upsample stages and the head's x2; BatchNorm
    torch.manual_seed(0)
    return DCAEDecoder(CHANNELS, block_out_channels=(8, 8, 8, 8), layers_per_block=(0, 1, 1, 1),
                       norm_types="batch_norm", act_fns="relu", qkv_multiscales=((),) * 4)


def smooth_image(seed: int, height: int, width: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, height // 8 + 1, width // 8 + 1, generator=g)
    image = torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)[0]
    return (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    """Five 48x64 training images, three held-out ones, and a seeded random taesd encoder .pth (4 channels)."""
    root = tmp_path_factory.mktemp("train")
    for folder, count, offset in (("images", 5, 0), ("held_out", 3, 100)):
        (root / folder / "sub").mkdir(parents=True)
        for i in range(count):
            where = root / folder / ("sub" if i % 2 else "") / f"{i}.png"
            Image.fromarray(smooth_image(offset + i, 48, 64)).save(where)
    torch.manual_seed(0)
    torch.save(TAESDEncoder("taesd").state_dict(), root / "taesd_encoder.pth")
    return {"root": root, "images": root / "images", "held_out": root / "held_out",
            "encoder": root / "taesd_encoder.pth"}


def run(workspace, output: Path, **options) -> Path:
    defaults = dict(data=str(workspace["images"]), output=str(output), encoder=str(workspace["encoder"]),
                    decoder=tiny_student(), crop=32, batch=2, steps=4, warmup=2, checkpoint_every=2, log_every=1,
                    threads=1, lr=1e-3, ema=0.9, cache_dir=str(workspace["root"] / "cache"))
    return train(TrainConfig(**{**defaults, **options}))


def checkpoint(folder: Path) -> dict:
    return torch.load(folder / ckpt.CHECKPOINT_NAME, weights_only=True)


def test_channels_last_trains_the_same_student(workspace, tmp_path):
    """--channels-last changes the memory layout, not the training: the weights match the default layout's run up to
    convolution rounding, and the saved decoder is an ordinary contiguous one."""
    straight = run(workspace, tmp_path / "nchw")
    nhwc = run(workspace, tmp_path / "nhwc", channels_last=True)
    a, b = checkpoint(tmp_path / "nchw"), checkpoint(tmp_path / "nhwc")
    for key in a["ema"]:
        torch.testing.assert_close(a["ema"][key], b["ema"][key], rtol=1e-4, atol=1e-5, msg=key)
    assert (nhwc / "model.safetensors").is_file() and (straight / "model.safetensors").is_file()


@pytest.mark.parametrize("student", [tiny_student, tiny_efficientvit], ids=["taesd", "efficientvit-batchnorm"])
def test_resume_gives_the_weights_of_an_uninterrupted_run(workspace, tmp_path, student):
    straight = run(workspace, tmp_path / "straight", decoder=student())
    first = run(workspace, tmp_path / "resumed", decoder=student(), stop_at=2)
    assert checkpoint(tmp_path / "resumed")["step"] == 2
    resumed = run(workspace, tmp_path / "resumed", decoder=student(), resume=str(tmp_path / "resumed"))
    assert first == resumed == tmp_path / "resumed" / "decoder"
    a, b = checkpoint(tmp_path / "straight"), checkpoint(tmp_path / "resumed")
    assert a["step"] == b["step"] == 4
    for part in ("student", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            torch.testing.assert_close(a[part][key], b[part][key], rtol=1e-6, atol=1e-7, msg=f"{part} {key}")
    moments = [(s["exp_avg"], t["exp_avg"]) for s, t in zip(a["optimizer"]["state"].values(),
                                                              b["optimizer"]["state"].values(), strict=True)]
    for x, y in moments:
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(a["student"][k], a["ema"][k]) for k in a["student"])  # EMA is its own average
    # the metrics of the resumed run are those of the straight run, step by step (no duplicate lines)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    card = json.loads((straight / "model_card.json").read_text())
    assert card["steps"] == 4 and card["data"]["images"] == 5 and card["latent_space"]["latent_channels"] == CHANNELS
    assert (tmp_path / "straight" / "curves.png").stat().st_size > 0
    import fastdec

    decoder = fastdec.load(straight)
    assert decoder.decode(torch.zeros(1, CHANNELS, 4, 4)).shape == (1, 3, 32, 32)


def test_a_killed_checkpoint_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / ckpt.CHECKPOINT_NAME
    ckpt.save_checkpoint(path, {"step": 1, "student": {"w": torch.ones(3)}})

    def dies_mid_write(state, file):
        Path(file).write_bytes(b"PK\x03\x04 half a zip")  # what a kill part-way through torch.save leaves
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(path, {"step": 2, "student": {"w": torch.zeros(3)}})
    monkeypatch.undo()
    state = ckpt.load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["student"]["w"], torch.ones(3))
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_eval_report_and_grid(workspace, tmp_path):
    trained = run(workspace, tmp_path / "run", steps=2)
    torch.manual_seed(1)
    reference = TAESDDecoder("taesd")
    torch.save(reference.state_dict(), tmp_path / "taesd_decoder.pth")
    out = tmp_path / "eval"
    code = main([
        "eval", str(workspace["held_out"]), "--decoder", f"tiny={trained}", "--encoder", str(workspace["encoder"]),
        "--reference", str(tmp_path / "taesd_decoder.pth"), "--preview-data", str(workspace["images"]),
        "--size", "32x48", "--speed-runs", "1", "--grid-images", "2", "--grid-crop", "0", "-o", str(out),
        "--threads", "1",
    ])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert [row["decoder"] for row in report["rows"]] == ["reference (taesd_decoder.pth)", "latent preview", "tiny"]
    assert len(report["images"]) == 3 and report["size"] == [32, 48]
    for row in report["rows"]:
        assert np.isfinite(row["psnr"]) and -1 <= row["ssim"] <= 1 and row["ms_per_image"] > 0
    preview = report["rows"][1]
    assert preview["params"] == 3 * CHANNELS + 3
    table = (out / "report.md").read_text()
    assert table.count("\n| ") == 4 and "| tiny |" in table
    if lpips_unavailable_reason() is not None:
        assert report["lpips"].startswith("not available")
    with Image.open(out / "grid.png") as grid:  # 2 rows (32 px + label) x 4 columns (original + 3 decoders)
        assert grid.size == (4 * 48, 2 * (32 + 16))


def test_eval_prints_readable_lines_not_python_dicts():
    from fastdec.evaluation import format_params, score_line

    assert [format_params(n) for n in (99, 12_345, 1_338_499)] == ["99", "12.3K", "1.34M"]
    line = score_line("latent preview", {"psnr": 18.0, "ssim": 0.5, "ms_per_image": 0.2, "params": 99,
                                         "per_image": {"psnr": [17.9, 18.1]}})
    assert line == "latent preview: PSNR 18.00 dB, SSIM 0.500, 0.2 ms/image, 99 parameters"


def test_latent_preview_fit_recovers_a_linear_map():
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(3, CHANNELS, generator=g) * 0.1, torch.rand(3, generator=g)
    latents = [torch.randn(CHANNELS, 5, 6, generator=g) for _ in range(3)]
    images = [torch.nn.functional.interpolate((torch.einsum("oc,chw->ohw", weight, z) + bias[:, None, None])[None],
                                              scale_factor=8)[0] for z in latents]
    preview = LatentPreview.fit(latents, images)
    torch.testing.assert_close(preview.proj.weight[:, :, 0, 0], weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(preview.proj.bias, bias, rtol=1e-4, atol=1e-5)


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    x = torch.from_numpy(smooth_image(1, 40, 48)).permute(2, 0, 1).float() / 255
    y = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    expected = structural_similarity(x.permute(1, 2, 0).numpy(), y.permute(1, 2, 0).numpy(), channel_axis=2,
                                     data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert ssim(y[None], x[None]).item() == pytest.approx(expected, abs=2e-3)
    assert ssim(x[None], x[None]).item() == pytest.approx(1.0, abs=1e-6)


# --- bad input ---------------------------------------------------------------------------------------------------


def test_an_image_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images in"):
        list_images(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "missing")


def test_odd_image_files_are_converted_or_skipped_and_counted(tmp_path, workspace):
    rgb = smooth_image(3, 48, 64)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb[..., 1].astype(np.uint16) * 257).save(tmp_path / "deep.png")  # 16-bit grayscale
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    Image.fromarray(smooth_image(4, 16, 64)).save(tmp_path / "small.png")
    from fastdec.encoders import load_encoder

    encoder = load_encoder(workspace["encoder"])
    samples, skips = load_samples(tmp_path, encoder.encode, 8, 32, encoder.description)
    assert sorted(s.name for s in samples) == ["deep.png", "gray.png", "rgba.png"]
    assert skips.summary() == {"unreadable": 1, "smaller_than_crop": 1}
    deep = next(s for s in samples if s.name == "deep.png")
    assert torch.equal(deep.image[0], torch.from_numpy(rgb[..., 1]))  # 16-bit scaled back to the 8-bit values
    with pytest.raises(ValueError, match="no usable image"):
        load_samples(tmp_path, encoder.encode, 8, 128, encoder.description)


def test_latents_are_encoded_once_for_runs_with_and_without_a_teacher(tmp_path, workspace):
    """A distillation's stages (a teacher, then none) share the cached latents; the teacher's decodes are cached
    apart, and every run gets the same tensors as an uncached one."""
    from fastdec.encoders import load_encoder

    for i in range(2):
        Image.fromarray(smooth_image(i, 48, 64)).save(tmp_path / f"{i}.png")
    encoder, calls = load_encoder(workspace["encoder"]), {"encode": 0, "teacher": 0}
    teacher = TAESDDecoder("taesd", width=8, blocks=(1, 1, 1, 1)).eval()

    def encode(images):
        calls["encode"] += 1
        return encoder.encode(images)

    def decode(latents):
        calls["teacher"] += 1
        return teacher.decode(latents)

    cache = tmp_path / "cache"
    load = dict(folder=tmp_path, downscale=8, min_size=32, encoder_id=encoder.description)
    uncached, _ = load_samples(encode=encode, teacher=decode, teacher_id="t", **load)
    first, _ = load_samples(encode=encode, teacher=decode, teacher_id="t", cache_dir=cache, **load)
    assert calls == {"encode": 4, "teacher": 4}
    without, _ = load_samples(encode=encode, cache_dir=cache, **load)
    again, _ = load_samples(encode=encode, teacher=decode, teacher_id="t", cache_dir=cache, **load)
    assert calls == {"encode": 4, "teacher": 4}, "nothing encoded or decoded twice"
    for a, b, c in zip(uncached, again, without, strict=True):
        assert torch.equal(a.latents, b.latents) and torch.equal(a.teacher, b.teacher)
        assert torch.equal(a.latents, c.latents) and c.teacher is None


def test_channel_mismatch_and_bad_upsampling_are_errors(workspace, tmp_path):
    with pytest.raises(ValueError, match="4-channel latents but the student"):
        run(workspace, tmp_path / "a", decoder=TAESDDecoder("tae-192", 16, width=8, blocks=(1, 1, 1, 1)))
    with pytest.raises(ValueError, match="does not match the encoder"):
        run(workspace, tmp_path / "b", decoder="tae-192", latent_channels=32)
    twice = DCAEDecoder(CHANNELS, block_out_channels=(8, 8), layers_per_block=(1, 1),  # 2x, not 8x
                        norm_types="batch_norm", act_fns="relu", qkv_multiscales=((),) * 2)
    with pytest.raises(ValueError, match="upsampling does not match"):
        run(workspace, tmp_path / "c", decoder=twice)


def test_bad_resume_paths_are_errors(workspace, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run(workspace, tmp_path / "a", resume=str(tmp_path / "nowhere"))
    run(workspace, tmp_path / "b", steps=1)
    with pytest.raises(ValueError, match="holds a TAESDDecoder"):
        run(workspace, tmp_path / "c", decoder=tiny_efficientvit(), resume=str(tmp_path / "b"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a fastdec training checkpoint"):
        run(workspace, tmp_path / "d", resume=str(tmp_path / "junk.pt"))


def test_cli_errors_are_one_line(workspace, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["train", str(empty), "-o", str(tmp_path / "out"), "--encoder", str(workspace["encoder"])])
    assert code == 2 and "fastdec train: error: no images in" in capsys.readouterr().err


def test_lpips_without_local_weights_says_what_to_install():
    reason = lpips_unavailable_reason()
    if reason is None:
        pytest.skip("LPIPS weights are on this machine")
    with pytest.raises(LPIPSUnavailable, match="LPIPS is not available: .*(pip install lpips|download)"):
        load_lpips()


def test_shipped_decoders_load_offline_by_name(monkeypatch):
    """Every decoder committed under weights/ loads by its folder name without the network: fp16 safetensors of at
    most 16 MB with a model card, decoding 32-channel TAEF2 latents to 8x the size."""
    import fastdec
    from fastdec.api import shipped_weights

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shipped = shipped_weights()
    if not shipped:
        pytest.skip("no decoder under weights/")
    from safetensors import safe_open

    for name, folder in shipped.items():
        weights = folder / "model.safetensors"
        assert weights.stat().st_size <= 16 * 2**20, name
        with safe_open(str(weights), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}, name
        card = json.loads((folder / "model_card.json").read_text())
        assert card["steps"] > 0 and card["latent_space"]["latent_channels"] == 32
        decoder = fastdec.load(name)
        images = decoder.decode(torch.zeros(1, 32, 4, 6))
        assert images.shape == (1, 3, 32, 48) and torch.isfinite(images).all(), name
        assert name in fastdec.api.names()


def test_a_preset_student_is_built_even_beside_a_folder_of_its_name(tmp_path, monkeypatch):
    # `fastdec train ... -o vit-s --decoder vit-s` run from the folder that holds the run: the preset, not the path.
    from fastdec.train.loop import build_student

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tae-192").mkdir()
    student = build_student("tae-192", CHANNELS)
    assert isinstance(student, TAESDDecoder) and student.latent_channels == CHANNELS


def test_eval_encodes_only_the_preview_images_it_uses(tmp_path):
    """--preview-images 2 of a folder of 5 photos encodes 2, not 5 (a 4-image eval encoded 200 photos)."""
    from types import SimpleNamespace

    from fastdec.evaluation import fit_preview

    folder = tmp_path / "photos"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for index in range(5):
        pixels = (torch.rand(32, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{index}.png")
    calls = []

    def encode(images):
        calls.append(images.shape[0])
        return torch.nn.functional.avg_pool2d(images, 8).repeat(1, 2, 1, 1)[:, :CHANNELS]

    encoder = SimpleNamespace(encode=encode, downscale=8, description="test pooling encoder")
    preview = fit_preview([str(folder)], encoder, 2, cache_dir=None)
    assert sum(calls) == 2 and preview.latent_channels == CHANNELS


def test_ctrl_c_checkpoints_at_a_step_boundary_and_resume_stays_exact(workspace, tmp_path, monkeypatch, capsys):
    """A Ctrl-C during step 2 finishes that step, checkpoints, and stops with a message and status 130 from the
    CLI; --resume then gives the weights of an uninterrupted run."""
    import os
    import signal

    from fastdec.train import loop

    straight = checkpoint(run(workspace, tmp_path / "straight").parent)
    lr_at, pressed = loop.lr_at, []

    def lr_at_then_ctrl_c(step, config):
        if step == 1 and not pressed:  # once, inside step 2 (0-based 1), before its update
            pressed.append(step)
            os.kill(os.getpid(), signal.SIGINT)
        return lr_at(step, config)

    monkeypatch.setattr(loop, "lr_at", lr_at_then_ctrl_c)
    with pytest.raises(loop.TrainingInterrupted, match="interrupted at step 2 of 4, checkpointed; run the same "
                                                       "command with --resume"):
        run(workspace, tmp_path / "resumed")
    assert "stopping after this step" in capsys.readouterr().err
    assert checkpoint(tmp_path / "resumed")["step"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    monkeypatch.setattr(loop, "lr_at", lr_at)
    run(workspace, tmp_path / "resumed", resume=str(tmp_path / "resumed"))
    resumed = checkpoint(tmp_path / "resumed")
    for key in straight["student"]:
        torch.testing.assert_close(straight["student"][key], resumed["student"][key], rtol=1e-6, atol=1e-7)
