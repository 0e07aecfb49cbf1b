"""The decoder of diffusers' AutoencoderKLWan (Wan 2.1, Wan 2.2 14B) and AutoencoderKLQwenImage (same design and
keys), exact, built from fastdec ops and batched in time.

Same parameters and state-dict keys as diffusers (``post_quant_conv.*``, ``decoder.*``) and the same math:
causal 3-D convolutions (time padding on the past side only), channel RMSNorm (``WanRMS_norm``), residual blocks,
a mid-block with per-frame spatial attention (one head as wide as the channels), per-frame "nearest x2 + 3x3 conv"
upsamplers, and spatio-temporal upsamplers whose (3, 1, 1) time conv doubles every frame but the clip's first.
What changes is how it runs:

* diffusers decodes one latent frame per decoder call with a feature cache (the last two input frames of every
  causal conv): thousands of small kernels. A causal conv over a run of frames with the previous run's last two
  input frames prepended computes the same outputs, so here the decoder runs over chunks of ``chunk_frames``
  latent frames (the whole clip at once when it fits), carrying those frames in a ``TimeCache``: the same pixels,
  peak memory set by the chunk size and not by the clip length.
* every RMSNorm (+ SiLU) is one fused ``ops.rms_norm_act``; the attention is ``ops.attention``; the upsamplers'
  "nearest x2 + 3x3 conv" is the 2x2 fold of layers.UpsampleConv.

The first-frame rule of diffusers' frame-by-frame loop, made explicit: the time conv of a spatio-temporal upsampler
does not run on the clip's first frame (which stays one frame), and it sees zeros, not that frame, before the
second. So T latent frames give 1 + 4 (T - 1) frames.

Not built: the residual variant (``is_residual=True``, Wan 2.2 TI2V-5B's 48-channel VAE, with ``patch_size``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastdec import ops
from fastdec.models.base import Decoder, Device, DType, checked_chunk, load_weights, read_diffusers_vae
from fastdec.models.layers import ChannelConstants, UpsampleConv
from fastdec.models.registry import Family, register

# AutoencoderKLWan's default latent statistics (Wan 2.1; Qwen-Image uses the same): z = latents * std + mean.
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip
# decode() runs the whole clip at once while its largest activations stay under this many bytes, else chunks.
WHOLE_CLIP_BUDGET_BYTES = 1 << 30
DIFFUSERS_CLASSES = ("AutoencoderKLWan", "AutoencoderKLQwenImage")

TimeCache = list  # per causal conv (by its ``slot``): the input frames it needs from before the current chunk


class CausalConv3d(nn.Conv3d):
    """diffusers' WanCausalConv3d: zero padding in space, ``kt - 1`` frames of padding on the past side in time.

    With a ``cache`` the past frames are the previous chunk's last input frames (zeros at the clip start), and the
    conv leaves its own last input frames there for the next chunk."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int]):
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        super().__init__(in_channels, out_channels, (kt, kh, kw), padding=(0, kh // 2, kw // 2))
        self.past_frames = kt - 1
        self.slot = -1  # index into the TimeCache, set by WanDecoderBody

    def forward(self, x: Tensor, cache: TimeCache | None = None) -> Tensor:
        if self.past_frames == 0:
            return super().forward(x)
        past = None if cache is None else cache[self.slot]
        if past is None:
            past = x.new_zeros(x.shape[0], x.shape[1], self.past_frames, *x.shape[3:])
        x = torch.cat([past, x], dim=2)
        if cache is not None:
            cache[self.slot] = x[:, :, x.shape[2] - self.past_frames:].clone()  # a copy: x itself is freed
        return super().forward(x)


class RMSNorm(nn.Module):
    """WanRMS_norm's parameter (``gamma``, diffusers' shape) run as one fused ``ops.rms_norm_act``.

    ``F.normalize(x, dim=1) * sqrt(C) * gamma`` is ``x / max(rms(x), 1e-12 / sqrt(C)) * gamma``: eps_mode "clamp"."""

    def __init__(self, channels: int, images: bool = False):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels, *(1,) * (2 if images else 3)))
        self.eps = 1e-12 * channels**-0.5

    def forward(self, x: Tensor, act: str = "silu") -> Tensor:
        return ops.rms_norm_act(x, self.gamma.reshape(-1), None, self.eps, act, "clamp")


def per_frame(layer: nn.Module, x: Tensor) -> Tensor:
    """A 2-D layer on every frame of (B, C, T, H, W)."""
    b, _, t = x.shape[:3]
    y = layer(x.transpose(1, 2).flatten(0, 1))
    return y.unflatten(0, (b, t)).transpose(1, 2)


