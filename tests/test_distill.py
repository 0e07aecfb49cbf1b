"""fastdec distill end to end on tiny images (prune -> distil -> fine-tune -> frontier evaluation), its resume after
an interruption, its refusals; and the channel pruning it starts from (fastdec.train.prune)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from fastdec.cli import main
from fastdec.models.taesd import TAESDDecoder, TAESDEncoder
from fastdec.train import distill as distill_module
from fastdec.train.distill import DistillConfig, distill, student_width
from fastdec.train.loop import TrainingInterrupted
from fastdec.train.prune import prune_taesd


def smooth(seed: int, height: int = 48, width: int = 64) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, height // 8 + 1, width // 8 + 1, generator=g)
    image = torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)[0]
    return Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))


@pytest.fixture(scope="module")
def space(tmp_path_factory) -> dict[str, Path]:
    """Four training and two held-out images, a random taesd encoder .pth and a 16-wide TAESD teacher folder."""
    root = tmp_path_factory.mktemp("distill")
    for folder, count, offset in (("train", 4, 0), ("held_out", 2, 100)):
        (root / folder).mkdir()
        for i in range(count):
            smooth(offset + i).save(root / folder / f"{i}.png")
    torch.manual_seed(0)
    torch.save(TAESDEncoder("taesd").state_dict(), root / "encoder.pth")
    TAESDDecoder("taesd", width=16, blocks=(1, 1, 1, 1)).save_pretrained(root / "teacher")
    return {"root": root, "train": root / "train", "held_out": root / "held_out", "encoder": root / "encoder.pth",
            "teacher": root / "teacher"}


def config(space, output: Path, **options) -> DistillConfig:
    defaults = dict(data=[str(space["train"])], output=str(output), teacher=str(space["teacher"]),
                    encoder=str(space["encoder"]), width=8, distill_steps=3, finetune_steps=2, crop=32, batch=2,
                    eval_data=str(space["held_out"]), eval_images=2, threads=1,
                    cache_dir=str(space["root"] / "cache"))
    return DistillConfig(**{**defaults, **options})


def test_distill_end_to_end_from_the_cli(space, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", str(space["train"]), "-o", str(out), "--teacher", str(space["teacher"]), "--encoder",
                 str(space["encoder"]), "--width", "8", "--distill-steps", "3", "--finetune-steps", "2", "--crop",
                 "32", "--batch", "2", "--eval-data", str(space["held_out"]), "--eval-images", "2", "--threads",
                 "1"]) == 0
    printed = capsys.readouterr().out
    assert "student (width 8): PSNR" in printed and "reference (teacher): PSNR" in printed
    assert json.loads((out / "student" / "config.json").read_text())["width"] == 8
    for stage, steps in (("distill", 3), ("finetune", 2)):
        lines = (out / stage / "metrics.jsonl").read_text().splitlines()
        assert json.loads(lines[-1])["step"] == steps
        assert (out / stage / "decoder" / "model.safetensors").is_file() and (out / stage / "curves.png").is_file()
    assert "distill" in json.loads((out / "distill" / "metrics.jsonl").read_text().splitlines()[-1])
    report = json.loads((out / "eval" / "report.json").read_text())
    assert [row["decoder"] for row in report["rows"]] == ["reference (teacher)", "latent preview",
                                                          "student (width 8)"]
    assert all(row["ms_per_image"] > 0 for row in report["rows"])
    assert (out / "eval" / "frontier.png").is_file()


def test_an_interrupted_distillation_resumes_to_the_same_student(space, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    distill(config(space, straight))
    real_train = distill_module.train

    def interrupted_in_finetuning(train_config):
        if Path(train_config.output).name != "finetune":
            return real_train(train_config)
        train_config.stop_at = 1  # checkpointed at step 1, as Ctrl-C leaves it
        real_train(train_config)
        raise TrainingInterrupted(1, train_config.steps, Path(train_config.output))

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(distill_module, "train", interrupted_in_finetuning)
    with pytest.raises(TrainingInterrupted):
        distill(config(space, resumed))
    monkeypatch.setattr(distill_module, "train", real_train)
    distill(config(space, resumed))
    for stage in ("distill", "finetune"):
        a = (straight / stage / "decoder" / "model.safetensors").read_bytes()
        assert a == (resumed / stage / "decoder" / "model.safetensors").read_bytes(), stage


def test_distill_refusals(space, tmp_path):
    with pytest.raises(ValueError, match="--eval-data is needed"):
        distill(config(space, tmp_path / "a", eval_data=None))
    with pytest.raises(ValueError, match="not below the teacher's 16 channels"):
        distill(config(space, tmp_path / "b", width=16))
    run = tmp_path / "c"
    (run).mkdir()
    (run / "distill.json").write_text(json.dumps({**vars(config(space, run)), "width": 12}))
    with pytest.raises(ValueError, match="width differ"):
        distill(config(space, run))
    dcae_like = torch.nn.Module()
    with pytest.raises(ValueError, match="pass its --width"):
        student_width(dcae_like, None, 2.0)
    teacher = TAESDDecoder("taesd", blocks=(1, 1, 1, 1))
    assert student_width(teacher, None, None) == 44  # 64 / sqrt(2) = 45.3 -> the multiple of 4 below
    with pytest.raises(ValueError, match="not both"):
        student_width(teacher, 32, 2.0)


def test_pruning_keeps_the_live_channels_exactly():
    """A teacher whose pruned channels carry nothing (zero in and out) decodes exactly as its pruned student."""
    torch.manual_seed(0)
    teacher = TAESDDecoder("taesd", width=12, blocks=(1, 1)).eval()
    dead = [1, 5, 9, 10]  # stream channels; each block's inner channels too
    with torch.no_grad():
        for module in teacher.modules():
            if isinstance(module, torch.nn.Conv2d) or type(module).__name__ == "UpsampleConv":
                out_channels, in_channels = module.weight.shape[:2]
                if out_channels == 12:
                    module.weight[dead] = 0
                    if module.bias is not None:
                        module.bias[dead] = 0
                if in_channels == 12:
                    module.weight[:, dead] = 0
    latents = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    student = prune_taesd(teacher, 8, latents)
    assert student.config["width"] == 8 and sum(p.numel() for p in student.parameters()) < sum(
        p.numel() for p in teacher.parameters())
    with torch.no_grad():
        torch.testing.assert_close(student(latents), teacher(latents), rtol=1e-5, atol=1e-6)


def test_pruning_taef2_keeps_four_equal_groups_in_its_norm_branch():
    torch.manual_seed(0)
    teacher = TAESDDecoder("taef2", width=16, blocks=(1, 1)).eval()
    student = prune_taesd(teacher, 8, torch.randn(1, 32, 4, 4))
    norm = student[3].pool[1]
    assert (norm.num_groups, norm.num_channels) == (4, 32)
    assert student(torch.randn(1, 32, 4, 4)).shape == teacher(torch.randn(1, 32, 4, 4)).shape
    with pytest.raises(ValueError, match="multiple of 4"):
        prune_taesd(teacher, 6, torch.randn(1, 32, 4, 4))


def test_pruning_per_stage_keeps_each_stages_live_channels_exactly():
    """Each stage's stream is ranked on its own: the upsampling conv starts the next stage's stream afresh."""
    torch.manual_seed(0)
    teacher = TAESDDecoder("taesd", width=12, blocks=(1, 1)).eval()
    first, second = [2, 3, 7, 11], [0, 4, 5, 6, 8, 9, 10, 11]  # per stage: channels that carry nothing
    # blocks=(1, 1): Clamp, conv, ReLU, Block | Identity, UpsampleConv, Block | conv
    with torch.no_grad():
        teacher[1].weight[first], teacher[1].bias[first] = 0, 0
        teacher[5].weight[second] = 0
        for block, dead in ((teacher[3], first), (teacher[6], second)):
            for conv in block.conv[::2]:  # the stream and each inner activation lose the same channels
                conv.weight[dead], conv.bias[dead] = 0, 0
    latents = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    student = prune_taesd(teacher, [8, 4], latents)
    assert student.config["width"] == [8, 4] and student.widths == (8, 4)
    with torch.no_grad():
        torch.testing.assert_close(student(latents), teacher(latents), rtol=1e-5, atol=1e-6)


def test_per_stage_widths_parse_save_and_load(tmp_path):
    from fastdec.train.distill import parse_width

    assert parse_width("32") == 32 and parse_width("64,64,48,32") == [64, 64, 48, 32]
    with pytest.raises(argparse.ArgumentTypeError, match="one per stage like 64,64,48,32"):
        parse_width("64,x")
    decoder = TAESDDecoder("taef2", width=[16, 12, 8, 4]).eval()
    assert [m.weight.shape[:2] for m in decoder if type(m).__name__ == "UpsampleConv"] == [(12, 16), (8, 12), (4, 8)]
    decoder.save_pretrained(tmp_path / "d")
    loaded = TAESDDecoder.from_pretrained(tmp_path / "d")
    latents = torch.randn(1, 32, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(latents), decoder(latents))
    with pytest.raises(ValueError, match="one per stage \\(4 stages\\)"):
        TAESDDecoder("taef2", width=[16, 8])
    with pytest.raises(ValueError, match="multiple of 4 from 4 to the teacher's 16"):
        prune_taesd(TAESDDecoder("taef2", width=16), [16, 16, 16, 20], torch.randn(1, 32, 4, 4))
