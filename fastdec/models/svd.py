"""Stable Video Diffusion's VAE decoder (diffusers ``AutoencoderKLTemporalDecoder``), exact, built from fastdec ops,
and the temporal blocks it is made of, which the paper's tae-temporal decoder (models.tae_temporal) reuses.

SVD latents are per-frame image latents: diffusers' pipeline hands its VAE ``(B*T, 4, h, w)`` plus ``num_frames`` and
the decoder mixes frames in time inside every block. Each block is a spatial ResnetBlock2D on every frame, then a
temporal resnet (GroupNorm over (C, T, H, W), Conv3d with kernel (3, 1, 1)) on the clip, mixed with the spatial
result by a learned alpha; the decoder ends with a (3, 1, 1) Conv3d over time. Same parameters and state-dict keys
as diffusers (``decoder.*``); what changes is how each step runs:

* every GroupNorm + SiLU is one fused ``ops.group_norm_act`` (4-D per frame, 5-D over the clip);
* the mid-block attention is ``ops.attention``; each "nearest x2 + 3x3 conv" is the fold (layers.UpsampleConv);
* the blend ``alpha * s + (1 - alpha) * (s + h)`` of the spatial output s with the temporal resnet's s + h is
  ``s + sigmoid(mix_factor) * h``, the gain folded into the temporal resnet's last conv: one pass fewer per block.

Layout contract: fastdec video decoders take (B, C, T, h, w) latents (``decode``, ``forward``) and return frames
(B, T, 3, H, W); ``decode_frames(z, num_frames)`` is diffusers' per-frame form, (B*T, C, h, w) -> (B*T, 3, H, W),
which ``fastdec.diffusers.swap_vae`` uses for StableVideoDiffusionPipeline. In channels_last the per-frame tensors
(B*T, H, W, C in memory) are the clip in channels_last_3d, so going from frames to clip and back copies nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdec.models.autoencoder_kl import NORM_EPS, ResnetBlock, SelfAttention, Upsample
from fastdec.models.base import Decoder, checked_chunk, load_weights, read_diffusers_vae
from fastdec.models.layers import norm_act, suggested_format
from fastdec.models.registry import Family, Weights, register

GROUPS = 32  # diffusers hard-codes 32 groups in every norm of the temporal decoder
TEMPORAL_EPS = 1e-5  # ... and this epsilon in the temporal resnets (1e-6 elsewhere)


def frames_to_clips(x: Tensor, num_frames: int) -> Tensor:
    """(B*T, C, H, W) -> (B, C, T, H, W): a view in channels_last (it is then channels_last_3d), else one copy."""
    clips = x.unflatten(0, (-1, num_frames)).transpose(1, 2)
    return clips if suggested_format(x) == torch.channels_last else clips.contiguous()


def clips_to_frames(x: Tensor) -> Tensor:
    """(B, C, T, H, W) -> (B*T, C, H, W), the inverse of frames_to_clips."""
    return x.transpose(1, 2).flatten(0, 1)


class TemporalResnetBlock(nn.Module):
    """diffusers' TemporalResnetBlock without time embedding: GroupNorm+SiLU, (3, 1, 1) Conv3d, twice, plus x."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(GROUPS, channels, eps=TEMPORAL_EPS)
        self.conv1 = nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))
        self.norm2 = nn.GroupNorm(GROUPS, channels, eps=TEMPORAL_EPS)
        self.conv2 = nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))

    def residual(self, clips: Tensor, gain: Tensor) -> Tensor:
        """gain * (block(x) - x), the gain folded into conv2's weight and bias."""
        h = self.conv1(norm_act(self.norm1, clips, "silu"))
        h = norm_act(self.norm2, h, "silu")
        return F.conv3d(h, self.conv2.weight * gain, self.conv2.bias * gain, padding=(1, 0, 0))


class AlphaBlender(nn.Module):
    """diffusers' AlphaBlender (merge_strategy "learned"): holds ``mix_factor``; sigmoid(mix_factor) is the temporal
    share of the blend (switch_spatial_to_temporal_mix)."""

    def __init__(self):
        super().__init__()
        self.mix_factor = nn.Parameter(torch.zeros(1))  # diffusers' merge_factor=0.0: an even blend at init


class SpatioTemporalResBlock(nn.Module):
    """Spatial ResnetBlock2D per frame, then ``s + sigmoid(mix) * (temporal_resnet(s) - s)`` over each clip."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.spatial_res_block = ResnetBlock(in_channels, out_channels, GROUPS)
        self.temporal_res_block = TemporalResnetBlock(out_channels)
        self.time_mixer = AlphaBlender()

    def spatial(self, x: Tensor, num_frames: int) -> Tensor:
        """Frames (B*T, C, H, W) -> the spatial block's output as clips (B, C, T, H, W)."""
        return frames_to_clips(self.spatial_res_block(x), num_frames)

    def temporal(self, clips: Tensor) -> Tensor:
        """Clips -> the blend with the temporal block's output, as frames."""
        return clips_to_frames(clips + self.temporal_res_block.residual(clips, self.time_mixer.mix_factor.sigmoid()))

    def layers(self, num_frames: int) -> list[Callable[[Tensor], Tensor]]:
        """The two halves forward runs in order, as one-tensor calls (so that a caller can drop each input)."""
        return [functools.partial(self.spatial, num_frames=num_frames), self.temporal]

    def forward(self, x: Tensor, num_frames: int) -> Tensor:
        return self.temporal(self.spatial(x, num_frames))


