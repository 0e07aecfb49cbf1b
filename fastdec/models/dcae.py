"""DC-AE: the decoder of diffusers' ``AutoencoderDC`` (Chen et al. 2024, the deep-compression autoencoder behind
SANA), exact, built from fastdec ops; and the paper's EfficientViT decoders as DC-AE configurations.

Same parameters and state-dict keys as ``diffusers.AutoencoderDC``'s decoder (``decoder.conv_in``,
``decoder.up_blocks.<i>.<j>``, ``decoder.norm_out``, ``decoder.conv_out``) and the same math. Stages are listed from
the image end (stage 0) to the latent end and run last to first; a stage with layers starts with an x2 upsample
(except the last one), then runs its blocks:

* ``ResBlock``: x + norm(conv2(act(conv1(x)))), norm a channel RMSNorm or a BatchNorm (``fuse_for_inference``
  folds BatchNorms into conv2; ``decode`` always uses their running statistics);
* ``EfficientViTBlock``: multi-scale ReLU linear attention (q, k, v, plus depthwise 5x5-aggregated copies of them),
  then a GLU inverted-bottleneck conv (GLUMBConv), each with a channel RMSNorm and a residual. The attention's
  matmuls run in fp32, as in diffusers;
* upsample: a 3x3 conv to 4x the channels and a pixel shuffle ("pixel_shuffle"), or nearest x2 + 3x3 conv
  ("interpolate", folded into one 2x2 conv by ``UpsampleConv``), plus DC-AE's channel-duplicating shortcut (the
  input, each channel repeated, pixel-shuffled). For "pixel_shuffle" the shortcut is added before the one shuffle.

Every channel RMSNorm runs as ``ops.rms_norm_act`` (the head's RMSNorm + ReLU as one fused op); ``project_in``'s
shortcut repeats the latent channels up to the first width (``in_shortcut``).

The paper's EfficientViT presets (Buzovkin & Shilov 2025) are DC-AE configurations: "efficientvit" is DC-AE's
in/mix f32c32 layout cut to 8x (widths 128..256, depths [0, 5, 10, 0, 0, 0], BatchNorm + ReLU ResBlocks, RMSNorm head);
"efficientvit-attn" adds two of DC-AE's EfficientViT blocks at the latent resolution.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdec import ops
from fastdec.models.base import Decoder, load_weights, read_diffusers_vae
from fastdec.models.layers import UpsampleConv
from fastdec.models.registry import Family, Weights, register

BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")
NORM_TYPES = ("rms_norm", "batch_norm")
ACTIVATIONS = {"relu": F.relu, "silu": F.silu, "relu6": F.relu6}
UPSAMPLE_TYPES = ("pixel_shuffle", "interpolate")
NORM_EPS = 1e-5  # diffusers' get_normalization and the head's RMSNorm
LINEAR_ATTENTION_EPS = 1e-15


class ChannelRMSNorm(nn.Module):
    """diffusers' RMSNorm(channels, 1e-5, elementwise_affine=True, bias=True) over the channel axis, as the fused
    ``ops.rms_norm_act`` (with the activation that follows it, if any)."""

    def __init__(self, channels: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor, act: str = "none") -> Tensor:
        return ops.rms_norm_act(x, self.weight, self.bias, self.eps, act)


def make_norm(norm_type: str, channels: int) -> nn.Module:
    return ChannelRMSNorm(channels) if norm_type == "rms_norm" else nn.BatchNorm2d(channels, eps=NORM_EPS)


class ResBlock(nn.Module):
    """x + norm(conv2(act(conv1(x)))); after fuse_batch_norm(), x + conv2(act(conv1(x))) with conv2 biased."""

    def __init__(self, channels: int, norm_type: str, act: str, fused: bool = False):
        super().__init__()
        self.act = ACTIVATIONS[act]
        folded = norm_type == "batch_norm" and fused
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=folded)
        self.norm = None if folded else make_norm(norm_type, channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(self.act(self.conv1(x)))
        return x + (h if self.norm is None else self.norm(h))

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


class MultiscaleProjection(nn.Module):
    """One extra scale of q, k, v: a depthwise k x k conv, then a 1x1 conv grouped per head (no biases)."""

    def __init__(self, channels: int, heads: int, kernel_size: int):
        super().__init__()
        self.proj_in = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels,
                                 bias=False)
        self.proj_out = nn.Conv2d(channels, channels, 1, groups=3 * heads, bias=False)

    def forward(self, qkv: Tensor) -> Tensor:
        return self.proj_out(self.proj_in(qkv))


def _pointwise(x: Tensor, *linears: nn.Linear) -> Tensor:
    """nn.Linear(s) applied over the channel axis of (B, C, H, W), as one 1x1 convolution (no layout change)."""
    weight = linears[0].weight if len(linears) == 1 else torch.cat([linear.weight for linear in linears])
    return F.conv2d(x, weight[:, :, None, None])


class MultiscaleLinearAttention(nn.Module):
    """diffusers' SanaMultiscaleLinearAttention (residual_connection=True, mult 1): ReLU linear attention per head
    over all positions, at 1 + len(kernel_sizes) scales; quadratic (ReLU-normalised) when H*W <= head_dim."""

    def __init__(self, channels: int, head_dim: int, kernel_sizes: tuple[int, ...], norm_type: str):
        super().__init__()
        if channels % head_dim:
            raise ValueError(f"EfficientViT block width {channels} is not a multiple of attention_head_dim {head_dim}")
        self.head_dim = head_dim
        heads = channels // head_dim  # of head_dim each: together as wide as the block
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels, bias=False) for _ in range(3))
        self.to_qkv_multiscale = nn.ModuleList(MultiscaleProjection(3 * channels, heads, k) for k in kernel_sizes)
        self.to_out = nn.Linear(channels * (1 + len(kernel_sizes)), channels, bias=False)
        self.norm_out = make_norm(norm_type, channels)

    def forward(self, x: Tensor) -> Tensor:
        batch, _, height, width = x.shape
        qkv = _pointwise(x, self.to_q, self.to_k, self.to_v)
        qkv = torch.cat([qkv, *(projection(qkv) for projection in self.to_qkv_multiscale)], dim=1)
        linear = height * width > self.head_dim
        if linear:
            qkv = qkv.float()  # diffusers upcasts the linear attention to fp32
        q, k, v = qkv.reshape(batch, -1, 3 * self.head_dim, height * width).chunk(3, dim=2)
        q, k = F.relu(q), F.relu(k)
        if linear:
            v = F.pad(v, (0, 0, 0, 1), value=1.0)  # a row of ones: the normaliser comes out of the same matmuls
            out = (v @ k.transpose(-1, -2)) @ q
            out = (out[:, :, :-1] / (out[:, :, -1:] + LINEAR_ATTENTION_EPS)).to(x.dtype)
        else:
            scores = (k.transpose(-1, -2) @ q).float()
            scores = scores / (scores.sum(dim=2, keepdim=True) + LINEAR_ATTENTION_EPS)
            out = v @ scores.to(v.dtype)
        out = _pointwise(out.reshape(batch, -1, height, width), self.to_out)
        return x + self.norm_out(out)


class GLUMBConv(nn.Module):
    """x + RMSNorm(conv_point(h * silu(gate))), (h, gate) = conv_depth(silu(conv_inverted(x))) split in two."""

    def __init__(self, channels: int, expand_ratio: float = 4):
        super().__init__()
        hidden = int(expand_ratio * channels)
        self.conv_inverted = nn.Conv2d(channels, 2 * hidden, 1)
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.conv_point = nn.Conv2d(hidden, channels, 1, bias=False)
        self.norm = ChannelRMSNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        h, gate = self.conv_depth(F.silu(self.conv_inverted(x))).chunk(2, dim=1)
        return x + self.norm(self.conv_point(h * F.silu(gate)))


class EfficientViTBlock(nn.Module):
    def __init__(self, channels: int, head_dim: int, kernel_sizes: tuple[int, ...], norm_type: str):
        super().__init__()
        self.attn = MultiscaleLinearAttention(channels, head_dim, kernel_sizes, norm_type)
        self.conv_out = GLUMBConv(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_out(self.attn(x))


class UpBlock(nn.Module):
    """DC-AE's DCUpBlock2d: x2 upsample (pixel shuffle or nearest + conv), with the duplicating shortcut."""

    def __init__(self, in_channels: int, out_channels: int, interpolate: bool, shortcut: bool):
        super().__init__()
        if shortcut and (4 * out_channels) % in_channels:
            raise ValueError(
                f"the duplicating shortcut of an upsample {in_channels} -> {out_channels} channels needs "
                f"4*{out_channels} to be a multiple of {in_channels}: change the widths"
            )
        self.interpolate, self.shortcut = interpolate, shortcut
        self.repeats = 4 * out_channels // in_channels
        self.conv = UpsampleConv(in_channels, out_channels) if interpolate else nn.Conv2d(
            in_channels, 4 * out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        if self.interpolate:
            return y + ops.pixel_shuffle(x.repeat_interleave(self.repeats, dim=1), 2) if self.shortcut else y
        if self.shortcut:  # pixel shuffle is a permutation: add before the one shuffle
            y = y + x.repeat_interleave(self.repeats, dim=1)
        return ops.pixel_shuffle(y, 2)


class DCDecoder(nn.Module):
    """diffusers.models.autoencoders.autoencoder_dc.Decoder (the ``decoder.`` part of AutoencoderDC)."""

    def __init__(self, latent_channels: int, out_channels: int, widths: list[int], depths: list[int],
                 block_types: list[str], norm_types: list[str], act_fns: list[str], qkv_multiscales: list[tuple],
                 head_dim: int, interpolate: bool, in_shortcut: bool, conv_act_fn: str, fused: bool):
        super().__init__()
        self.conv_in = nn.Conv2d(latent_channels, widths[-1], 3, padding=1)
        self.in_shortcut_repeats = widths[-1] // latent_channels if in_shortcut else 0
        up_blocks = []
        for i in range(len(widths)):
            layers: list[nn.Module] = []
            if i < len(widths) - 1 and depths[i] > 0:
                layers.append(UpBlock(widths[i + 1], widths[i], interpolate, shortcut=True))
            for _ in range(depths[i]):
                if block_types[i] == "ResBlock":
                    layers.append(ResBlock(widths[i], norm_types[i], act_fns[i], fused))
                else:
                    layers.append(EfficientViTBlock(widths[i], head_dim, tuple(qkv_multiscales[i]), norm_types[i]))
            up_blocks.append(nn.Sequential(*layers))
        self.up_blocks = nn.ModuleList(up_blocks)
        channels = widths[0] if depths[0] > 0 else widths[1]
        self.conv_act_fn = conv_act_fn
        self.norm_out = ChannelRMSNorm(channels)
        self.conv_out = (nn.Conv2d(channels, out_channels, 3, padding=1) if depths[0] > 0
                         else UpBlock(channels, out_channels, interpolate, shortcut=False))

    def forward(self, z: Tensor) -> Tensor:
        x = self.conv_in(z)
        if self.in_shortcut_repeats:
            x = x + z.repeat_interleave(self.in_shortcut_repeats, dim=1)
        # Layer by layer, so that no stage's input outlives its first layer (as in autoencoder_kl.VAEDecoder).
        for layer in [layer for up_block in reversed(self.up_blocks) for layer in up_block]:
            x = layer(x)
        return self.conv_out(self.norm_out(x, self.conv_act_fn))


class DCAEDecoder(Decoder):
    """AutoencoderDC's decode path: latents (B, C, h, w) -> images (B, 3, f*h, f*w) in ~[-1, 1] (f =
    ``spatial_factor``: 32 for DC-AE f32, 8 for the EfficientViT presets).

    Arguments are AutoencoderDC's ``decoder_*`` config fields without the prefix (per-stage values may be one value
    for all stages). ``fused=True`` builds the inference form of a BatchNorm model (``fuse_for_inference``).
    """

    channels_last_on_cuda = True

    def __init__(
        self,
        latent_channels: int = 32,
        block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024),
        layers_per_block: tuple[int, ...] = (3, 3, 3, 3, 3, 3),
        block_types: str | tuple[str, ...] = "ResBlock",
        norm_types: str | tuple[str, ...] = "rms_norm",
        act_fns: str | tuple[str, ...] = "silu",
        qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,)),
        attention_head_dim: int = 32,
        upsample_block_type: str = "pixel_shuffle",
        in_shortcut: bool = True,
        conv_act_fn: str = "relu",
        out_channels: int = 3,
        fused: bool = False,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
    ):
        super().__init__()
        widths, depths = list(block_out_channels), list(layers_per_block)
        stages = len(widths)
        per_stage = {}
        for name, value in (("block_types", block_types), ("norm_types", norm_types), ("act_fns", act_fns)):
            per_stage[name] = [value] * stages if isinstance(value, str) else list(value)
        qkv_multiscales = [list(scales) for scales in qkv_multiscales]
        _check_config(latent_channels, widths, depths, per_stage, qkv_multiscales, upsample_block_type, conv_act_fn)
        self.config = dict(
            latent_channels=latent_channels, block_out_channels=widths, layers_per_block=depths, **per_stage,
            qkv_multiscales=qkv_multiscales, attention_head_dim=attention_head_dim,
            upsample_block_type=upsample_block_type, in_shortcut=in_shortcut, conv_act_fn=conv_act_fn,
            out_channels=out_channels, fused=fused, scaling_factor=scaling_factor, shift_factor=shift_factor,
        )
        self.latent_channels = latent_channels
        self.scaling_factor, self.shift_factor = scaling_factor, shift_factor
        self.decoder = DCDecoder(
            latent_channels, out_channels, widths, depths, per_stage["block_types"], per_stage["norm_types"],
            per_stage["act_fns"], qkv_multiscales, attention_head_dim, upsample_block_type == "interpolate",
            in_shortcut, conv_act_fn, fused,
        )
        self.spatial_factor = 2 ** (sum(depth > 0 for depth in depths[:-1]) + (depths[0] == 0))  # + the head x2

    def forward(self, z: Tensor) -> Tensor:
        """Latents in the decoder's own space (B, latent_channels, h, w) -> images, ~[-1, 1]."""
        self.check_input(z)
        return self.decoder(z)

    def decode_checked(self, latents: Tensor) -> Tensor:
        """Decoder.decode_checked, with every BatchNorm on its running statistics even if the model is in train mode:
        decoding is inference, and batch statistics would make each image depend on the rest of the batch."""
        training = [m for m in self.modules() if isinstance(m, nn.BatchNorm2d) and m.training]
        for module in training:
            module.eval()
        try:
            return super().decode_checked(latents)
        finally:
            for module in training:
                module.train()

    def fuse_for_inference(self) -> DCAEDecoder:
        """Folds every ResBlock BatchNorm into conv2 (eval-mode math, exact up to rounding) and returns the model in
        eval mode; config["fused"] becomes True (conv2 gains a bias, so DC-AE checkpoints no longer load into it).
        A no-op without BatchNorm ResBlocks or when already fused."""
        blocks = [m for m in self.modules() if isinstance(m, ResBlock) and isinstance(m.norm, nn.BatchNorm2d)]
        if blocks:
            for block in blocks:
                block.fuse_batch_norm()
            self.config["fused"] = True
        return self.eval()

    @classmethod
    def from_diffusers(cls, vae_or_folder, device=None, dtype=None) -> DCAEDecoder:
        """From a ``diffusers.AutoencoderDC``, its folder, or a pipeline folder (its ``vae/``, e.g. SANA's). The
        encoder's weights are dropped; every decoder key must match."""
        config, state, source = read_diffusers_vae(vae_or_folder, "AutoencoderDC")
        model = cls(**_config_from_diffusers(config))
        decoder_state = {k: v for k, v in state.items() if not k.startswith("encoder.")}
        return load_weights(model, decoder_state, source, device, dtype)


