"""EfficientViT decoders in the style of DC-AE's decoder (Chen et al. 2024, mit-han-lab/efficientvit).

Stages follow DC-AE: ``widths``/``depths`` list them from the image end (stage 0) to the latent end (the last
stage), and the decoder runs them last to first. A stage of depth 0 is skipped; every other stage except the last one
starts with a x2 upsample, and the head upsamples x2 when stage 0 is empty. So the paper's preset, widths
[128, 128, 128, 256, 256, 256] and depths [0, 5, 10, 0, 0, 0], runs (8x in all, 6.22M parameters):

    project_in   3x3 conv C -> 256 + channel-duplicating shortcut         at h x w
    stage 2      upsample 256 -> 128, 10 ResBlocks of 128                 at 2h x 2w
    stage 1      upsample 128 -> 128,  5 ResBlocks of 128                 at 4h x 4w
    head         GroupNorm+ReLU, 3x3 conv 128 -> 12, pixel shuffle x2     -> 3 x 8h x 8w

Pieces:

* ResBlock: x + norm(conv2(act(conv1(x)))), DC-AE's. norm="batch" (the paper's, DC-AE's bn2d) trains with
  BatchNorm; ``fuse_for_inference()`` folds each BatchNorm into its conv (exact, free at inference), and
  ``decode()`` always uses the running statistics, even on a model left in train mode. norm="group" is a fused
  ``ops.group_norm_act`` instead, the same in train and eval.
* Upsample: 3x3 conv C_in -> 4*C_out then ``ops.pixel_shuffle(., 2)``. DC-AE's channel-duplicating shortcut
  adds the input with each channel repeated 4*C_out/C_in times; the shuffle is a permutation, so the sum is
  taken before it and only one shuffle runs.
* block type "attn": a stage of pre-norm multi-head self-attention blocks (``ops.attention``) over the pixels
  of the feature map, preceded by a depthwise 3x3 conv (a conditional position encoding, so any size works).
  The preset "efficientvit-attn" adds two such blocks at the latent resolution (stage 5, 4 heads of 64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdec import ops
from fastdec.models.base import Decoder
from fastdec.models.layers import norm_act
from fastdec.models.vit import TransformerBlock, init_transformer_weights

NORMS = ("batch", "group")
ACTS = ("relu", "silu")
BLOCK_TYPES = ("res", "attn")
NORM_EPS = 1e-6


def duplicate_channels(x: Tensor, channels: int) -> Tensor:
    """DC-AE's channel-duplicating shortcut: each input channel repeated channels/C times, in place order."""
    return x.repeat_interleave(channels // x.shape[1], dim=1)


class ResBlock(nn.Module):
    """x + norm(conv2(act(conv1(x)))); after fuse_batch_norm(), x + conv2(act(conv1(x))) with conv2 biased."""

    def __init__(self, channels: int, norm: str, act: str, norm_groups: int, fused: bool):
        super().__init__()
        self.act = act
        folded = norm == "batch" and fused
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=folded)  # a norm follows or is folded in
        if folded:
            self.norm = None
        elif norm == "batch":
            self.norm = nn.BatchNorm2d(channels)
        else:
            self.norm = nn.GroupNorm(norm_groups, channels, eps=NORM_EPS)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(F.relu(self.conv1(x)) if self.act == "relu" else F.silu(self.conv1(x)))
        if isinstance(self.norm, nn.GroupNorm):
            h = norm_act(self.norm, h, "none")
        elif self.norm is not None:
            h = self.norm(h)
        return x + h

    @torch.no_grad()
    def fuse_batch_norm(self) -> None:
        """conv2 then eval-mode BatchNorm -> one conv with bias (scale folded into the weight, in fp32)."""
        norm, conv = self.norm, self.conv2
        scale = norm.weight.float() * torch.rsqrt(norm.running_var.float() + norm.eps)
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1, device=conv.weight.device,
                          dtype=conv.weight.dtype)
        fused.weight.copy_(conv.weight.float() * scale[:, None, None, None])
        fused.bias.copy_(norm.bias.float() - norm.running_mean.float() * scale)
        self.conv2, self.norm = fused, None


