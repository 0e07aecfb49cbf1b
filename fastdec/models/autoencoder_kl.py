"""The decoder of diffusers' AutoencoderKL (SD 1/2, SDXL, SD3, FLUX.1 VAEs), exact, built from fastdec ops.

Same parameters and state-dict keys as ``diffusers.AutoencoderKL`` (``post_quant_conv.*``, ``decoder.*``) and
the same math; what changes is how each step runs:

* every GroupNorm + SiLU is one fused ``ops.group_norm_act`` (the attention's GroupNorm too, with act="none");
* the mid-block self-attention (one head as wide as the channels) is ``ops.attention``;
* each "nearest x2 upsample + 3x3 conv" runs as a 2x2 conv with 4x the output channels on the low-resolution
  input, interleaved by ``ops.pixel_shuffle(., 2, phase_offset=1)``: 4/9 of the FLOPs, no upsampled copy.

channels_last is the preferred layout: ``model.to(memory_format=torch.channels_last)`` keeps it throughout.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastdec import ops
from fastdec.models.base import Decoder, load_weights, read_diffusers_vae
from fastdec.models.layers import UpsampleConv, norm_act, norm_act_conv
from fastdec.models.registry import Family, Weights, register

NORM_EPS = 1e-6  # diffusers hard-codes this epsilon for every norm of the VAE decoder

PRESETS: dict[str, dict] = {
    "sd": dict(latent_channels=4, scaling_factor=0.18215, shift_factor=0.0, use_post_quant_conv=True),
    "sdxl": dict(latent_channels=4, scaling_factor=0.13025, shift_factor=0.0, use_post_quant_conv=True,
                 force_upcast=True),
    "sd3": dict(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_post_quant_conv=False),
    "flux": dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_post_quant_conv=False),
}

# Attention parameter names of checkpoints saved before diffusers 0.14; diffusers renames them on load.
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=NORM_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=NORM_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = norm_act_conv(self.norm2, self.conv2, norm_act_conv(self.norm1, self.conv1, x, "silu"), "silu")
        # In place: a new sum would hold x, h, the shortcut and the sum at once (1280 MiB at 1024^2 bf16).
        return h.add_(x) if self.conv_shortcut is None else self.conv_shortcut(x).add_(h)


class SelfAttention(nn.Module):
    """diffusers' mid-block Attention(_from_deprecated_attn_block=True) over all H*W positions: one head as wide as
    the channels in the image VAEs; ``heads`` heads of channels / heads in the temporal mid-block (models.svd)."""

    def __init__(self, channels: int, groups: int, heads: int = 1):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels do not split into {heads} attention heads")
        self.heads = heads
        self.group_norm = nn.GroupNorm(groups, channels, eps=NORM_EPS)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = norm_act(self.group_norm, x, "none").flatten(2).transpose(1, 2)  # (B, HW, C), a view if NHWC
        q, k, v = (proj(tokens).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, heads, HW, C / heads)
                   for proj in (self.to_q, self.to_k, self.to_v))
        out = self.to_out[0](ops.attention(q, k, v).transpose(1, 2).flatten(2))
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([SelfAttention(channels, groups)] if add_attention else [])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Upsample(nn.Module):
    """Nearest x2 + 3x3 conv (diffusers' Upsample2D), folded into one 2x2 conv + pixel shuffle by UpsampleConv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = UpsampleConv(channels, channels)  # keys: upsamplers.0.conv.{weight,bias}, as in diffusers

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class UpBlock(nn.Module):
    """diffusers' UpDecoderBlock2D: resnets, then an optional upsampler; VAEDecoder runs ``layers()`` one by one."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, upsample: bool):
        super().__init__()
        widths_in = [in_channels] + [out_channels] * (num_layers - 1)
        self.resnets = nn.ModuleList([ResnetBlock(width, out_channels, groups) for width in widths_in])
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def layers(self) -> list[nn.Module]:
        return [*self.resnets, *(self.upsamplers or ())]


class VAEDecoder(nn.Module):
    """diffusers.models.autoencoders.vae.Decoder with norm_type="group" and UpDecoderBlock2D up blocks."""

    def __init__(
        self,
        latent_channels: int,
        out_channels: int,
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        groups: int,
        mid_block_add_attention: bool,
    ):
        super().__init__()
        widths = list(reversed(block_out_channels))
        self.conv_in = nn.Conv2d(latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], groups, mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpBlock(widths[max(i - 1, 0)], width, layers_per_block + 1, groups, upsample=i < len(widths) - 1)
            for i, width in enumerate(widths)
        )
        self.conv_norm_out = nn.GroupNorm(groups, block_out_channels[0], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        # Layer by layer rather than block by block: a block's caller would hold the block's input until the block
        # returns, which at 1024^2 keeps a 256-512 MiB tensor alive through the largest layers.
        for layer in [layer for up_block in self.up_blocks for layer in up_block.layers()]:
            x = layer(x)
        return norm_act_conv(self.conv_norm_out, self.conv_out, x, "silu")


class AutoencoderKLDecoder(Decoder):
    """AutoencoderKL's decode path: post_quant_conv (SD 1/2, SDXL only), then the decoder; images in [-1, 1].

    ``force_upcast`` is diffusers' flag for VAEs that overflow in fp16 (SDXL's). It is kept as information:
    the module runs in whatever dtype it is given.
    """

    channels_last_on_cuda = True

    def __init__(
        self,
        latent_channels: int = 4,
        out_channels: int = 3,
        block_out_channels: tuple[int, ...] = (128, 256, 512, 512),
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
        scaling_factor: float = 0.18215,
        shift_factor: float = 0.0,
        force_upcast: bool = False,
        latents_mean: list[float] | None = None,
        latents_std: list[float] | None = None,
    ):
        super().__init__()
        if (latents_mean is None) != (latents_std is None) or (
            latents_mean is not None and not len(latents_mean) == len(latents_std) == latent_channels
        ):
            raise ValueError(
                f"latents_mean and latents_std come together, {latent_channels} values each (one per latent "
                f"channel), got {latents_mean} and {latents_std}"
            )
        self.config = dict(
            latent_channels=latent_channels,
            out_channels=out_channels,
            block_out_channels=list(block_out_channels),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            use_post_quant_conv=use_post_quant_conv,
            mid_block_add_attention=mid_block_add_attention,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            force_upcast=force_upcast,
        )
        if latents_mean is not None:  # only in the config when set: older saved configs stay valid
            self.config.update(latents_mean=list(latents_mean), latents_std=list(latents_std))
        self.latent_channels = latent_channels
        self.scaling_factor, self.shift_factor = scaling_factor, shift_factor
        self.force_upcast = force_upcast
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None
        self.decoder = VAEDecoder(
            latent_channels, out_channels, tuple(block_out_channels), layers_per_block, norm_num_groups,
            mid_block_add_attention,
        )
        # Per-channel latent statistics (Playground v2.5-style SDXL VAEs): not in diffusers' state dict, so not in
        # ours (persistent=False); buffers so that .to() moves them.
        for name, values in (("latents_mean", latents_mean), ("latents_std", latents_std)):
            buffer = None if values is None else torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)
            self.register_buffer(name, buffer, persistent=False)

    def to_decoder_space(self, latents: Tensor) -> Tensor:
        """``latents / scaling_factor + shift_factor``; with latents_mean/latents_std, per channel
        ``latents * latents_std / scaling_factor + latents_mean``, in the order SDXL's pipeline computes it."""
        if self.latents_mean is None:
            return super().to_decoder_space(latents)
        mean, std = (t.to(latents.device, latents.dtype) for t in (self.latents_mean, self.latents_std))
        return latents * std / self.scaling_factor + mean

    def latent_affine(self) -> tuple[list[float], list[float]]:
        if self.latents_mean is None:
            return super().latent_affine()
        mean, std = self.config["latents_mean"], self.config["latents_std"]
        return [s / self.scaling_factor for s in std], [float(m) for m in mean]

    def forward(self, z: Tensor) -> Tensor:
        """Latents in the VAE's own space (B, latent_channels, h, w) -> images (B, 3, 8h, 8w) in ~[-1, 1]."""
        self.check_input(z, "; check that the latents come from this VAE (SD/SDXL: 4 channels, SD3/FLUX: 16)")
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> AutoencoderKLDecoder:
        """A randomly initialised decoder with the architecture and latent convention of PRESETS[name]."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    diffusers_class = "AutoencoderKL"  # what from_diffusers reads (a module of this class, or its folder)

    @classmethod
    def from_diffusers(cls, vae_or_folder, device=None, dtype=None) -> AutoencoderKLDecoder:
        """From a diffusers ``diffusers_class`` module or its saved folder (config.json, diffusion_pytorch_model.*).

        A pipeline folder works too (its ``vae/`` subfolder is read). Only the decoder's weights are kept
        (``decoder.*``, ``post_quant_conv.*``): the encoder's are dropped, any other key is an error.
        """
        config, state, source = read_diffusers_vae(vae_or_folder, cls.diffusers_class)
        model = cls(**cls.kwargs_from_diffusers(config, source))
        return load_weights(model, _decoder_state(state), source, device, dtype)

    @classmethod
    def kwargs_from_diffusers(cls, config: dict, source: str) -> dict:
        """The diffusers config as this class's constructor arguments (read_diffusers_vae has checked its class);
        refuses what this decoder does not implement."""
        block_out_channels = list(config.get("block_out_channels", [64]))
        up_blocks = list(config.get("up_block_types", ["UpDecoderBlock2D"]))
        problems = []
        if set(up_blocks) != {"UpDecoderBlock2D"} or len(up_blocks) != len(block_out_channels):
            problems.append(f"up_block_types={up_blocks} (only UpDecoderBlock2D, one per block_out_channels)")
        if config.get("act_fn", "silu") != "silu":
            problems.append(f"act_fn={config['act_fn']!r} (only 'silu')")
        if problems:
            raise ValueError(f"{source}: AutoencoderKLDecoder does not implement " + "; ".join(problems))
        return dict(
            latent_channels=config.get("latent_channels", 4),
            out_channels=config.get("out_channels", 3),
            block_out_channels=block_out_channels,
            layers_per_block=config.get("layers_per_block", 1),
            norm_num_groups=config.get("norm_num_groups", 32),
            use_post_quant_conv=config.get("use_post_quant_conv", True),
            mid_block_add_attention=config.get("mid_block_add_attention", True),
            scaling_factor=config.get("scaling_factor", 0.18215),
            shift_factor=config.get("shift_factor") or 0.0,
            force_upcast=config.get("force_upcast", True),
            latents_mean=config.get("latents_mean"),
            latents_std=config.get("latents_std"),
        )


def _decoder_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The decoder's part of a full AutoencoderKL state dict, legacy attention names renamed."""
    kept = {}
    for key, value in state.items():
        if key.startswith(("encoder.", "quant_conv.")):
            continue  # the encoder half of the VAE
        parts = key.split(".")
        if len(parts) >= 3 and "attentions" in parts[:-2] and parts[-2] in LEGACY_ATTENTION_NAMES:
            key = ".".join([*parts[:-2], LEGACY_ATTENTION_NAMES[parts[-2]], parts[-1]])
        kept[key] = value
    return kept


register(Family(
    name="autoencoder_kl", order=0, classes=(AutoencoderKLDecoder,),
    names={  # diffusers AutoencoderKLs on the Hub: exact decoders with trained weights
        "sd": Weights(hub=("stabilityai/sd-vae-ft-mse", None)),
        "sdxl": Weights(hub=("stabilityai/sdxl-vae", None)),
        "sd3": Weights(hub=("stabilityai/stable-diffusion-3-medium-diffusers", "vae")),
        "flux": Weights(hub=("black-forest-labs/FLUX.1-schnell", "vae")),
    },
    aliases={"sd1": "sd", "sd2": "sd", "flux1": "flux"},
    diffusers={"AutoencoderKL": lambda vae_or_folder, name: AutoencoderKLDecoder.from_diffusers(vae_or_folder)},
))