def _check_config(latent_channels, widths, depths, per_stage, qkv_multiscales, upsample_block_type, conv_act_fn):
    stages = len(widths)
    counts = {"layers_per_block": len(depths), "qkv_multiscales": len(qkv_multiscales),
              **{name: len(values) for name, values in per_stage.items()}}
    if stages < 2 or any(count != stages for count in counts.values()):
        raise ValueError(f"block_out_channels and every per-stage setting need one entry per stage (at least two), "
                         f"got {stages} widths and {counts}")
    if min(widths) < 1 or min(depths) < 0:
        raise ValueError(f"widths must be positive and depths non-negative, got {widths} and {depths}")
    allowed = {"block_types": BLOCK_TYPES, "norm_types": NORM_TYPES, "act_fns": tuple(ACTIVATIONS)}
    for name, values in per_stage.items():
        for value in values:
            if value not in allowed[name]:
                raise ValueError(f"{name} entries must be one of {allowed[name]}, got {value!r}")
    channels = widths[-1]  # DC-AE upsamples into stage i from width i + 1: a skipped stage must not change width
    for i in reversed(range(stages - 1)):
        if depths[i] > 0:
            if widths[i + 1] != channels:
                raise ValueError(f"stage {i} upsamples from block_out_channels[{i + 1}] = {widths[i + 1]} but the "
                                 f"stages after it leave {channels} channels: give skipped stages the same width")
            channels = widths[i]
    if (widths[0] if depths[0] > 0 else widths[1]) != channels:
        raise ValueError(f"the head reads {widths[0] if depths[0] > 0 else widths[1]} channels but the stages leave "
                         f"{channels}: give skipped stages the same width")
    if upsample_block_type not in UPSAMPLE_TYPES:
        raise ValueError(f"upsample_block_type must be one of {UPSAMPLE_TYPES}, got {upsample_block_type!r}")
    if conv_act_fn not in ("relu", "silu"):
        raise ValueError(f"conv_act_fn must be 'relu' or 'silu' (rms_norm_act's activations), got {conv_act_fn!r}")
    if widths[-1] % latent_channels:
        raise ValueError(
            f"the channel-duplicating shortcut of conv_in needs the last width ({widths[-1]}) to be a multiple of "
            f"latent_channels ({latent_channels})"
        )


