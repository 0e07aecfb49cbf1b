"""FLUX.2: the decoder of diffusers' ``AutoencoderKLFlux2`` and FLUX.2's packed latents.

``AutoencoderKLFlux2`` decodes exactly like ``AutoencoderKL`` at 32 latent channels (post_quant_conv, the same
``vae.Decoder``), so ``Flux2VAEDecoder`` is ``AutoencoderKLDecoder`` plus the one thing FLUX.2 adds: a BatchNorm
(``bn``, affine-free, over the 2x2-patchified 128 channels) whose running statistics normalise the latents the
transformer sees. FLUX.2 pipelines hand latents over in three forms, told apart without guessing:

* raw VAE latents (B, 32, H, W): what ``vae.decode`` takes (scale 1, shift 0), taef2's input too;
* packed latents (B, 128, h, w), h = H/2: patchified 2x2 and BatchNorm-normalised, the transformer's space. A
  decoder recognises them by their channel count, 4x its own (``packed_latent_channels``); no FLUX.2 decoder reads
  128-channel raw latents, so 32 vs 128 is unambiguous;
* the token sequence (B, h*w, 128) that ``Flux2Pipeline(output_type="latent")`` returns: rows of the packed grid
  in row-major order (the pipeline's ``_prepare_latent_ids``). Its grid size is not in the tensor (h*w tokens fit
  several grids), so ``tokens_to_grid`` needs the image size: ``decode(tokens, image_size=(H, W))``, the decoders'
  option (``fastdec.decode`` passes it on).

Unpacking is the pipeline's own arithmetic: ``packed * sqrt(running_var + eps) + running_mean`` in the latents'
dtype, then ``_unpatchify_latents``, which is exactly a pixel shuffle by 2. The tiny taef2 decoder has no latent
statistics of its own; ``PackedLatentsDecoder(taef2, stats)`` gives it the FLUX.2 VAE's.
"""

from __future__ import annotations

from torch import Tensor, nn

from fastdec import ops
from fastdec.models.autoencoder_kl import AutoencoderKLDecoder
from fastdec.models.base import Decoder
from fastdec.models.registry import Family, Weights, register
from fastdec.validate import check_latents

PATCH = 2  # FLUX.2 patchifies the VAE latents 2x2 (its pipelines hard-code it)
TOKEN_PIXELS = 16  # one token of the packed grid covers 16x16 pixels: the VAE's 8x times the 2x2 patch
# AutoencoderKLFlux2's defaults (FLUX.2-dev's VAE), for configs written without them.
DIFFUSERS_DEFAULTS = dict(
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=32, norm_num_groups=32,
    use_post_quant_conv=True, mid_block_add_attention=True, batch_norm_eps=1e-4, patch_size=[2, 2],
)

PRESETS: dict[str, dict] = {"flux2": dict(latent_channels=32, use_post_quant_conv=True, batch_norm_eps=1e-4)}


def tokens_to_grid(tokens: Tensor, height: int, width: int) -> Tensor:
    """``Flux2Pipeline(output_type="latent")``'s tokens (B, h*w, C) -> the packed grid (B, C, h, w), for an image of
    ``height`` x ``width`` pixels (h = height // 16, w = width // 16, as the pipeline computes them)."""
    grid_h, grid_w = int(height) // TOKEN_PIXELS, int(width) // TOKEN_PIXELS
    if tokens.dim() != 3 or tokens.shape[1] != grid_h * grid_w or grid_h * grid_w == 0:
        raise ValueError(
            f"a {height}x{width} FLUX.2 image has {grid_h}x{grid_w} = {grid_h * grid_w} latent tokens, expected "
            f"tokens shaped (B, {grid_h * grid_w}, C), got {tuple(tokens.shape)}: pass the image_size the pipeline "
            "generated (height, width)"
        )
    return tokens.transpose(1, 2).unflatten(2, (grid_h, grid_w))


def unpack_latents(packed: Tensor, bn: nn.BatchNorm2d) -> Tensor:
    """Packed latents (B, 4C, h, w) -> raw VAE latents (B, C, 2h, 2w), exactly as Flux2Pipeline does before
    ``vae.decode``: undo the BatchNorm with its running statistics, then unpatchify 2x2."""
    mean = bn.running_mean.view(1, -1, 1, 1).to(packed.device, packed.dtype)
    std = (bn.running_var.view(1, -1, 1, 1) + bn.eps).sqrt().to(packed.device, packed.dtype)
    return ops.pixel_shuffle(packed * std + mean, PATCH)


def latent_batch_norm(latent_channels: int, eps: float) -> nn.BatchNorm2d:
    """AutoencoderKLFlux2's ``bn``: statistics only (keys running_mean, running_var, num_batches_tracked)."""
    return nn.BatchNorm2d(PATCH * PATCH * latent_channels, eps=eps, affine=False).eval()


