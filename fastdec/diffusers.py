"""Drop-in VAE decoding for diffusers pipelines: ``swap_vae(pipe, decoder)`` and the pipeline runs unchanged.

A pipeline hands ``vae.decode`` the latents in the VAE's own space, computed from the diffusion latents x with the
VAE's config: ``z = x / scaling_factor + shift_factor`` (SD, SDXL, SD3, FLUX.1, DiT, ...), or per channel
``z = x * latents_std / scaling_factor + latents_mean`` when the config has latents_mean/latents_std (SDXL's
pipeline). FLUX.2's VAE has no scaling_factor in its config and its pipeline passes the raw VAE latents, which is
the space the taef2 decoder reads. ``FastdecVAE`` keeps the original VAE's config, so the pipeline computes the
same z and the same ``vae_scale_factor``; it maps z back to x and into the fastdec decoder's convention
(``decoder.latent_affine()``: ``x / scaling_factor + shift_factor``, or the decoder's own latents_mean/std; one
per-channel affine map, skipped when it is the identity)
and returns images in [-1, 1], as the pipeline's postprocessing expects.

Precision follows the pipeline: ``force_upcast`` in the wrapper's config says whether *the fastdec decoder*
overflows in fp16 (``decoder.force_upcast``: True for e.g. the SDXL AutoencoderKLDecoder, False for the TAESD
family), and pipelines that honour it (SDXL) cast the wrapper to fp32 around decode as they would the VAE.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

try:
    from diffusers.configuration_utils import FrozenDict
    from diffusers.models.autoencoders.vae import DecoderOutput
except ImportError as error:
    raise ImportError("fastdec.diffusers needs diffusers: pip install 'fastdec[diffusers]'") from error

from fastdec.api import load
from fastdec.models.base import Decoder
from fastdec.models.layers import ChannelConstants


class FastdecVAE(nn.Module):
    """Stands in for a pipeline's VAE: decodes with a fastdec decoder, encodes with the original VAE.

    ``config`` is the original VAE's config (force_upcast excepted, see the module docstring); ``original`` is
    the original VAE, kept for ``encode`` (img2img, inpainting) and for the latent statistics that FLUX.2's
    pipeline reads (``bn``). ``pipe.vae = pipe.vae.original`` undoes the swap.
    """

    def __init__(self, original: nn.Module, decoder: Decoder, force_upcast: bool | None = None):
        super().__init__()
        config = dict(original.config)
        channels = config.get("latent_channels", config.get("z_dim", decoder.latent_channels))  # z_dim: video VAEs
        if channels != decoder.latent_channels:
            raise ValueError(
                f"the pipeline's VAE has {channels} latent channels but {type(decoder).__name__} "
                f"decodes {decoder.latent_channels}: swap in a decoder of this latent space"
            )
        if force_upcast is None:
            force_upcast = bool(decoder.force_upcast)
        self.config = FrozenDict({**config, "force_upcast": force_upcast})
        self.original = original
        self.decoder = decoder.eval()
        self.input_scale, self.input_offset = _input_map(config, decoder)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.decoder.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    @property
    def post_quant_conv(self) -> nn.Module:
        """SDXL's pipeline reads the dtype of ``vae.post_quant_conv``'s parameters after upcasting; decoders
        without one (TAESD family, SD3/FLUX-style) answer with the decoder itself, which has the same dtype."""
        post_quant_conv = getattr(self.decoder, "post_quant_conv", None)
        return self.decoder if post_quant_conv is None else post_quant_conv

    @property
    def bn(self) -> nn.Module:
        """The original VAE's latent BatchNorm statistics (AutoencoderKLFlux2), read by FLUX.2's pipeline."""
        if not hasattr(self.original, "bn"):
            raise AttributeError(f"the original {type(self.original).__name__} has no 'bn' (latent statistics)")
        return self.original.bn

    def decode(self, z: Tensor, return_dict: bool = True, generator: torch.Generator | None = None,
               num_frames: int | None = None):
        """The VAE's decode: latents in the VAE's space -> images in [-1, 1] (``DecoderOutput`` or a 1-tuple).

        ``generator`` is accepted for the pipelines that pass it; decoding is deterministic. ``num_frames``: see
        ``forward``.
        """
        image = self(z, num_frames)
        return DecoderOutput(sample=image) if return_dict else (image,)

    def forward(self, z: Tensor, num_frames: int | None = None) -> Tensor:
        """``num_frames``: StableVideoDiffusionPipeline passes per-frame latents (B*T, C, h, w), clip after clip, with
        the clip length T (it looks for this parameter in ``forward``'s signature). Decoders of per-frame video
        latents (``per_frame_latents``: SVDDecoder, TAETemporalDecoder) need it; image decoders decode every frame on
        its own and do not use it. Video decoders of (B, C, T, h, w) latents (``latent_ndim`` 5, e.g. WanDecoder)
        take what WanPipeline passes, 5-D latents."""
        per_frame_video, video = self.decoder.per_frame_latents, _takes_5d_latents(self.decoder)
        if z.dim() != (5 if video else 4):
            layout = "video latents (B, C, T, h, w)" if video else "image latents (B, C, h, w)"
            raise ValueError(f"FastdecVAE with a {type(self.decoder).__name__} decodes {layout}, got {tuple(z.shape)}")
        if per_frame_video and num_frames is None:
            raise ValueError(
                f"{type(self.decoder).__name__} decodes clips of per-frame latents: pass num_frames (frames per clip), "
                "as StableVideoDiffusionPipeline does"
            )
        z = z.to(self.dtype)
        if self.input_scale is not None:  # device copies of the affine map, built once (no per-call copy)
            if getattr(self, "_input_map", None) is None or self._input_map[0].values != list(self.input_scale):
                self._input_map = (ChannelConstants(self.input_scale), ChannelConstants(self.input_offset))
            z = z * self._input_map[0].get(z.dtype, z.device, z.dim()) + self._input_map[1].get(z.dtype, z.device,
                                                                                                  z.dim())
        if video:  # the video contract: decode(diffusion latents) -> frames (B, T, 3, H, W) in [0, 1]
            return self.decoder.decode(z, check_finite=False).transpose(1, 2) * 2 - 1
        image = self.decoder.decode_frames(z, num_frames) if per_frame_video else self.decoder(z)
        return image * 2 - 1 if self.decoder.output_range == "0,1" else image

    def encode(self, *args, **kwargs):
        """The original VAE's encode, unchanged (same arguments, same output)."""
        return self.original.encode(*args, **kwargs)


def _takes_5d_latents(decoder: Decoder) -> bool:
    """A video decoder that the pipeline hands (B, C, T, h, w) latents (WanPipeline); per-frame video decoders
    (``per_frame_latents``: SVD, tae-temporal) get (B*T, C, h, w) from StableVideoDiffusionPipeline instead."""
    return decoder.latent_ndim == 5 and not decoder.per_frame_latents


def _input_map(config: dict, decoder: Decoder) -> tuple[list[float] | None, list[float] | None]:
    """Per-channel (scale, offset) taking the pipeline's z to the decoder's input, or (None, None) for identity.

    z -> diffusion latents x: x = (z - shift) * s, or x = (z - mean) * s / std with latents_mean/std; then the
    decoder's input is x * scale_d + offset_d (``decoder.latent_affine()``: 1 / s_d and t_d, or std_d / s_d and
    mean_d for a decoder with its own latents_mean/std). Computed in float64, cast once at decode time; a map within
    float64 rounding of the identity (the decoder of the pipeline's own VAE) is skipped. Video decoders of 5-D
    latents (_takes_5d_latents) are called through ``decode``, which takes x itself and applies their own
    convention: there the map ends at x.
    """
    channels = decoder.latent_channels
    scaling = config.get("scaling_factor") or 1.0
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is not None and std is not None:
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"latents_mean/latents_std of the VAE config need {channels} values each")
    else:
        mean, std = [config.get("shift_factor") or 0.0] * channels, [1.0] * channels
    decoder_scale, decoder_offset = decoder.latent_affine()
    if _takes_5d_latents(decoder):
        decoder_scale, decoder_offset = [1.0] * channels, [0.0] * channels
    scale = [scaling / s * a for s, a in zip(std, decoder_scale, strict=True)]
    offset = [b - m * a for m, a, b in zip(mean, scale, decoder_offset, strict=True)]
    identity = all(abs(a - 1.0) <= 1e-12 for a in scale) and all(
        abs(b) <= 1e-12 * (1 + abs(m)) for b, m in zip(offset, mean, strict=True)
    )
    if identity:
        return None, None
    return scale, offset


