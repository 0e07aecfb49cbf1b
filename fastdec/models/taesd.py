"""TAESD family: madebyollin's tiny conv autoencoders for SD, SDXL, SD3, FLUX.1 and FLUX.2 latents.

Layer for layer the design of madebyollin/taesd's taesd.py, with two exact rewrites:

* every "nearest x2 upsample + 3x3 conv" runs as one folded 2x2 conv + ``ops.pixel_shuffle`` (layers.UpsampleConv);
* TAEF2's GroupNorm(4) + ReLU branch runs as one ``ops.group_norm_act``.

Encoder and decoder are nn.Sequential with madebyollin's indices (an nn.Identity keeps the index of each op that a
fused layer absorbs), so his .pth files load key for key; diffusers' AutoencoderTiny keys map by an index shift.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from fastdec.models.base import Decoder, Device, DType, load_weights, read_diffusers_vae, read_state_dict
from fastdec.models.layers import UpsampleConv, norm_act
from fastdec.models.registry import Family, Weights, register


@dataclass(frozen=True)
class TAESDVariant:
    latent_channels: int | None  # None: an architecture, not tied to one latent space (pass latent_channels)
    decoder_width: int = 64
    midblock_gn: bool = False  # TAEF2's GroupNorm branch in the low-resolution blocks
    scaling_factor: float = 1.0
    shift_factor: float = 0.0


# Every TAESD decoder consumes the latents the diffusion model produces, as they are: diffusers' AutoencoderTiny
# uses scaling_factor 1.0 ("no such scaling factor was used") and ComfyUI's loader maps raw VAE latents z to the
# TAESD input by (z - shift) * scale with the SD/SDXL/SD3/FLUX.1 VAE's own factors, i.e. to the diffusion latents.
# taef2 decodes what the TAEF2 encoder writes, scale 1, shift 0 (shared/README.md): FLUX.2's 32-channel latents
# before a pipeline packs them 2x2 into 128 channels.
VARIANTS: dict[str, TAESDVariant] = {
    "taesd": TAESDVariant(4),
    "taesdxl": TAESDVariant(4),
    "taesd3": TAESDVariant(16),
    "taef1": TAESDVariant(16),
    "taef2": TAESDVariant(32, midblock_gn=True),
    "tae-192": TAESDVariant(None, decoder_width=192),  # the paper's TAE-192: the TAESD decoder at width 192
}
# The trained variants: madebyollin/<name> on the Hub (diffusers AutoencoderTiny format) and <name>_decoder.pth on
# GitHub; taef2 exists only as the .pth. DEFAULTS: the variant of each latent space (fastdec.decode's default).
GITHUB = "https://github.com/madebyollin/taesd"
TRAINED = ("taesd", "taesdxl", "taesd3", "taef1", "taef2")
PTH_ONLY = ("taef2",)
DEFAULTS = {4: "taesd", 16: "taef1", 32: "taef2"}  # 16 channels are FLUX.1's; SD3 latents too: pass taesd3 for them
DECODER_BLOCKS = (3, 3, 3, 1)  # Blocks per resolution, low to high; an upsample between stages
ENCODER_BLOCKS = (1, 3, 3, 3)  # Blocks per resolution, high to low; a stride-2 conv between stages
ENCODER_WIDTH = 64


def conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """Soft clamp of the latents to (-3, 3)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / 3) * 3


class GroupNormReLU(nn.GroupNorm):
    """nn.GroupNorm followed by ReLU, in one fused op (same parameters and state-dict keys as nn.GroupNorm)."""

    def forward(self, x: Tensor) -> Tensor:
        return norm_act(self, x, "relu")