def _config_from_diffusers(config: dict) -> dict:
    """diffusers AutoencoderDC config -> DCAEDecoder kwargs (the decoder_* fields; defaults are AutoencoderDC's)."""
    ours = {name: parameter.default for name, parameter in inspect.signature(DCAEDecoder).parameters.items()}
    prefixed = {"block_out_channels", "layers_per_block", "qkv_multiscales", "in_shortcut", "conv_act_fn"}
    renamed = {"block_types": "decoder_block_types", "norm_types": "decoder_norm_types", "act_fns": "decoder_act_fns",
               **{name: f"decoder_{name}" for name in prefixed}, "out_channels": "in_channels"}
    kwargs = {name: config.get(renamed.get(name, name), ours[name]) for name in ours if name not in ("fused",)}
    kwargs["shift_factor"] = 0.0  # AutoencoderDC latents are only scaled
    return kwargs


_EFFICIENTVIT = dict(block_out_channels=(128, 128, 128, 256, 256, 256), block_types="ResBlock",
                     norm_types="batch_norm", act_fns="relu", qkv_multiscales=((),) * 6)
PRESETS: dict[str, tuple[type[Decoder], dict]] = {
    "efficientvit": (DCAEDecoder, dict(_EFFICIENTVIT, layers_per_block=(0, 5, 10, 0, 0, 0))),
    "efficientvit-attn": (
        DCAEDecoder,
        dict(
            _EFFICIENTVIT,
            layers_per_block=(0, 5, 10, 0, 0, 2),
            block_types=("ResBlock",) * 5 + ("EfficientViTBlock",),
            norm_types=("batch_norm",) * 5 + ("rms_norm",),
            act_fns=("relu",) * 5 + ("silu",),
            qkv_multiscales=((),) * 5 + ((5,),),
        ),
    ),
}
# DC-AE f32c32 as released (mit-han-lab/dc-ae-f32c32-{in,mix}-1.0): the layout of SANA-era DC-AE checkpoints.
F32C32 = dict(
    latent_channels=32, block_out_channels=(128, 256, 512, 512, 1024, 1024), layers_per_block=(0, 5, 10, 2, 2, 2),
    block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    norm_types=("batch_norm",) * 3 + ("rms_norm",) * 3, act_fns=("relu",) * 3 + ("silu",) * 3,
    qkv_multiscales=((),) * 3 + ((5,),) * 3, upsample_block_type="pixel_shuffle",
)


register(Family(
    name="dcae", order=20, classes=(DCAEDecoder,),
    names={"dc-ae": Weights(hub=("mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers", None))},  # SANA's VAE
    diffusers={"AutoencoderDC": lambda vae_or_folder, name: DCAEDecoder.from_diffusers(vae_or_folder)},
    presets=PRESETS,
))