def swap_vae(pipe, decoder, force_upcast: bool | None = None) -> FastdecVAE:
    """Makes ``pipe`` decode with a fastdec decoder; returns the ``FastdecVAE`` now at ``pipe.vae``.

    ``decoder``: a fastdec Decoder, or anything ``fastdec.load`` takes (e.g. "taesdxl"), loaded on the VAE's
    device in its dtype, and put in eval mode. It must upsample by the pipeline's ``vae_scale_factor`` (checked
    with a 2x2 latent). ``force_upcast``: None takes the decoder's own need (see the module docstring).
    """
    original = pipe.vae.original if isinstance(pipe.vae, FastdecVAE) else pipe.vae
    if original is None:
        raise ValueError("the pipeline has no VAE to swap (pipe.vae is None)")
    if not isinstance(decoder, Decoder):
        decoder = load(decoder, device=original.device, dtype=original.dtype)
    wrapper = FastdecVAE(original, decoder, force_upcast)
    expected = (getattr(pipe, "vae_scale_factor", None) or getattr(pipe, "vae_scale_factor_spatial", None)  # video
                or 2 ** (len(original.config.block_out_channels) - 1))
    frames = (1,) if _takes_5d_latents(decoder) else ()
    probe = torch.zeros(1, decoder.latent_channels, *frames, 2, 2, device=wrapper.device, dtype=wrapper.dtype)
    with torch.no_grad():
        factor = wrapper(probe, num_frames=1).shape[-1] // 2
    if factor != expected:
        raise ValueError(
            f"{type(decoder).__name__} upsamples latents {factor}x but the pipeline expects its VAE to upsample "
            f"{expected}x (vae_scale_factor): use a decoder with the pipeline's upsampling"
        )
    pipe.vae = wrapper
    return wrapper
