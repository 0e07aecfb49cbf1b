"""fastdec.train.prune_kl: an AutoencoderKL-family decoder pruned to narrower block_out_channels, from its weights;
and fastdec distill with such a teacher."""

from __future__ import annotations

import json

import pytest
import torch
from test_distill import config, space  # noqa: F401 (the module fixture: images, an encoder, a TAESD teacher)

from fastdec import ops
from fastdec.models.autoencoder_kl import AutoencoderKLDecoder
from fastdec.models.flux2 import Flux2VAEDecoder
from fastdec.train import prune_kl
from fastdec.train.distill import distill, student_width
from fastdec.train.prune_kl import prune_autoencoder_kl


def teacher() -> AutoencoderKLDecoder:
    torch.manual_seed(0)
    return AutoencoderKLDecoder(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8).eval()


def psnr(a, b) -> float:
    return (10 * torch.log10(4 / (a - b).square().mean())).item()  # images in [0, 1]: peak 1, but both clamp


@torch.no_grad()
def test_consistent_channel_permutations_decode_exactly_as_the_teacher(monkeypatch):
    """Every parameter takes the kept channels of the stream or inner activation it reads and writes: with each
    selection a permutation (of groups, and within groups), the student is the teacher with its channels
    reordered and decodes the same images. A parameter indexed by the wrong selection would not."""
    generator = torch.Generator().manual_seed(3)

    def permuted(score, width, groups):
        per_group = score.numel() // groups
        order = torch.randperm(groups, generator=generator)
        within = torch.stack([torch.randperm(per_group, generator=generator) for _ in range(groups)])
        return (order[:, None] * per_group + within).flatten()

    monkeypatch.setattr(prune_kl, "kept_channels", permuted)
    model, latents = teacher(), torch.randn(2, 4, 6, 5)
    student = prune_autoencoder_kl(model, [16, 32, 32], latents)
    assert not torch.equal(student.decoder.conv_in.weight, model.decoder.conv_in.weight)  # really reordered
    torch.testing.assert_close(student.decode(latents), model.decode(latents), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_pruned_student_starts_near_the_teacher_and_keeps_its_class():
    model, latents = teacher(), torch.randn(2, 4, 6, 5)
    student = prune_autoencoder_kl(model, [8, 24, 24], latents)
    assert student.config["block_out_channels"] == [8, 24, 24]
    assert sum(p.numel() for p in student.parameters()) < 0.7 * sum(p.numel() for p in model.parameters())
    random = AutoencoderKLDecoder(block_out_channels=(8, 24, 24), layers_per_block=1, norm_num_groups=8).eval()
    assert psnr(student.decode(latents), model.decode(latents)) > psnr(random.decode(latents), model.decode(latents))
    flux2 = Flux2VAEDecoder(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8).eval()
    small = prune_autoencoder_kl(flux2, [8, 24], torch.randn(1, 32, 4, 4))
    assert type(small) is Flux2VAEDecoder and torch.equal(small.bn.running_var, flux2.bn.running_var)
    assert small.decode(torch.randn(1, 128, 2, 2)).shape == (1, 3, 8, 8)  # packed latents, as FLUX.2 pipelines


def test_refusals():
    model, latents = teacher(), torch.randn(1, 4, 4, 4)
    with pytest.raises(ValueError, match="multiple of the 8 norm groups"):
        prune_autoencoder_kl(model, [12, 32, 32], latents)
    with pytest.raises(ValueError, match="at most the teacher's"):
        prune_autoencoder_kl(model, [16, 40, 40], latents)
    with pytest.raises(ValueError, match="blocks 1 and 2 are both 32 wide"):
        prune_autoencoder_kl(model, [16, 32, 24], latents)
    with pytest.raises(ValueError, match="one --width per block"):
        student_width(model, 8, None)
    assert student_width(model, None, 2.0) == [8, 16, 16]  # 16, 32, 32 / sqrt(2), down to a multiple of 8
    assert student_width(model, [8, 24, 24], None) == [8, 24, 24]


def test_distill_prunes_an_autoencoder_kl_teacher(space, tmp_path):  # noqa: F811
    folder = tmp_path / "kl_teacher"  # 8x upsampling, as the taesd encoder's latent space
    AutoencoderKLDecoder(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8).save_pretrained(
        folder)
    out = tmp_path / "run"
    widths = [8, 8, 24, 24]
    with ops.reference_ops():  # pruning and distillation are under test here, not the kernels (28 s interpreted)
        report = distill(config(space, out, teacher=str(folder), width=widths, distill_steps=2, finetune_steps=1))
    student = json.loads((out / "student" / "config.json").read_text())
    assert student["class"] == "AutoencoderKLDecoder" and student["block_out_channels"] == widths
    assert [row["decoder"] for row in report["rows"]][-1] == f"student (width {widths})"