class PackedLatents:
    """What both FLUX.2 decoders add to a Decoder: ``bn`` (the latent statistics), ``packed_latent_channels``, and
    a ``prepare`` that takes the three forms (the option ``image_size`` for tokens) and gives raw latents, which is
    what tiling sees."""

    bn: nn.BatchNorm2d
    packed_latent_channels: int
    input_options = ("image_size",)

    def prepare(self, latents: Tensor, check_finite: bool | None = None,
                image_size: tuple[int, int] | None = None) -> Tensor:
        """Raw, packed or (with ``image_size``) token FLUX.2 latents (see the module docstring) -> raw latents,
        checked."""
        if image_size is not None:
            latents = tokens_to_grid(latents, *image_size)
        check_latents(latents, self, check_finite)
        return unpack_latents(latents, self.bn) if latents.shape[1] == self.packed_latent_channels else latents


class Flux2VAEDecoder(PackedLatents, AutoencoderKLDecoder):
    """AutoencoderKLFlux2's decoder (same keys: ``post_quant_conv.*``, ``decoder.*``, ``bn.*``).

    ``decode`` takes raw (B, 32, H, W) or packed (B, 128, H/2, W/2) latents; ``forward`` raw ones.
    """

    def __init__(self, latent_channels: int = 32, batch_norm_eps: float = 1e-4, **autoencoder_kl):
        super().__init__(latent_channels=latent_channels, **{"scaling_factor": 1.0, **autoencoder_kl})
        if self.scaling_factor != 1.0 or self.shift_factor != 0.0 or self.latents_mean is not None:
            raise ValueError("FLUX.2 latents are normalised by the VAE's BatchNorm, not by scaling/shift or mean/std")
        self.config.update(batch_norm_eps=batch_norm_eps)
        self.packed_latent_channels = PATCH * PATCH * latent_channels
        self.bn = latent_batch_norm(latent_channels, batch_norm_eps)

    @classmethod
    def from_preset(cls, name: str = "flux2", **overrides) -> Flux2VAEDecoder:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    diffusers_class = "AutoencoderKLFlux2"  # from_diffusers: AutoencoderKLDecoder's, keeping the bn statistics

    @classmethod
    def kwargs_from_diffusers(cls, config: dict, source: str) -> dict:
        """AutoencoderKLFlux2 config -> Flux2VAEDecoder kwargs, through AutoencoderKL's checks."""
        config = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
        if list(config["patch_size"]) != [PATCH, PATCH]:
            raise ValueError(f"{source}: patch_size={config['patch_size']}; FLUX.2 pipelines unpack 2x2 patches only")
        as_kl = {
            **config, "scaling_factor": 1.0, "shift_factor": 0.0, "force_upcast": False,
            "block_out_channels": config.get("decoder_block_out_channels") or config["block_out_channels"],
        }
        return {**AutoencoderKLDecoder.kwargs_from_diffusers(as_kl, source), "batch_norm_eps": config["batch_norm_eps"]}


class PackedLatentsDecoder(PackedLatents, Decoder):
    """Any 32-channel FLUX.2-space decoder (e.g. taef2) with the FLUX.2 VAE's latent statistics, so that it decodes
    packed latents too. ``stats``: an ``AutoencoderKLFlux2``, a ``Flux2VAEDecoder``, a swapped ``FastdecVAE``
    (anything with a ``bn``), or the BatchNorm itself. Built at run time: save the inner decoder, not this."""

    def __init__(self, decoder: Decoder, stats):
        super().__init__()
        bn = stats if isinstance(stats, nn.BatchNorm2d) else getattr(stats, "bn", None)
        if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None:
            raise ValueError(
                f"stats must carry FLUX.2's latent BatchNorm statistics (an AutoencoderKLFlux2, a Flux2VAEDecoder or "
                f"its .bn), got a {type(stats).__name__}"
            )
        if bn.num_features != PATCH * PATCH * decoder.latent_channels:
            raise ValueError(
                f"the statistics cover {bn.num_features} channels but {type(decoder).__name__} decodes "
                f"{decoder.latent_channels}: packed latents have {PATCH * PATCH}x the decoder's channels"
            )
        self.decoder = decoder
        self.bn = latent_batch_norm(decoder.latent_channels, bn.eps).to(bn.running_mean.device)
        self.bn.load_state_dict(bn.state_dict())
        self.latent_channels = decoder.latent_channels
        self.packed_latent_channels = bn.num_features
        self.scaling_factor, self.shift_factor = decoder.scaling_factor, decoder.shift_factor
        self.output_range = decoder.output_range
        self.config = {"decoder": type(decoder).__name__, **decoder.config}

    def forward(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def to_decoder_space(self, latents: Tensor) -> Tensor:
        return self.decoder.to_decoder_space(latents)

    def latent_affine(self) -> tuple[list[float], list[float]]:
        return self.decoder.latent_affine()

    def save_pretrained(self, directory) -> None:
        raise TypeError(
            "a PackedLatentsDecoder is assembled at run time: save its .decoder, and rebuild it with "
            "PackedLatentsDecoder(loaded_decoder, flux2_vae)"
        )


register(Family(
    name="flux2", order=10, classes=(Flux2VAEDecoder,),
    names={"flux2": Weights(hub=("black-forest-labs/FLUX.2-dev", "vae"))},
    diffusers={"AutoencoderKLFlux2": lambda vae_or_folder, name: Flux2VAEDecoder.from_diffusers(vae_or_folder)},
))
