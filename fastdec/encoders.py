"""Images to latents: ``fastdec.encode`` and the frozen encoder that defines a student's latent space (``fastdec
train``, ``fastdec eval``): a TAESD-family encoder (.pth or diffusers AutoencoderTiny) or the encoder of a diffusers
AutoencoderKL (instance, folder or Hub id).

``encode`` maps RGB in [0, 1] to the *diffusion latents* (what a diffusion model produces and fastdec.decode takes):
TAESD encoders already write them; an AutoencoderKL's mean latent z becomes (z - shift_factor) * scaling_factor.
Students are trained on exactly these latents, through their own ``to_decoder_space`` as ``decode`` applies it:
scaling 1 and shift 0 for students built here, the teacher's map for one pruned from an AutoencoderKL teacher.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn


@dataclass
class FrozenEncoder:
    """``module`` maps RGB (B, 3, H, W) in [0, 1] to diffusion latents (B, C, H/downscale, W/downscale)."""

    module: nn.Module
    latent_channels: int
    downscale: int
    description: str  # recorded in the model card and in the latent cache key

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        return self.module(images)


class _TAESDEncode(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, images: Tensor) -> Tensor:
        return self.encoder.encode(images)


class _KLEncode(nn.Module):
    """diffusers AutoencoderKL: the posterior mean of images in [-1, 1], scaled to diffusion latents."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.scale = float(vae.config.scaling_factor or 1.0)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def forward(self, images: Tensor) -> Tensor:
        z = self.vae.encode(images * 2 - 1).latent_dist.mode()
        return (z - self.shift) * self.scale


def load_encoder(source, device: torch.device | str = "cpu") -> FrozenEncoder:
    """A TAESD encoder .pth, a diffusers AutoencoderKL / AutoencoderTiny (instance, folder, or Hub id), frozen,
    fp32, in eval mode."""
    from fastdec.models.taesd import DEFAULTS, TAESDEncoder, read_pth, variant_of_name

    if isinstance(source, nn.Module):
        return _from_diffusers_module(source, type(source).__name__, device)
    path = Path(str(source)).expanduser()
    if path.suffix in (".pth", ".pt"):
        if not path.is_file():
            raise FileNotFoundError(f"encoder weights {path} not found")
        state = read_pth(path, "encoder")
        if "0.weight" not in state:
            raise ValueError(f"{path} is not a TAESD encoder state dict (no '0.weight'); a decoder file?")
        last = max(int(k.partition(".")[0]) for k in state if k.partition(".")[0].isdigit())
        latent_channels = state[f"{last}.weight"].shape[0]
        # the variant the file name starts with (taef2_encoder.pth), else the one for its channel count
        variant = variant_of_name(path.stem) or DEFAULTS.get(latent_channels)
        if variant is None:
            raise ValueError(
                f"{path}: no TAESD variant has {latent_channels} latent channels; name the file <variant>_encoder.pth"
            )
        encoder = TAESDEncoder.from_pth(path, variant)
        description = f"TAESD encoder {variant} ({path.name})"
        return _frozen(_TAESDEncode(encoder), encoder.latent_channels, 8, description, device)
    try:
        import diffusers
    except ImportError as error:
        raise ValueError(
            f"encoder {source!r} is not a TAESD .pth file; diffusers VAEs (folders, Hub ids) need diffusers "
            "(pip install diffusers)"
        ) from error
    folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
    kwargs = {} if folder.exists() else {"subfolder": None}
    config_source = str(folder) if folder.exists() else str(source)
    try:
        config = diffusers.AutoencoderKL.load_config(config_source, **kwargs)
    except Exception:
        try:  # a pipeline repo on the Hub: its VAE is in vae/
            config = diffusers.AutoencoderKL.load_config(config_source, subfolder="vae")
            kwargs = {"subfolder": "vae"}
        except Exception as error:
            raise FileNotFoundError(
                f"encoder {source!r}: not a TAESD .pth file, a diffusers VAE folder or a reachable Hub id ({error})"
            ) from error
    kind = config.get("_class_name", "AutoencoderKL")
    if kind not in ("AutoencoderKL", "AutoencoderTiny"):
        raise ValueError(f"encoder {source!r} is a {kind}; supported: AutoencoderKL, AutoencoderTiny, TAESD .pth")
    vae = getattr(diffusers, kind).from_pretrained(config_source, **{k: v for k, v in kwargs.items() if v})
    return _from_diffusers_module(vae, f"{kind} {source}", device)