class Upsample(nn.Module):
    """3x3 conv C_in -> 4*C_out, pixel shuffle x2; with ``shortcut``, DC-AE's channel-duplicating shortcut."""

    def __init__(self, in_channels: int, out_channels: int, shortcut: bool):
        super().__init__()
        if shortcut and (4 * out_channels) % in_channels:
            raise ValueError(
                f"the duplicating shortcut of an upsample {in_channels} -> {out_channels} channels needs "
                f"4*{out_channels} to be a multiple of {in_channels}; change the widths or set "
                "upsample_shortcut=False"
            )
        self.shortcut = shortcut
        self.conv = nn.Conv2d(in_channels, 4 * out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        if self.shortcut:
            y = y + duplicate_channels(x, y.shape[1])
        return ops.pixel_shuffle(y, 2)


class AttentionStage(nn.Module):
    """``depth`` transformer blocks over the feature map's pixels, after a depthwise 3x3 position conv."""

    def __init__(self, channels: int, depth: int, head_dim: int, mlp_ratio: float):
        super().__init__()
        if channels % head_dim:
            raise ValueError(f"attention stage width {channels} is not a multiple of head_dim {head_dim}")
        self.position = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        heads = channels // head_dim
        self.blocks = nn.Sequential(*[TransformerBlock(channels, heads, mlp_ratio) for _ in range(depth)])
        init_transformer_weights(self.blocks)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        x = x + self.position(x)
        tokens = self.blocks(x.flatten(2).transpose(1, 2))  # (B, H*W, C)
        return tokens.transpose(1, 2).reshape(batch, channels, height, width)


class EfficientViTDecoder(Decoder):
    """DC-AE-style decoder: latents (B, C, h, w) -> images (B, 3, spatial_factor*h, spatial_factor*w), ~[-1, 1].

    ``block_types`` is one of BLOCK_TYPES for every stage, or a list with one per stage. ``fused=True`` builds
    the inference form of a norm="batch" model (no BatchNorm, biased conv2), which ``fuse_for_inference()``
    produces from a trained one; its config says so, so save/load keeps the form.
    """

    def __init__(
        self,
        latent_channels: int = 4,
        widths: tuple[int, ...] = (128, 128, 128, 256, 256, 256),
        depths: tuple[int, ...] = (0, 5, 10, 0, 0, 0),
        block_types: str | tuple[str, ...] = "res",
        norm: str = "batch",
        act: str = "relu",
        norm_groups: int = 32,
        head_dim: int = 64,
        mlp_ratio: float = 4.0,
        upsample_shortcut: bool = True,
        fused: bool = False,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
    ):
        super().__init__()
        widths, depths = list(widths), list(depths)
        block_types = [block_types] * len(widths) if isinstance(block_types, str) else list(block_types)
        if not widths or len(depths) != len(widths) or len(block_types) != len(widths):
            raise ValueError(
                f"widths, depths and block_types need one entry per stage (at least one stage), got "
                f"{len(widths)} widths, {len(depths)} depths, {len(block_types)} block types"
            )
        if min(widths) < 1 or min(depths) < 0:
            raise ValueError(f"widths must be positive and depths non-negative, got {widths} and {depths}")
        for name, value, allowed in [("norm", norm, NORMS), ("act", act, ACTS)] + [
            ("block type", kind, BLOCK_TYPES) for kind in block_types
        ]:
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if widths[-1] % latent_channels:
            raise ValueError(
                f"the channel-duplicating shortcut of project_in needs the last width ({widths[-1]}) to be a "
                f"multiple of latent_channels ({latent_channels})"
            )
        self.config = dict(
            latent_channels=latent_channels, widths=widths, depths=depths, block_types=block_types, norm=norm,
            act=act, norm_groups=norm_groups, head_dim=head_dim, mlp_ratio=mlp_ratio,
            upsample_shortcut=upsample_shortcut, fused=fused, scaling_factor=scaling_factor,
            shift_factor=shift_factor,
        )
        self.latent_channels = latent_channels
        self.scaling_factor, self.shift_factor = scaling_factor, shift_factor
        self.output_range = "-1,1"

        self.project_in = nn.Conv2d(latent_channels, widths[-1], 3, padding=1)
        channels, upsamples, stages = widths[-1], 0, []
        for index in reversed(range(len(widths))):
            if depths[index] == 0:
                continue
            layers = []
            if index < len(widths) - 1:
                layers.append(Upsample(channels, widths[index], upsample_shortcut))
                channels, upsamples = widths[index], upsamples + 1
            if block_types[index] == "attn":
                layers.append(AttentionStage(channels, depths[index], head_dim, mlp_ratio))
            else:
                layers += [ResBlock(channels, norm, act, norm_groups, fused) for _ in range(depths[index])]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)

        self.head_upsample = 2 if depths[0] == 0 else 1
        self.head_norm = nn.GroupNorm(norm_groups, channels, eps=NORM_EPS)
        self.head_conv = nn.Conv2d(channels, 3 * self.head_upsample**2, 3, padding=1)
        self.spatial_factor = 2**upsamples * self.head_upsample

    def forward(self, z: Tensor) -> Tensor:
        """Latents in the decoder's own space (B, latent_channels, h, w) -> images (B, 3, f*h, f*w), ~[-1, 1],
        f = spatial_factor (8 for the presets)."""
        if z.dim() != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(
                f"expected latents of shape (B, {self.latent_channels}, h, w), got {tuple(z.shape)}"
            )
        x = self.project_in(z) + duplicate_channels(z, self.project_in.out_channels)
        x = self.stages(x)
        x = self.head_conv(norm_act(self.head_norm, x, self.config["act"]))
        return ops.pixel_shuffle(x, self.head_upsample) if self.head_upsample > 1 else x

    def decode(self, latents: Tensor, check_finite: bool | None = None) -> Tensor:
        """Decoder.decode, with every BatchNorm on its running statistics even if the model is in train mode:
        decoding is inference, and batch statistics would make each image depend on the rest of the batch."""
        training = [m for m in self.modules() if isinstance(m, nn.BatchNorm2d) and m.training]
        for module in training:
            module.eval()
        try:
            return super().decode(latents, check_finite)
        finally:
            for module in training:
                module.train()

    def fuse_for_inference(self) -> EfficientViTDecoder:
        """Folds every BatchNorm into the conv before it (eval-mode math, exact up to rounding) and returns
        the model in eval mode. Afterwards config["fused"] is True; a fused model is for inference (no
        BatchNorm to train). A no-op for norm="group" or an already fused model."""
        if self.config["norm"] == "batch" and not self.config["fused"]:
            for module in self.modules():
                if isinstance(module, ResBlock):
                    module.fuse_batch_norm()
            self.config["fused"] = True
        return self.eval()


PRESETS: dict[str, tuple[type[Decoder], dict]] = {
    "efficientvit": (
        EfficientViTDecoder, dict(widths=(128, 128, 128, 256, 256, 256), depths=(0, 5, 10, 0, 0, 0))
    ),
    "efficientvit-attn": (
        EfficientViTDecoder,
        dict(
            widths=(128, 128, 128, 256, 256, 256),
            depths=(0, 5, 10, 0, 0, 2),
            block_types=("res", "res", "res", "res", "res", "attn"),
            head_dim=64,
        ),
    ),
}