class ResidualBlock(nn.Module):
    """conv2(silu(norm2(conv1(silu(norm1(x)))))) + shortcut(x), causal 3x3x3 convs (dropout: identity in eval)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = RMSNorm(in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.norm2 = RMSNorm(out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        self.conv_shortcut = CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, cache: TimeCache) -> Tensor:
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        h = self.norm2(self.conv1(self.norm1(x), cache))  # conv1's output is freed before conv2 runs
        return self.conv2(h, cache) + shortcut


class AttentionBlock(nn.Module):
    """WanAttentionBlock: single-head self-attention over the H*W positions of each frame."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = RMSNorm(channels, images=True)
        self.to_qkv = nn.Conv2d(channels, channels * 3, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        frames = self.norm(x, "none").transpose(1, 2).flatten(0, 1)  # per-position norm: the same on 5-D x
        tokens = self.to_qkv(frames).flatten(2).transpose(1, 2).unsqueeze(1)  # (B*T, 1, H*W, 3C)
        q, k, v = tokens.chunk(3, dim=-1)
        out = ops.attention(q, k, v).squeeze(1).transpose(1, 2).unflatten(2, (h, w))
        return x + self.proj(out).unflatten(0, (b, t)).transpose(1, 2)


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(channels, channels) for _ in range(2)])
        self.attentions = nn.ModuleList([AttentionBlock(channels)])

    def forward(self, x: Tensor, cache: TimeCache) -> Tensor:
        x = self.resnets[0](x, cache)
        return self.resnets[1](self.attentions[0](x), cache)