class Block(nn.Module):
    """relu(conv3(relu(conv2(relu(conv1(x))))) + skip(x)); TAEF2 first adds a 1x1 -> GroupNorm -> 1x1 branch to x."""

    def __init__(self, n_in: int, n_out: int, midblock_gn: bool = False):
        super().__init__()
        self.conv = nn.Sequential(
            conv(n_in, n_out), nn.ReLU(inplace=True), conv(n_out, n_out), nn.ReLU(inplace=True), conv(n_out, n_out)
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU(inplace=True)
        self.pool = None
        if midblock_gn:
            hidden = n_in * 4
            # nn.Identity at index 2: madebyollin's ReLU there is fused into GroupNormReLU.
            self.pool = nn.Sequential(
                nn.Conv2d(n_in, hidden, 1, bias=False), GroupNormReLU(4, hidden), nn.Identity(),
                nn.Conv2d(hidden, n_in, 1, bias=False),
            )

    def forward(self, x: Tensor) -> Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


def preset_of(name: str, variants: Mapping = VARIANTS, family: str = "TAESD"):
    """``variants[name]`` (a TAESD variant, or another tiny family's: models.taehv), or a ValueError naming them."""
    if name not in variants:
        raise ValueError(f"unknown {family} variant {name!r}: choose one of {sorted(variants)}")
    return variants[name]


def _latent_channels(variant: str, latent_channels: int | None, source: str | None = None) -> int:
    """The variant's latent channel count, checked against one given explicitly or found in weights (source)."""
    expected = preset_of(variant).latent_channels
    if latent_channels is None:
        if expected is None:
            raise ValueError(f"variant {variant!r} fits any latent space: pass latent_channels")
        return expected
    if expected is not None and latent_channels != expected:
        fits = [name for name, v in VARIANTS.items() if v.latent_channels in (latent_channels, None)]
        found = f"{source} holds weights for" if source else "asked for"
        raise ValueError(
            f"variant {variant!r} has {expected} latent channels but {found} {latent_channels}: "
            f"pass one of the variants for {latent_channels} channels, {fits}"
        )
    return latent_channels


def block_counts(blocks: Sequence[int] | None, default: tuple[int, ...]) -> tuple[int, ...]:
    blocks = tuple(default if blocks is None else blocks)
    if not blocks or any(not isinstance(n, int) or n < 0 for n in blocks):
        raise ValueError(f"blocks must be a non-empty sequence of block counts >= 0 per stage, got {blocks}")
    return blocks


def stage_widths(width: int | Sequence[int], stages: int) -> tuple[int, ...]:
    """One width for every stage, or one per stage (low resolution to high): a slimmed decoder keeps its
    low-resolution stages wide, where they cost little, and thins the high-resolution ones, where the time goes."""
    widths = (width,) * stages if isinstance(width, int) else tuple(width)
    if len(widths) != stages or any(not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"width must be a positive int or one per stage ({stages} stages), got {width!r}")
    return widths


class TAESDDecoder(Decoder, nn.Sequential):
    """Latents (B, C, h, w) -> RGB (B, 3, h * 2**(stages-1), ...) in about [0, 1] (madebyollin's Decoder)."""

    channels_last_on_cuda = True

    output_range = "0,1"

    def __init__(
        self,
        variant: str = "taesd",
        latent_channels: int | None = None,
        width: int | Sequence[int] | None = None,
        blocks: Sequence[int] | None = None,
        midblock_gn: bool | None = None,
    ):
        preset = preset_of(variant)
        latent_channels = _latent_channels(variant, latent_channels)
        blocks = block_counts(blocks, DECODER_BLOCKS)
        widths = stage_widths(preset.decoder_width if width is None else width, len(blocks))
        midblock_gn = preset.midblock_gn if midblock_gn is None else midblock_gn
        layers = [Clamp(), conv(latent_channels, widths[0]), nn.ReLU(inplace=True)]
        for stage, count in enumerate(blocks):
            layers += [Block(widths[stage], widths[stage], midblock_gn and stage == 0) for _ in range(count)]
            if stage < len(blocks) - 1:
                # nn.Identity at madebyollin's nn.Upsample index: UpsampleConv folds the upsample into its conv,
                # which also moves the stream from this stage's width to the next one's.
                layers += [nn.Identity(), UpsampleConv(widths[stage], widths[stage + 1], bias=False)]
        layers.append(conv(widths[-1], 3))
        super().__init__(*layers)
        self.latent_channels = latent_channels
        self.scaling_factor, self.shift_factor = preset.scaling_factor, preset.shift_factor
        self.config = {
            "variant": variant, "latent_channels": latent_channels,
            "width": widths[0] if len(set(widths)) == 1 else list(widths), "blocks": list(blocks),
            "midblock_gn": midblock_gn,
        }

    @property
    def widths(self) -> tuple[int, ...]:
        """The stream's channels in each stage, low resolution to high."""
        return stage_widths(self.config["width"], len(self.config["blocks"]))

    @classmethod
    def from_pth(cls, path: str | Path, variant: str, device: Device = None, dtype: DType = None) -> TAESDDecoder:
        """madebyollin's <name>_decoder.pth (keys like ``1.weight``, ``3.conv.0.weight``); dtype None: float32."""
        state = read_pth(path, "decoder")
        if "1.weight" not in state or "0.weight" in state:
            raise ValueError(
                f"{path} is not a TAESD decoder state dict (a decoder has '1.weight', its first conv, and no "
                "'0.weight'): for an encoder file use TAESDEncoder.from_pth"
            )
        latent_channels = _latent_channels(variant, state["1.weight"].shape[1], str(path))
        return load_weights(cls(variant, latent_channels), state, str(path), device, dtype)

    @classmethod
    def from_diffusers(
        cls, vae_or_folder: nn.Module | str | Path, variant: str, device: Device = None, dtype: DType = None
    ) -> TAESDDecoder:
        """A diffusers AutoencoderTiny (instance, or a folder saved by save_pretrained): its ``decoder.*`` weights."""
        expected = {"act_fn": "relu", "upsample_fn": "nearest", "upsampling_scaling_factor": 2, "out_channels": 3}
        return _from_diffusers(cls, vae_or_folder, variant, "decoder", expected, DECODER_BLOCKS, device, dtype)


class TAESDEncoder(nn.Sequential):
    """RGB (B, 3, H, W) in [0, 1] -> latents (madebyollin's Encoder); ``encode`` applies the decoder's convention."""

    def __init__(
        self,
        variant: str = "taesd",
        latent_channels: int | None = None,
        width: int = ENCODER_WIDTH,
        blocks: Sequence[int] | None = None,
        midblock_gn: bool | None = None,
    ):
        preset = preset_of(variant)
        latent_channels = _latent_channels(variant, latent_channels)
        blocks = block_counts(blocks, ENCODER_BLOCKS)
        midblock_gn = preset.midblock_gn if midblock_gn is None else midblock_gn
        layers = [conv(3, width)]
        for stage, count in enumerate(blocks):
            if stage > 0:
                layers.append(conv(width, width, stride=2, bias=False))
            layers += [Block(width, width, midblock_gn and stage == len(blocks) - 1) for _ in range(count)]
        layers.append(conv(width, latent_channels))
        super().__init__(*layers)
        self.latent_channels = latent_channels
        self.scaling_factor, self.shift_factor = preset.scaling_factor, preset.shift_factor

    def encode(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] -> diffusion latents, which TAESDDecoder.decode maps back to images."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"encode expects RGB images (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        return (self(images) - self.shift_factor) * self.scaling_factor

    @classmethod
    def from_pth(cls, path: str | Path, variant: str, device: Device = None, dtype: DType = None) -> TAESDEncoder:
        """madebyollin's <name>_encoder.pth (keys like ``0.weight``, ``1.conv.0.weight``); dtype None: float32."""
        state = read_pth(path, "encoder")
        if "0.weight" not in state or state["0.weight"].shape[1] != 3:
            raise ValueError(
                f"{path} is not a TAESD encoder state dict (an encoder starts with '0.weight', a conv from 3 "
                "channels): for a decoder file use TAESDDecoder.from_pth"
            )
        last = max(int(index) for index, _, _ in (key.partition(".") for key in state) if index.isdigit())
        latent_channels = _latent_channels(variant, state[f"{last}.weight"].shape[0], str(path))  # conv to latents
        return load_weights(cls(variant, latent_channels), state, str(path), device, dtype)

    @classmethod
    def from_diffusers(
        cls, vae_or_folder: nn.Module | str | Path, variant: str, device: Device = None, dtype: DType = None
    ) -> TAESDEncoder:
        """A diffusers AutoencoderTiny (instance, or a folder saved by save_pretrained): its ``encoder.*`` weights."""
        expected = {"act_fn": "relu", "in_channels": 3}
        return _from_diffusers(cls, vae_or_folder, variant, "encoder", expected, ENCODER_BLOCKS, device, dtype)


# --- loading -----------------------------------------------------------------------------------------------------

# diffusers' DecoderTiny has no Clamp module (it clamps in forward), so its layers.N is madebyollin's N + 1.
_DIFFUSERS_INDEX_SHIFT = {"decoder": 1, "encoder": 0}


def read_pth(path: str | Path, part: str) -> dict[str, Tensor]:
    """The tensors of madebyollin's <variant>_<part>.pth (``part``: decoder or encoder, for the messages)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"TAESD {part} weights {path} not found: download <variant>_{part}.pth from "
            "https://github.com/madebyollin/taesd and pass its path"
        )
    return read_state_dict(path, f"the file is truncated or not a TAESD {part} checkpoint; download it again")


def _diffusers_decoder_key(name: str) -> str:
    """A TAESDDecoder tensor name (madebyollin's ``N.rest``) -> its AutoencoderTiny name ``decoder.layers.{N-1}.rest``
    (DecoderTiny has no Clamp module, hence the shift)."""
    index, _, rest = name.partition(".")
    if not index.isdigit() or int(index) < _DIFFUSERS_INDEX_SHIFT["decoder"]:
        return name
    return f"decoder.layers.{int(index) - _DIFFUSERS_INDEX_SHIFT['decoder']}.{rest}"


def _from_diffusers(cls, vae_or_folder, variant: str, part: str, expected: dict, blocks: tuple[int, ...], device,
                    dtype):
    """``cls.from_diffusers`` for the AutoencoderTiny's ``part``, its keys mapped to madebyollin's indices: every
    ``<part>.*`` key must be a ``<part>.layers.N.*`` key (the strict load then checks none is missing). Options
    outside the TAESD design (``expected``, per-stage widths) raise, and so does a decoder's latent scaling other than
    the variant's."""
    config, state, source = read_diffusers_vae(vae_or_folder, "AutoencoderTiny")
    prefix, shift, mapped = f"{part}.layers.", _DIFFUSERS_INDEX_SHIFT[part], {}
    for key, value in state.items():
        if not key.startswith(f"{part}."):
            continue
        index, dot, rest = key.removeprefix(prefix).partition(".")
        if not key.startswith(prefix) or not index.isdigit() or not dot:
            raise ValueError(f"{source}: key {key!r} is not an AutoencoderTiny {part} key ({prefix}N.<param>)")
        mapped[f"{int(index) + shift}.{rest}"] = value
    preset = preset_of(variant)
    widths = config.get(f"{part}_block_out_channels", (64,) * 4)  # AutoencoderTiny's default for either part
    differs = {key: config[key] for key, value in expected.items() if config.get(key, value) != value}
    if differs or len(set(widths)) != 1:
        raise ValueError(
            f"{source}: TAESD layers need {expected} and one block width for all stages; this AutoencoderTiny has "
            f"{differs or 'those'}, widths {list(widths)}"
        )
    factors = (config.get("scaling_factor", 1.0), config.get("shift_factor", 0.0) or 0.0)
    if part == "decoder" and factors != (preset.scaling_factor, preset.shift_factor):
        raise ValueError(
            f"{source} scales latents by (scaling_factor, shift_factor) = {factors}, variant {variant!r} by "
            f"{(preset.scaling_factor, preset.shift_factor)}: pick the variant of this latent space"
        )
    latent_channels = _latent_channels(variant, config.get("latent_channels", 4), source)
    model = cls(variant, latent_channels, widths[0], config.get(f"num_{part}_blocks", blocks))
    return load_weights(model, mapped, source, device, dtype)


# --- which variant a file or folder holds --------------------------------------------------------------------------


def variant_for_channels(latent_channels: int, source: str) -> str:
    """The variant fastdec.decode picks for this many latent channels (DEFAULTS); ``source`` words the error."""
    if latent_channels not in DEFAULTS:
        raise ValueError(
            f"{source}: no TAESD variant has {latent_channels} latent channels (taesd/taesdxl 4, taesd3/taef1 16, "
            "taef2 32)"
        )
    return DEFAULTS[latent_channels]


def variant_of_name(stem: str, variants: Iterable[str] = VARIANTS) -> str | None:
    """madebyollin's file names start with the variant (taesdxl_decoder.pth), the longest that fits."""
    stem = stem.lower()
    for variant in sorted(variants, key=len, reverse=True):
        if stem == variant or stem.startswith((f"{variant}_", f"{variant}-", f"{variant}.")):
            return variant
    return None


def variant_of_file(path: Path) -> str:
    """The variant a decoder .pth starts its name with, otherwise the one its weights fit."""
    named = variant_of_name(path.stem)
    if named is not None:
        return named
    state = read_pth(path, "decoder")
    if "1.weight" not in state:
        raise ValueError(f"{path} is not a TAESD decoder state dict (no '1.weight', the decoder's first conv)")
    width, latent_channels = state["1.weight"].shape[:2]
    if any(".pool." in key for key in state):
        return "taef2"
    if width == VARIANTS["tae-192"].decoder_width:
        return "tae-192"
    return variant_for_channels(latent_channels, str(path))


def variant_of_folder(folder: Path) -> str:
    """A variant named in the folder's path (a Hub cache folder models--madebyollin--taesdxl), else by channels."""
    parts = [part.lower() for part in folder.resolve().parts]
    for variant in sorted(VARIANTS, key=len, reverse=True):
        if any(part == variant or part.endswith(f"--{variant}") for part in parts):
            return variant
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    return variant_for_channels(config.get("latent_channels", 4), str(folder))


def _read_diffusers(vae_or_folder, name: str | None) -> TAESDDecoder:
    """An AutoencoderTiny, as the variant ``name`` when loaded by name, else the one its folder or channels say."""
    if name in TRAINED:
        variant = name
    elif isinstance(vae_or_folder, (str, Path)):
        variant = variant_of_folder(Path(vae_or_folder))
    else:
        variant = variant_for_channels(vae_or_folder.config.latent_channels, "the given AutoencoderTiny")
    return TAESDDecoder.from_diffusers(vae_or_folder, variant)


register(Family(
    name="taesd", order=60, classes=(TAESDDecoder,),
    names={name: Weights(hub=None if name in PTH_ONLY else (f"madebyollin/{name}", None),
                         files=(f"{name}_decoder.pth",), github=GITHUB) for name in TRAINED},
    diffusers={"AutoencoderTiny": _read_diffusers},
    weights_file=lambda path: path.suffix in (".pth", ".pt"),
    read_file=lambda path, name: TAESDDecoder.from_pth(path, name if name in TRAINED else variant_of_file(path)),
    presets={"tae-192": (TAESDDecoder, dict(variant="tae-192"))},  # the paper's TAE-192, random weights
    vae_keys={"AutoencoderTiny": _diffusers_decoder_key},
    image_defaults=DEFAULTS,
))