def _from_diffusers_module(vae: nn.Module, description: str, device) -> FrozenEncoder:
    from fastdec.models.taesd import TAESDEncoder, variant_for_channels

    names = [cls.__name__ for cls in type(vae).__mro__]
    if "AutoencoderKL" in names:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        return _frozen(_KLEncode(vae), vae.config.latent_channels, factor, description, device)
    if "AutoencoderTiny" in names:
        variant = variant_for_channels(vae.config.latent_channels, description)
        return _frozen(_TAESDEncode(TAESDEncoder.from_diffusers(vae, variant)), vae.config.latent_channels, 8,
                       description, device)
    raise TypeError(f"the encoder must be a diffusers AutoencoderKL or AutoencoderTiny, got {type(vae).__name__}")


def _frozen(module: nn.Module, channels: int, downscale: int, description: str, device) -> FrozenEncoder:
    module = module.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    return FrozenEncoder(module, channels, downscale, description)


_cached_encoder = functools.lru_cache(maxsize=4)(load_encoder)  # called with the source and device as strings


def encode(images, encoder: str | Path | nn.Module | FrozenEncoder, device: torch.device | str | None = None) -> Tensor:
    """Images -> diffusion latents (B, C, H/8, W/8), what ``fastdec.decode`` takes back.

    ``images``: a PIL image, a list of them (one size), or a float tensor (3, H, W) / (B, 3, H, W) in [0, 1], with H
    and W multiples of the encoder's downscale (8). ``encoder``: a TAESD-family encoder .pth (e.g. taef2_encoder.pth),
    a diffusers AutoencoderKL / AutoencoderTiny (instance, folder or Hub id), or a FrozenEncoder; paths and ids are
    loaded once and cached. ``device``: default the tensor's, else the CPU."""
    if not isinstance(images, Tensor):
        images = _pil_to_tensor(images)
    if not images.is_floating_point() or images.dim() not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"images must be a float tensor (3, H, W) or (B, 3, H, W) in [0, 1] or PIL images, got a "
                         f"{images.dtype} tensor of shape {tuple(images.shape)}")
    batch = images.unsqueeze(0) if images.dim() == 3 else images
    device = torch.device(device) if device is not None else batch.device
    if isinstance(encoder, FrozenEncoder):
        frozen = encoder
    elif isinstance(encoder, nn.Module):
        frozen = load_encoder(encoder, device)
    else:
        frozen = _cached_encoder(str(encoder), str(device))
    height, width = batch.shape[-2:]
    if height % frozen.downscale or width % frozen.downscale:
        raise ValueError(
            f"images of {height}x{width} pixels: this encoder needs sides that are multiples of {frozen.downscale}; "
            f"crop them, e.g. image.crop((0, 0, {width // frozen.downscale * frozen.downscale}, "
            f"{height // frozen.downscale * frozen.downscale})) for a PIL image"
        )
    return frozen.encode(batch.to(device=device, dtype=torch.float32))


def _pil_to_tensor(images) -> Tensor:
    import numpy as np
    from PIL import Image

    items = [images] if isinstance(images, Image.Image) else list(images)
    if not items or not all(isinstance(item, Image.Image) for item in items):
        raise TypeError("images must be a PIL image, a list of PIL images or a float tensor in [0, 1]")
    sizes = {item.size for item in items}
    if len(sizes) > 1:
        raise ValueError(f"the images have different sizes {sorted(sizes)}: encode them one at a time or crop them")
    arrays = [np.asarray(item.convert("RGB"), dtype=np.float32) / 255 for item in items]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