class Upsample(nn.Module):
    """WanResample "upsample2d" / "upsample3d": per frame nearest x2 + 3x3 conv to ``channels // 2``; "upsample3d"
    first runs a causal (3, 1, 1) conv to 2C channels whose halves become two frames, for every frame but the
    clip's first. ``resample.0`` (the nn.Upsample) is folded into ``resample.1``'s conv: an nn.Identity keeps
    diffusers' index."""

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.resample = nn.Sequential(nn.Identity(), UpsampleConv(channels, channels // 2))
        self.time_conv = CausalConv3d(channels, channels * 2, (3, 1, 1)) if temporal else None

    def double_frames(self, x: Tensor, cache: TimeCache) -> Tensor:
        """(B, C, T, H, W) -> (B, C, 2T, H, W) by the time conv, frame t giving frames 2t (first C output
        channels) and 2t + 1; at the clip start (no history yet) the first frame passes through alone, and the
        time conv starts after it from zeros."""
        first = None
        if cache[self.time_conv.slot] is None:
            first, x = x[:, :, :1], x[:, :, 1:]
            if x.shape[2] == 0:  # a one-frame chunk: only the history starts (zeros, as diffusers' "Rep")
                cache[self.time_conv.slot] = first.new_zeros(*first.shape[:2], 2, *first.shape[3:])
                return first
        b, c, t, h, w = x.shape
        doubled = self.time_conv(x, cache).unflatten(1, (2, c)).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
        return doubled if first is None else torch.cat([first, doubled], dim=2)

    def forward(self, x: Tensor, cache: TimeCache) -> Tensor:
        if self.time_conv is not None:
            x = self.double_frames(x, cache)
        return per_frame(self.resample[1], x)


class UpBlock(nn.Module):
    """WanUpBlock: resnets, then an optional upsampler; WanDecoderBody runs ``layers()`` one by one (with the cache)."""

    def __init__(self, in_channels: int, out_channels: int, num_res_blocks: int, upsample: str | None):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_res_blocks
        self.resnets = nn.ModuleList([ResidualBlock(width, out_channels) for width in widths])
        self.upsamplers = (
            nn.ModuleList([Upsample(out_channels, temporal=upsample == "3d")]) if upsample is not None else None
        )

    def layers(self) -> list[nn.Module]:
        return [*self.resnets, *(self.upsamplers or ())]


class WanDecoderBody(nn.Module):
    """diffusers' WanDecoder3d (is_residual=False): conv_in, mid_block, up_blocks, norm_out + SiLU, conv_out."""

    def __init__(
        self,
        dim: int,
        z_dim: int,
        dim_mult: tuple[int, ...],
        num_res_blocks: int,
        temporal_upsample: tuple[bool, ...],
        out_channels: int,
    ):
        super().__init__()
        dims = [dim * u for u in [dim_mult[-1], *reversed(dim_mult)]]
        self.conv_in = CausalConv3d(z_dim, dims[0], 3)
        self.mid_block = MidBlock(dims[0])
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            upsample = None if i == len(dim_mult) - 1 else ("3d" if temporal_upsample[i] else "2d")
            blocks.append(UpBlock(in_dim // 2 if i > 0 else in_dim, out_dim, num_res_blocks, upsample))
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], out_channels, 3)
        causal = [m for m in self.modules() if isinstance(m, CausalConv3d) and m.past_frames > 0]
        for slot, conv in enumerate(causal):
            conv.slot = slot
        self.cache_slots = len(causal)

    def forward(self, x: Tensor, cache: TimeCache) -> Tensor:
        x = self.mid_block(self.conv_in(x, cache), cache)
        # Layer by layer, so that no block's input outlives its first layer (as in autoencoder_kl.VAEDecoder).
        for layer in [layer for up_block in self.up_blocks for layer in up_block.layers()]:
            x = layer(x, cache)
        return self.conv_out(self.norm_out(x), cache)


class WanDecoder(Decoder):
    """AutoencoderKLWan's / AutoencoderKLQwenImage's decode path: post_quant_conv, then the decoder.

    ``decode`` takes the diffusion latents (B, z_dim, T, h, w) a pipeline produces, maps them to the VAE's space
    per channel (``z = latents * latents_std + latents_mean``, as WanPipeline does before ``vae.decode``) and
    returns frames (B, 1 + 4 (T - 1), 3, 8h, 8w) in [0, 1]. ``forward`` takes the VAE's own latents and returns
    what ``AutoencoderKLWan.decode`` does: (B, 3, T_out, H, W) in [-1, 1]. Both run in chunks of latent frames.
    """

    latent_ndim = 5
    output_range = "-1,1"
    decode_options = ("chunk_frames",)

    def __init__(
        self,
        base_dim: int = 96,
        z_dim: int = 16,
        dim_mult: tuple[int, ...] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        temporal_downsample: tuple[bool, ...] = (False, True, True),
        out_channels: int = 3,
        latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN,
        latents_std: tuple[float, ...] = WAN21_LATENTS_STD,
    ):
        super().__init__()
        if len(latents_mean) != z_dim or len(latents_std) != z_dim:
            raise ValueError(f"latents_mean and latents_std need {z_dim} values each (one per latent channel)")
        if len(temporal_downsample) != len(dim_mult) - 1:
            raise ValueError(f"temporal_downsample needs {len(dim_mult) - 1} flags, got {list(temporal_downsample)}")
        self.config = dict(
            base_dim=base_dim,
            z_dim=z_dim,
            dim_mult=list(dim_mult),
            num_res_blocks=num_res_blocks,
            temporal_downsample=list(temporal_downsample),
            out_channels=out_channels,
            latents_mean=list(latents_mean),
            latents_std=list(latents_std),
        )
        self.latent_channels = z_dim
        self.latents_mean, self.latents_std = list(latents_mean), list(latents_std)
        self._latents_mean, self._latents_std = ChannelConstants(latents_mean), ChannelConstants(latents_std)
        self.time_upscale = 2 ** sum(temporal_downsample)
        self.space_upscale = 2 ** (len(dim_mult) - 1)
        self.post_quant_conv = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = WanDecoderBody(
            base_dim, z_dim, tuple(dim_mult), num_res_blocks, tuple(temporal_downsample[::-1]), out_channels
        )

    def frames_out(self, latent_frames: int) -> int:
        """How many frames ``decode`` returns for this many latent frames."""
        return 1 + self.time_upscale * (latent_frames - 1)

    def new_cache(self) -> TimeCache:
        """An empty TimeCache: the state at the start of a clip."""
        return [None] * self.decoder.cache_slots

    def forward(self, z: Tensor, chunk_frames: int | None = None) -> Tensor:
        """VAE-space latents (B, z_dim, T, h, w) -> (B, out_channels, 1 + 4 (T - 1), H, W) clamped to [-1, 1]: what
        AutoencoderKLWan.decode returns. The clip runs in chunks of ``chunk_frames`` latent frames (None: the whole
        clip when its activations fit in WHOLE_CLIP_BUDGET_BYTES, 1 GiB, else the largest chunk that fits, at least
        one frame); every chunk size gives the same frames, and peak memory grows with the chunk, not the clip."""
        if z.dim() != 5 or z.shape[1] != self.latent_channels:
            raise ValueError(
                f"expected VAE-space latents of shape (B, {self.latent_channels}, T, h, w), got {tuple(z.shape)}; "
                "decode() takes the diffusion latents a pipeline produces"
            )
        chunk_frames = self.auto_chunk_frames(z) if chunk_frames is None else checked_chunk(chunk_frames)
        cache = self.new_cache()
        parts = [self.decode_chunk(z[:, :, start:start + chunk_frames], cache)
                 for start in range(0, z.shape[2], chunk_frames)]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)).clamp(-1, 1)

    def decode_chunk(self, z: Tensor, cache: TimeCache) -> Tensor:
        """The next chunk of a clip (VAE-space latents), continuing from the chunks before it that ``cache`` (from
        ``new_cache()``) has seen; unclamped. Streaming: call it as latent frames arrive."""
        return self.decoder(self.post_quant_conv(z), cache)

    def decode_checked(self, latents: Tensor, chunk_frames: int | None = None) -> Tensor:
        """Diffusion latents (B, z_dim, T, h, w) -> frames (B, 1 + 4 (T - 1), 3, H, W) in [0, 1]; ``chunk_frames``
        as in ``forward``."""
        video = self(self.to_vae_space(latents), chunk_frames)
        return (video * 0.5 + 0.5).transpose(1, 2)

    def to_vae_space(self, latents: Tensor) -> Tensor:
        """latents * latents_std + latents_mean per channel, in fp32, cast back to the latents' dtype."""
        std = self._latents_std.get(torch.float32, latents.device, latents.dim())  # built once per device
        mean = self._latents_mean.get(torch.float32, latents.device, latents.dim())
        return (latents.float() * std + mean).to(latents.dtype)

    def auto_chunk_frames(self, latents: Tensor) -> int:
        """The chunk size forward() picks: the whole clip if it fits the budget, else as many latent frames as do."""
        batch, _, frames, height, width = latents.shape
        element = torch.finfo(self.post_quant_conv.weight.dtype).bits // 8
        widest = self.config["base_dim"] * self.config["dim_mult"][0]  # the full-resolution stage's width
        per_frame = batch * self.time_upscale * widest * height * width * self.space_upscale**2 * element
        per_frame *= 4  # a block's input, its padded copy, its output and the shortcut live together
        return max(1, min(frames, WHOLE_CLIP_BUDGET_BYTES // max(1, per_frame)))

    @classmethod
    def from_diffusers(cls, vae_or_folder, device: Device = None, dtype: DType = None) -> WanDecoder:
        """From a ``diffusers.AutoencoderKLWan`` / ``AutoencoderKLQwenImage`` or its saved folder (or a pipeline
        folder with a ``vae/`` subfolder). Only the decoder's weights are kept (``decoder.*``,
        ``post_quant_conv.*``); the encoder's are dropped, any other key is an error."""
        config, state, source = read_diffusers_vae(vae_or_folder, *DIFFUSERS_CLASSES)
        model = cls(**_config_from_diffusers(config, source))
        kept = {k: v for k, v in state.items() if not k.startswith(("encoder.", "quant_conv."))}
        return load_weights(model, kept, source, device, dtype)


def _config_from_diffusers(config: dict, source: str) -> dict:
    """diffusers AutoencoderKLWan / AutoencoderKLQwenImage config -> our kwargs; refuses what is not built here."""
    problems = []
    if config.get("is_residual", False):
        problems.append("is_residual=True (the Wan 2.2 TI2V-5B VAE)")
    if config.get("patch_size") is not None:
        problems.append(f"patch_size={config['patch_size']}")
    if problems:
        raise ValueError(f"{source}: WanDecoder does not implement " + "; ".join(problems))
    qwen_image = config.get("_class_name") == "AutoencoderKLQwenImage"
    return dict(
        base_dim=config.get("decoder_base_dim") or config.get("base_dim", 96),
        z_dim=config.get("z_dim", 16),
        dim_mult=list(config.get("dim_mult", [1, 2, 4, 4])),
        num_res_blocks=config.get("num_res_blocks", 2),
        temporal_downsample=list(config.get("temperal_downsample", [False, True, True])),
        out_channels=config.get("input_channels" if qwen_image else "out_channels", 3),
        latents_mean=list(config.get("latents_mean", WAN21_LATENTS_MEAN)),
        latents_std=list(config.get("latents_std", WAN21_LATENTS_STD)),
    )


register(Family(
    name="wan", order=30, classes=(WanDecoder,),
    diffusers=dict.fromkeys(DIFFUSERS_CLASSES, lambda vae_or_folder, name: WanDecoder.from_diffusers(vae_or_folder)),
))