class TemporalMidBlock(nn.Module):
    """diffusers' MidBlockTemporalDecoder: resnets[0], then (attention, resnet) pairs; same parameter names.

    Like diffusers, it holds one attention and runs it only when num_layers >= 2, and runs no resnet past the
    second (zip stops at the one attention): the parameters exist all the same, so checkpoints load."""

    def __init__(self, in_channels: int, out_channels: int, attention_head_dim: int, num_layers: int):
        super().__init__()
        if in_channels % attention_head_dim:
            raise ValueError(f"{in_channels} channels do not split into attention heads of {attention_head_dim}")
        self.resnets = nn.ModuleList(
            SpatioTemporalResBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(num_layers)
        )
        self.attentions = nn.ModuleList([SelfAttention(in_channels, GROUPS, in_channels // attention_head_dim)])

    def forward(self, x: Tensor, num_frames: int) -> Tensor:
        x = self.resnets[0](x, num_frames)
        for resnet, attention in zip(self.resnets[1:], self.attentions, strict=False):
            x = resnet(attention(x), num_frames)
        return x


class TemporalUpBlock(nn.Module):
    """diffusers' UpBlockTemporalDecoder: SpatioTemporalResBlocks, then an optional nearest x2 + 3x3 conv;
    TemporalDecoder runs ``layers(num_frames)`` (the resnets' halves over clips of num_frames) one by one."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, upsample: bool):
        super().__init__()
        widths_in = [in_channels] + [out_channels] * (num_layers - 1)
        self.resnets = nn.ModuleList(SpatioTemporalResBlock(width, out_channels) for width in widths_in)
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def layers(self, num_frames: int) -> list[Callable[[Tensor], Tensor]]:
        return [*(layer for resnet in self.resnets for layer in resnet.layers(num_frames)), *(self.upsamplers or ())]


class TemporalDecoder(nn.Module):
    """diffusers' TemporalDecoder: per-frame latents (B*T, C, h, w) -> per-frame images (B*T, 3, H, W) in ~[-1, 1]."""

    def __init__(self, latent_channels: int, out_channels: int, block_out_channels: tuple[int, ...],
                 layers_per_block: int):
        super().__init__()
        widths = list(reversed(block_out_channels))
        self.conv_in = nn.Conv2d(latent_channels, widths[0], 3, padding=1)
        self.mid_block = TemporalMidBlock(widths[0], widths[0], widths[0], layers_per_block)
        self.up_blocks = nn.ModuleList(
            TemporalUpBlock(widths[max(i - 1, 0)], width, layers_per_block + 1, upsample=i < len(widths) - 1)
            for i, width in enumerate(widths)
        )
        self.conv_norm_out = nn.GroupNorm(GROUPS, block_out_channels[0], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, 3, padding=1)
        self.time_conv_out = nn.Conv3d(out_channels, out_channels, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, z: Tensor, num_frames: int) -> Tensor:
        x = self.mid_block(self.conv_in(z), num_frames)
        # Layer by layer, so that no block's input outlives its first layer (as in autoencoder_kl.VAEDecoder): at 14
        # frames of 576x1024 the last block's input alone is 4 GiB, each clip-layout copy 2 GiB.
        for layer in [layer for up_block in self.up_blocks for layer in up_block.layers(num_frames)]:
            x = layer(x)
        x = self.conv_out(norm_act(self.conv_norm_out, x, "silu"))
        frames = clips_to_frames(self.time_conv_out(frames_to_clips(x, num_frames)))
        # Keep the caller's layout (a one-frame clip has ambiguous strides, and conv3d then picks NCTHW).
        return frames.contiguous(memory_format=suggested_format(z))


class PerFrameVideoDecoder(Decoder):
    """A video decoder of per-frame latents: frame t of the output belongs to latent frame t (T in, T out).

    Subclasses implement ``decode_frames(z, num_frames)`` on (B*T, C, h, w) latents in the decoder's own space;
    ``forward`` takes (B, C, T, h, w) and returns (B, T, 3, H, W) in ``output_range``.
    """

    latent_ndim = 5
    per_frame_latents = True
    decode_options = ("decode_chunk_size",)

    def decode_frames(self, z: Tensor, num_frames: int) -> Tensor:
        raise NotImplementedError

    def check_frames(self, z: Tensor, num_frames: int) -> None:
        """Clear errors for per-frame latents that are not whole clips of num_frames frames."""
        if z.dim() != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(
                f"{type(self).__name__}.decode_frames takes per-frame latents (B*T, {self.latent_channels}, h, w), got "
                f"shape {tuple(z.shape)}; clip latents (B, C, T, h, w) go through decode() or the module itself"
            )
        # SymInt: a frame count that torch.compile traces as dynamic (e.g. after a call with another T)
        if isinstance(num_frames, bool) or not isinstance(num_frames, (int, torch.SymInt)) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive int (frames per clip), got {num_frames!r}")
        if z.shape[0] % num_frames:
            raise ValueError(
                f"{z.shape[0]} latent frames are not whole clips of num_frames={num_frames}: the first axis holds "
                "B*T frames, clip after clip; pass the clip length that divides it"
            )

    def forward(self, z: Tensor) -> Tensor:
        """Latents in the decoder's own space (B, C, T, h, w) -> frames (B, T, 3, H, W)."""
        if z.dim() != 5 or z.shape[1] != self.latent_channels:
            raise ValueError(
                f"{type(self).__name__} expects video latents (B, {self.latent_channels}, T, h, w), got shape "
                f"{tuple(z.shape)}; per-frame latents (B*T, C, h, w) go through decode_frames(z, num_frames)"
            )
        batch, _, num_frames = z.shape[:3]
        frames = self.decode_frames(clips_to_frames(z), num_frames)
        return frames.unflatten(0, (batch, num_frames))

    def decode_checked(self, latents: Tensor, decode_chunk_size: int | None = None) -> Tensor:
        """Diffusion latents (B, C, T, h, w) -> frames (B, T, 3, H, W) in [0, 1].

        ``decode_chunk_size``: None decodes the whole clip at once (every frame sees its neighbours); n decodes
        chunks of n frames as separate clips, as StableVideoDiffusionPipeline does with its ``decode_chunk_size``
        (memory bounded by n frames; frames at chunk borders then differ from a whole-clip decode).
        """
        frames, whole = latents.shape[2], super().decode_checked
        if decode_chunk_size is None or decode_chunk_size >= frames:
            return whole(latents)
        chunks = latents.split(checked_chunk(decode_chunk_size, "decode_chunk_size"), dim=2)
        return torch.cat([whole(chunk) for chunk in chunks], dim=1)


class SVDDecoder(PerFrameVideoDecoder):
    """AutoencoderKLTemporalDecoder's decode path (Stable Video Diffusion); frames in [-1, 1] from ``forward``."""

    output_range = "-1,1"

    def __init__(
        self,
        latent_channels: int = 4,
        out_channels: int = 3,
        block_out_channels: tuple[int, ...] = (128, 256, 512, 512),
        layers_per_block: int = 2,
        scaling_factor: float = 0.18215,
        force_upcast: bool = True,
    ):
        super().__init__()
        if any(width % GROUPS for width in block_out_channels):
            raise ValueError(f"block_out_channels {list(block_out_channels)} must be multiples of {GROUPS} (groups)")
        self.config = dict(
            latent_channels=latent_channels, out_channels=out_channels, block_out_channels=list(block_out_channels),
            layers_per_block=layers_per_block, scaling_factor=scaling_factor, force_upcast=force_upcast,
        )
        self.latent_channels = latent_channels
        self.scaling_factor, self.shift_factor = scaling_factor, 0.0
        self.force_upcast = force_upcast
        self.decoder = TemporalDecoder(latent_channels, out_channels, tuple(block_out_channels), layers_per_block)

    def decode_frames(self, z: Tensor, num_frames: int) -> Tensor:
        """``AutoencoderKLTemporalDecoder.decode(z, num_frames).sample``: (B*T, C, h, w) -> (B*T, 3, H, W)."""
        self.check_frames(z, num_frames)
        return self.decoder(z, num_frames)

    @classmethod
    def from_diffusers(cls, vae_or_folder: nn.Module | str | Path, device=None, dtype=None) -> SVDDecoder:
        """From a diffusers ``AutoencoderKLTemporalDecoder``, its saved folder or a pipeline folder (``vae/``).

        Only ``decoder.*`` is kept; the encoder's keys (``encoder.*``, ``quant_conv.*``) are dropped, any other key
        is an error (strict load)."""
        config, state, source = read_diffusers_vae(vae_or_folder, "AutoencoderKLTemporalDecoder")
        model = cls(
            latent_channels=config.get("latent_channels", 4), out_channels=config.get("out_channels", 3),
            block_out_channels=tuple(config.get("block_out_channels", (64,))),
            layers_per_block=config.get("layers_per_block", 1), scaling_factor=config.get("scaling_factor", 0.18215),
            force_upcast=bool(config.get("force_upcast", True)),
        )
        kept = {k: v for k, v in state.items() if not k.startswith(("encoder.", "quant_conv."))}
        return load_weights(model, kept, source, device, dtype)


register(Family(
    name="svd", order=40, classes=(SVDDecoder,),
    names={"svd": Weights(hub=("stabilityai/stable-video-diffusion-img2vid-xt", "vae"),  # gated
                          about="Stable Video Diffusion, 4 ch")},
    diffusers={"AutoencoderKLTemporalDecoder": lambda vae_or_folder, name: SVDDecoder.from_diffusers(vae_or_folder)},
))
