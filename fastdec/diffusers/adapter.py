"""``FastdecVAE``: a diffusers VAE's ``decode``, computed by a fastdec decoder.

A pipeline hands ``vae.decode`` the latents in the VAE's own space, computed from the diffusion latents x with the
VAE's config: ``z = x / scaling_factor + shift_factor`` (SD, SDXL, SD3, FLUX.1, DiT, ...), or per channel
``z = x * latents_std / scaling_factor + latents_mean`` when the config has latents_mean/latents_std (SDXL's
pipeline). FLUX.2's VAE has no scaling_factor in its config and its pipeline passes the raw VAE latents, which is
the space the taef2 decoder reads. ``FastdecVAE`` maps z back to x and into the fastdec decoder's convention
(``decoder.latent_affine()``: ``x / scaling_factor + shift_factor``, or the decoder's own latents_mean/std; one
per-channel affine map, skipped when it is the identity) and returns what the VAE's decode returns: images in
[-1, 1] (``DecoderOutput`` or a 1-tuple), video as (B, 3, T, H, W).

It honours the VAE's own switches, which diffusers' ``enable_vae_slicing`` / ``enable_vae_tiling`` set:
``use_slicing`` decodes one sample at a time, ``use_tiling`` decodes in fastdec's exact slabs (``tile_size_for``:
a slab holds as many pixels as one of diffusers' tiles), which give the untiled pixels.

``swap_vae`` (fastdec.diffusers.swap) installs one as the decode of the pipeline's own VAE object; built directly,
``FastdecVAE(vae, decoder)`` is a module of its own that decodes like the swapped VAE (its ``config`` is the VAE's,
``force_upcast`` being the fastdec decoder's need unless given).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

try:
    from diffusers.configuration_utils import FrozenDict
    from diffusers.models.autoencoders.vae import DecoderOutput
except ImportError as error:
    raise ImportError("fastdec.diffusers needs diffusers: pip install 'fastdec[diffusers]'") from error

from fastdec import tiling
from fastdec.models.base import Decoder
from fastdec.models.layers import ChannelConstants


class FastdecVAE(nn.Module):
    """Decodes like ``original`` (a diffusers VAE) with a fastdec decoder; encodes with ``original``.

    ``config`` is the original VAE's config (``force_upcast``: the fastdec decoder's need, ``decoder.force_upcast``,
    unless given; a swapped pipeline reads its VAE's own config instead). ``weights`` is set by ``swap_vae``: the
    decoder tensors that are the VAE's own (shared, not copied) and what keeps them so across ``.to()`` and
    accelerate's offloading.
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
        self.weights = None  # swap_vae: a fastdec.diffusers.swap.SharedWeights
        self._upsampling: int | None = None

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

    @property
    def upsampling(self) -> int:
        """Pixels per latent row and column: the decoder run once on a 2x2 latent (then remembered)."""
        if self._upsampling is None:
            frames = (1,) if _takes_5d_latents(self.decoder) else ()
            probe = torch.zeros(1, self.decoder.latent_channels, *frames, 2, 2, device=self.device, dtype=self.dtype)
            with torch.no_grad():
                self._upsampling = self(probe, num_frames=1).shape[-1] // 2
        return self._upsampling

    def decode(self, z: Tensor, return_dict: bool = True, generator: torch.Generator | None = None,
               num_frames: int | None = None):
        """The VAE's decode: latents in the VAE's space -> images in [-1, 1] (``DecoderOutput`` or a 1-tuple).

        ``generator`` is accepted for the pipelines that pass it; decoding is deterministic. ``num_frames``: see
        ``forward``. The VAE's ``use_slicing`` and ``use_tiling`` are honoured (see the module docstring). The
        decoder's weights are made the VAE's current ones first (see ``weights``).
        """
        if self.weights is not None and self.weights.offloaded():
            image = self.weights.run_offloaded(lambda: self._sliced(z, num_frames))
        else:
            if self.weights is not None:
                self.weights.rebind()
            image = self._sliced(z, num_frames)
        return DecoderOutput(sample=image) if return_dict else (image,)

    def _sliced(self, z: Tensor, num_frames: int | None) -> Tensor:
        """``use_slicing``: one sample at a time, as diffusers' VAEs do (per-frame video latents are whole clips,
        never sliced: SVD's VAE has no slicing)."""
        if getattr(self.original, "use_slicing", False) and z.shape[0] > 1 and not self.decoder.per_frame_latents:
            return torch.cat([self._maybe_tiled(part, num_frames) for part in z.split(1)])
        return self._maybe_tiled(z, num_frames)

    def _maybe_tiled(self, z: Tensor, num_frames: int | None) -> Tensor:
        tile_size = self.tile_size_for(z)
        if tile_size is None:
            return self(z, num_frames)
        if torch.compiler.is_compiling():
            raise RuntimeError(
                "fastdec's exact tiling (the VAE's use_tiling, set by enable_vae_tiling) does not run inside "
                "torch.compile: call disable_vae_tiling() before compiling vae.decode, or decode uncompiled"
            )
        return tiling.tiled_decode(_VaeSpaceDecoder(self, num_frames, z.dim()), z, tile_size, check_finite=False)

    def tile_size_for(self, z: Tensor) -> int | None:
        """fastdec's slab height (pixel rows) for these latents when the VAE's ``use_tiling`` is set, else None.

        diffusers tiles in squares of ``tile_sample_min_size`` pixels (``tile_sample_min_height`` x
        ``tile_sample_min_width`` for DC-AE, Wan and Qwen-Image), blended where they overlap; fastdec decodes exact
        full-width slabs. A slab gets as many pixels as one such tile: ``tile_h * tile_w // W`` rows (W the image
        width), rounded down to whole latent rows (at least one). Latents that fit in one slab decode untiled;
        the overlap, stride and blend settings have nothing to set in an exact slab decode.
        """
        vae = self.original
        if not getattr(vae, "use_tiling", False):
            return None
        height, width = getattr(vae, "tile_sample_min_height", None), getattr(vae, "tile_sample_min_width", None)
        if height is None or width is None:
            size = getattr(vae, "tile_sample_min_size", None)
            if size is None:
                raise ValueError(
                    f"{type(vae).__name__}.use_tiling is set but it has no tile_sample_min_size (nor "
                    "tile_sample_min_height/width) to size fastdec's slabs: set vae.tile_sample_min_size (pixels)"
                )
            height, width = (size[0], size[-1]) if isinstance(size, (list, tuple)) else (size, size)
        factor = self.upsampling
        rows = max(1, int(height) * int(width) // (z.shape[-1] * factor) // factor)
        return None if rows >= z.shape[-2] else rows * factor

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
        if video:  # the video contract: diffusion latents -> frames (B, T, 3, H, W) in [0, 1] (decode_checked:
            # decode less the checks done here and its tiling, which this module runs; meta tensors pass)
            return self.decoder.decode_checked(z).transpose(1, 2) * 2 - 1
        image = self.decoder.decode_frames(z, num_frames) if per_frame_video else self.decoder(z)
        return image * 2 - 1 if self.decoder.output_range == "0,1" else image

    def encode(self, *args, **kwargs):
        """The original VAE's encode, unchanged (same arguments, same output)."""
        return self.original.encode(*args, **kwargs)

    def save_pretrained(self, *args, **kwargs):
        raise TypeError(
            "a FastdecVAE is not a diffusers model and cannot be saved: save the pipeline (swap_vae keeps pipe.vae "
            "the original diffusers VAE, which it saves), or the fastdec decoder with .decoder.save_pretrained(dir)"
        )


class _VaeSpaceDecoder(nn.Module):
    """A FastdecVAE's forward as a decoder that fastdec.tiling runs in slabs: ``decode(z)`` is the forward (latents in
    the VAE's space -> the VAE's output, unclamped like the untiled decode); its state is the fastdec decoder's, which
    the tiler probes on the meta device for the slab plan."""

    def __init__(self, adapter: FastdecVAE, num_frames: int | None, latent_ndim: int):
        super().__init__()
        self.decoder = adapter.decoder
        self.__dict__["adapter"] = adapter  # not a submodule: its state is the decoder's alone
        self.num_frames, self.latent_ndim = num_frames, latent_ndim
        self.latent_channels = adapter.decoder.latent_channels

    def forward(self, z: Tensor) -> Tensor:
        return self.adapter(z, self.num_frames)

    def decode(self, z: Tensor, check_finite: bool | None = None) -> Tensor:
        return self(z)


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
    return (None, None) if identity else (scale, offset)
