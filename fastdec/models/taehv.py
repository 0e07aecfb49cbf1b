"""TAEHV family: madebyollin's tiny video autoencoders for HunyuanVideo, Wan 2.1/2.2, CogVideoX and LTX-2 latents.

The design of madebyollin/taehv's taehv.py: a TAESD-like stack of conv blocks in which every block is a ``MemBlock``
that also sees its input one frame earlier (zeros before the first frame), ``TGrow`` (decoder) and ``TPool``
(encoder) that change the frame rate, and a pixel (un)shuffle patch at the image end for some latent spaces. The
first ``t_upscale - 1`` decoded frames are dropped, so T latent frames give ``t_upscale * (T - 1) + 1`` frames.

Exact rewrites, for speed:

* A MemBlock's first conv runs over ``cat(x, past)``; it is computed as ``conv_a(x) + conv_b(past)`` (the two halves
  of its weight), so the concatenation is never built. Over a run of frames ``past`` is ``x`` shifted by one frame:
  ``conv_b`` runs once over the run and its output is added one frame later; only the run's first frame takes
  ``conv_b`` of the carried frame (nothing at the start of a clip: the zeros contribute nothing).
* madebyollin's "nearest x2 upsample, TGrow (a 1x1 conv), 3x3 conv" runs as TGrow at low resolution (a 1x1 conv
  commutes with nearest upsampling) followed by layers.UpsampleConv (the 2x2 fold + ``ops.pixel_shuffle``).

Frames run in the layout (B, T, C, H, W) inside the model (madebyollin's N T C H W); ``TAEHVDecoder.decode`` takes
diffusers' video latents (B, C, T, h, w) and returns frames (B, T_out, 3, H, W) in [0, 1].

Decoding modes: the whole clip at once (fastest, memory grows with T) or chunks of latent frames with the MemBlock
state carried between them (``TAEHVStream``), as ``TAEHVDecoder.decode_checked`` describes.

The ``_super`` decoders (7x7 depthwise + inverted-bottleneck MemBlocks, pixel-shuffle upsampling) are not built
here: their reference code, and so their state-dict layout, was not available to check a key-for-key load against.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdec import ops
from fastdec.models.base import Decoder, Device, DType, Progress, checked_chunk, load_weights, read_state_dict
from fastdec.models.layers import UpsampleConv
from fastdec.models.registry import Family, Weights, register
from fastdec.models.taesd import Clamp, conv, preset_of, variant_of_name
from fastdec.validate import check_latents

DECODER_WIDTHS = (256, 128, 64, 64)  # per decoder stage, low to high resolution; the last is the output conv's input
ENCODER_WIDTH = 64
BLOCKS_PER_STAGE = 3
# decode()'s limit on the clip's largest activation (the full-resolution 64-channel frames) for a whole-clip decode
WHOLE_CLIP_BUDGET_BYTES = 1 << 30
GITHUB = "https://github.com/madebyollin/taehv"


@dataclass(frozen=True)
class TAEHVVariant:
    latent_channels: int
    patch_size: int = 1
    decoder_time_upscale: tuple[bool, bool, bool] = (False, True, True)
    encoder_time_downscale: tuple[bool, bool, bool] = (True, True, False)
    keep_all_frames_for_even_t: bool = False  # taecvx: CogVideoX clips of an even latent length keep every frame
    latents_of: str = ""


VARIANTS: dict[str, TAEHVVariant] = {
    "taehv": TAEHVVariant(16, latents_of="HunyuanVideo"),
    "taew2_1": TAEHVVariant(16, latents_of="Wan 2.1 and Qwen-Image"),
    "taew2_2": TAEHVVariant(48, patch_size=2, latents_of="Wan 2.2 5B"),
    "taehv1_5": TAEHVVariant(32, patch_size=2, latents_of="HunyuanVideo 1.5"),
    "taecvx": TAEHVVariant(16, keep_all_frames_for_even_t=True, latents_of="CogVideoX"),
    "taeltx_2": TAEHVVariant(
        128, patch_size=4, decoder_time_upscale=(True, True, True), encoder_time_downscale=(True, True, True),
        latents_of="LTX-2",
    ),
}


# --- pieces --------------------------------------------------------------------------------------------------------


def _apply_2d(layer: nn.Module, x: Tensor) -> Tensor:
    """A per-frame layer on (B, T, C, H, W) frames."""
    return layer(x.flatten(0, 1)).unflatten(0, x.shape[:2])


class MemBlock(nn.Module):
    """relu(conv(cat(x, past)) + skip(x)), conv = 3x3 -> ReLU -> 3x3 -> ReLU -> 3x3; ``past`` is each frame's
    predecessor. madebyollin's keys (``conv.0`` holds the 2*n_in-channel weight); the first conv is split, see the
    module docstring."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(
            conv(n_in * 2, n_out), nn.ReLU(inplace=True), conv(n_out, n_out), nn.ReLU(inplace=True), conv(n_out, n_out)
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor, before: Tensor | None = None) -> Tensor:
        """x: frames (B, T, C, H, W); before: the frame (B, 1, C, H, W) that precedes x[:, 0], None at a clip start."""
        first = self.conv[0]
        weight_x, weight_past = first.weight.chunk(2, dim=1)
        h = _apply_2d(lambda f: F.conv2d(f, weight_x, first.bias, padding=1), x)
        if x.shape[1] > 1:  # conv_b over the run, one frame later
            h[:, 1:] += _apply_2d(lambda f: F.conv2d(f, weight_past, padding=1), x[:, :-1])
        if before is not None:
            h[:, :1] += _apply_2d(lambda f: F.conv2d(f, weight_past, padding=1), before)
        h = _apply_2d(self.conv[1:], h)
        return self.act(h + _apply_2d(self.skip, x))


class TGrow(nn.Module):
    """Temporal upsampling: a 1x1 conv to ``stride`` times the channels, split into ``stride`` frames."""

    def __init__(self, n_f: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f, n_f * stride, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        batch, frames, channels = x.shape[:3]
        grown = _apply_2d(self.conv, x)  # frame t, channel block j -> output frame t * stride + j
        return grown.reshape(batch, frames * self.stride, channels, *x.shape[3:])


class TPool(nn.Module):
    """Temporal downsampling: ``stride`` frames stacked on the channels, then a 1x1 conv back to n_f channels."""

    def __init__(self, n_f: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f * stride, n_f, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        batch, frames, channels = x.shape[:3]
        stacked = x.reshape(batch, frames // self.stride, self.stride * channels, *x.shape[3:])
        return _apply_2d(self.conv, stacked)


class PixelShuffle(nn.Module):
    """ops.pixel_shuffle on the final conv's output (patch_size > 1)."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:
        return ops.pixel_shuffle(x, self.factor)


def run_frames(layers: nn.Sequential, x: Tensor, memory: list[Tensor | None] | None = None) -> Tensor:
    """Runs frames (B, T, C, H, W) through a TAEHV layer stack. ``memory``: per layer index, the last input frame
    of each MemBlock from the previous call (None entries at a clip start); it is updated in place so that the next
    call continues the clip. Without memory the frames are a whole clip."""
    for index, layer in enumerate(layers):
        if isinstance(layer, MemBlock):
            before = None if memory is None else memory[index]
            if memory is not None:
                memory[index] = x[:, -1:].clone()  # a copy: a view would keep the whole chunk alive
            x = layer(x, before)
        elif isinstance(layer, (TGrow, TPool)):
            x = layer(x)
        else:
            x = _apply_2d(layer, x)
    return x


# --- decoder -------------------------------------------------------------------------------------------------------


class TAEHVDecoder(Decoder, nn.Sequential):
    """Video latents -> RGB frames in [0, 1] (madebyollin's TAEHV.decoder, same indices and state-dict keys)."""

    latent_ndim = 5
    output_range = "0,1"
    decode_options = ("chunk_frames", "progress")
    chunk_frames: int | None = None  # forward/decode: None picks whole clip or chunks; an int forces chunks

    def __init__(
        self,
        variant: str = "taew2_1",
        time_upscale: Sequence[bool] | None = None,
        space_upscale: Sequence[bool] = (True, True, True),
    ):
        preset = preset_of(variant, VARIANTS, "TAEHV")
        time_upscale = tuple(preset.decoder_time_upscale if time_upscale is None else time_upscale)
        space_upscale = tuple(space_upscale)
        if len(time_upscale) != 3 or len(space_upscale) != 3:
            raise ValueError(f"time_upscale and space_upscale need one flag per stage (3), got {time_upscale}, "
                             f"{space_upscale}")
        layers: list[nn.Module] = [Clamp(), conv(preset.latent_channels, DECODER_WIDTHS[0]), nn.ReLU(inplace=True)]
        for stage in range(3):
            width, next_width = DECODER_WIDTHS[stage], DECODER_WIDTHS[stage + 1]
            layers += [MemBlock(width, width) for _ in range(BLOCKS_PER_STAGE)]
            # madebyollin: Upsample, TGrow, conv. TGrow (1x1) runs first at low resolution; nn.Identity holds the
            # Upsample's index and UpsampleConv folds it into the conv.
            project = (UpsampleConv(width, next_width, bias=False) if space_upscale[stage]
                       else conv(width, next_width, bias=False))
            layers += [nn.Identity(), TGrow(width, 2 if time_upscale[stage] else 1), project]
        layers += [nn.ReLU(inplace=True), conv(DECODER_WIDTHS[3], 3 * preset.patch_size**2)]
        if preset.patch_size > 1:
            layers.append(PixelShuffle(preset.patch_size))
        super().__init__(*layers)
        self.variant = variant
        self.latent_channels = preset.latent_channels
        self.t_upscale = 2 ** sum(time_upscale)
        self.space_upscale = 2 ** sum(space_upscale) * preset.patch_size
        self.config = {"variant": variant, "time_upscale": list(time_upscale), "space_upscale": list(space_upscale)}

    def frames_out(self, latent_frames: int) -> int:
        """How many frames ``decode`` returns for this many latent frames."""
        if preset_of(self.variant, VARIANTS, "TAEHV").keep_all_frames_for_even_t and latent_frames % 2 == 0:
            return self.t_upscale * latent_frames
        return self.t_upscale * (latent_frames - 1) + 1

    def forward(self, z: Tensor) -> Tensor:
        """Video latents (B, C, T, h, w) in the decoder's space -> frames (B, T_out, 3, H, W), start-up frames
        dropped, not clamped; the whole clip at once or in chunks, as ``self.chunk_frames`` says (None: auto)."""
        return self._frames(z, self.chunk_frames)

    def stream(self, trim_start: bool = True) -> TAEHVStream:
        """A streaming decoder over these weights: feed latent frames, get frames as soon as they are decoded."""
        return TAEHVStream(self, trim_start)

    def decode_checked(self, latents: Tensor, chunk_frames: int | None = None,
                       progress: Progress | None = None) -> Tensor:
        """Video latents (B, C, T, h, w), diffusers' layout -> frames (B, T_out, 3, H, W) in [0, 1].

        ``chunk_frames`` (default: ``self.chunk_frames``, None): None decodes the whole clip at once when its largest
        activation fits in WHOLE_CLIP_BUDGET_BYTES (1 GiB) and in chunks otherwise; an int decodes chunks of that
        many latent frames with the state carried (peak memory set by the chunk, not the clip; the same frames).
        ``progress(done, total)`` is called after each chunk (latent frames).
        """
        chunk_frames = self.chunk_frames if chunk_frames is None else chunk_frames
        return self._frames(self.to_decoder_space(latents), chunk_frames, progress).clamp(0, 1)

    @torch.no_grad()
    def decode_stream(self, latents: Tensor, check_finite: bool | None = None, progress: Progress | None = None,
                      **options) -> Iterator[Tensor]:
        """Frames as each chunk of latent frames is decoded (``TAEHVStream``: memory flat in T). The option
        ``chunk_frames`` None: about a tenth of the clip, within the budget of ``auto_chunk_frames``."""
        self.check_options(options)
        self.prepare(latents, check_finite)
        frames_in, chunk_frames = latents.shape[2], options.get("chunk_frames")
        chunk = (min(self.auto_chunk_frames(latents), max(1, -(-frames_in // 10))) if chunk_frames is None
                 else checked_chunk(chunk_frames))
        stream = self.stream(trim_start=self.frames_out(frames_in) < self.t_upscale * frames_in)
        for start in range(0, frames_in, chunk):
            yield stream.push(latents[:, :, start:start + chunk], check_finite=False)
            if progress is not None:
                progress(min(start + chunk, frames_in), frames_in)

    def _frames(self, z: Tensor, chunk_frames: int | None, progress: Progress | None = None) -> Tensor:
        frames_in = z.shape[2]
        chunk_frames = self.auto_chunk_frames(z) if chunk_frames is None else checked_chunk(chunk_frames)
        if chunk_frames >= frames_in:
            frames = run_frames(self, z.transpose(1, 2))
            frames = frames[:, frames.shape[1] - self.frames_out(frames_in):]
            if progress is not None:
                progress(frames_in, frames_in)
            return frames
        stream, parts = self.stream(trim_start=self.frames_out(frames_in) < self.t_upscale * frames_in), []
        for start in range(0, frames_in, chunk_frames):
            parts.append(stream.advance(z[:, :, start:start + chunk_frames]))
            if progress is not None:
                progress(min(start + chunk_frames, frames_in), frames_in)
        return torch.cat(parts, 1)

    def auto_chunk_frames(self, latents: Tensor) -> int:
        """The chunk size decode() picks: the whole clip if it fits the budget, else as many latent frames as do."""
        batch, _, frames, height, width = latents.shape
        element = torch.finfo(self[1].weight.dtype).bits // 8
        per_latent_frame = batch * self.t_upscale * DECODER_WIDTHS[3] * height * width * self.space_upscale**2
        per_latent_frame *= element * 2  # a block's input and output live together
        return max(1, min(frames, WHOLE_CLIP_BUDGET_BYTES // max(1, per_latent_frame)))

    @classmethod
    def from_file(
        cls, path: str | Path, variant: str | None = None, device: Device = None, dtype: DType = None
    ) -> TAEHVDecoder:
        """madebyollin's <variant>.pth or .safetensors (keys ``decoder.N.*``, and ``encoder.N.*``, which are not
        used here); ``variant`` None: from the file name, else from the weights' shapes. dtype None: float32."""
        state, variant = _read_weights(path, variant)
        model = cls(variant)
        return load_weights(model, _trim_tgrow(model, _part(state, "decoder", path)), str(path), device, dtype)


class TAEHVStream:
    """Streaming decode with carried state: ``push`` latent frames (B, C, t, h, w) as they come, get back the frames
    (B, n, 3, H, W) in [0, 1] that they complete (``t_upscale`` per latent frame; the clip's first latent frame gives
    one, as the start-up frames are dropped). ``reset()`` starts a new clip. Peak memory is that of one push.

    ``trim_start=False`` keeps the start-up frames (taecvx keeps them for clips of an even latent length, which a
    stream cannot know in advance; decode() passes the right choice)."""

    def __init__(self, decoder: TAEHVDecoder, trim_start: bool = True):
        self.decoder = decoder
        self.trim_start = trim_start
        self.reset()

    def reset(self) -> None:
        self.memory: list[Tensor | None] = [None] * len(self.decoder)
        self.frames_decoded = 0  # before the start-up trim
        self._shape: tuple | None = None

    @torch.no_grad()
    def push(self, latents: Tensor, check_finite: bool | None = None) -> Tensor:
        """Diffusion latents (B, C, t, h, w), t >= 1, any float dtype (cast to the decoder's, as fastdec.decode does)
        -> the frames (B, n, 3, H, W) in [0, 1] they complete, in the decoder's dtype."""
        check_latents(latents, self.decoder, check_finite)
        return self.advance(self.decoder.to_decoder_space(latents.to(self.decoder[1].weight.dtype))).clamp(0, 1)

    def advance(self, z: Tensor) -> Tensor:
        """push() without the checks and the clamp, on latents in the decoder's space (differentiable)."""
        shape = (z.shape[0], *z.shape[3:], z.dtype)
        if self._shape is not None and shape != self._shape:
            raise ValueError(
                f"this stream decodes latents of batch, h, w, dtype {self._shape[:3]}, {self._shape[3]}; got "
                f"{shape[:3]}, {shape[3]}: call reset() to start a clip of another shape"
            )
        self._shape = shape
        frames = run_frames(self.decoder, z.transpose(1, 2), self.memory)
        start = max(0, self.decoder.t_upscale - 1 - self.frames_decoded) if self.trim_start else 0
        self.frames_decoded += frames.shape[1]
        return frames[:, start:]

    def flush(self) -> Tensor:
        """Frames still pending at the end of a clip: none for TAEHV (every push returns all it completes); an empty
        (B, 0, 3, H, W) tensor, kept so that callers need not know the model."""
        if self._shape is None:
            raise ValueError("flush() before any push(): nothing was decoded")
        batch, height, width, dtype = self._shape
        scale = self.decoder.space_upscale
        device = self.decoder[1].weight.device
        return torch.empty(batch, 0, 3, height * scale, width * scale, dtype=dtype, device=device)


# --- encoder -------------------------------------------------------------------------------------------------------


class TAEHVEncoder(nn.Sequential):
    """RGB frames in [0, 1] -> video latents (madebyollin's TAEHV.encoder, same indices and keys)."""

    def __init__(self, variant: str = "taew2_1", time_downscale: Sequence[bool] | None = None):
        preset = preset_of(variant, VARIANTS, "TAEHV")
        time_downscale = tuple(preset.encoder_time_downscale if time_downscale is None else time_downscale)
        layers: list[nn.Module] = [conv(3 * preset.patch_size**2, ENCODER_WIDTH), nn.ReLU(inplace=True)]
        for stage in range(3):
            layers += [TPool(ENCODER_WIDTH, 2 if time_downscale[stage] else 1),
                       conv(ENCODER_WIDTH, ENCODER_WIDTH, stride=2, bias=False)]
            layers += [MemBlock(ENCODER_WIDTH, ENCODER_WIDTH) for _ in range(BLOCKS_PER_STAGE)]
        layers.append(conv(ENCODER_WIDTH, preset.latent_channels))
        super().__init__(*layers)
        self.variant = variant
        self.latent_channels = preset.latent_channels
        self.patch_size = preset.patch_size
        self.t_downscale = 2 ** sum(time_downscale)

    def encode(self, frames: Tensor) -> Tensor:
        """Frames (B, T, 3, H, W) in [0, 1] (what decode returns) -> latents (B, C, T', h, w), diffusers' layout,
        which TAEHVDecoder.decode maps back to frames. T is padded to a multiple of the time downscale by repeating
        the last frame (madebyollin's convention)."""
        if not isinstance(frames, Tensor) or frames.dim() != 5 or frames.shape[2] != 3 or 0 in frames.shape:
            shape = tuple(frames.shape) if isinstance(frames, Tensor) else type(frames).__name__
            raise ValueError(f"encode expects RGB frames (B, T, 3, H, W) in [0, 1] with T >= 1, got {shape}")
        multiple = 8 * self.patch_size
        if frames.shape[-2] % multiple or frames.shape[-1] % multiple:
            raise ValueError(f"frame height and width must be multiples of {multiple}, got {tuple(frames.shape[-2:])}")
        if self.patch_size > 1:
            frames = F.pixel_unshuffle(frames.flatten(0, 1), self.patch_size).unflatten(0, frames.shape[:2])
        pad = -frames.shape[1] % self.t_downscale
        if pad:
            frames = torch.cat([frames, frames[:, -1:].expand(-1, pad, -1, -1, -1)], 1)
        return run_frames(self, frames).transpose(1, 2)

    @classmethod
    def from_file(
        cls, path: str | Path, variant: str | None = None, device: Device = None, dtype: DType = None
    ) -> TAEHVEncoder:
        """The ``encoder.N.*`` weights of madebyollin's <variant>.pth or .safetensors."""
        state, variant = _read_weights(path, variant)
        return load_weights(cls(variant), _part(state, "encoder", path), str(path), device, dtype)


# --- loading -------------------------------------------------------------------------------------------------------

_TGROW_INDICES = (7, 13, 19)


def _read_weights(path: str | Path, variant: str | None) -> tuple[dict[str, Tensor], str]:
    """(state dict, variant) of a madebyollin TAEHV file; the variant is checked against the weights."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TAEHV weights {path} not found: download <variant>.pth from {GITHUB}")
    state = read_state_dict(path, "the file is truncated or not a TAEHV checkpoint; download it again")
    if "decoder.1.weight" not in state:
        raise ValueError(
            f"{path} is not a TAEHV checkpoint (no 'decoder.1.weight', the decoder's first conv); TAEHV files from "
            f"{GITHUB} hold 'encoder.*' and 'decoder.*' weights"
        )
    # What the weights decode: the first conv's input channels, and the patch of the output conv's 3 * patch**2.
    output_conv = state.get("decoder.22.weight")
    latent_channels = state["decoder.1.weight"].shape[1]
    patch = None if output_conv is None else math.isqrt(output_conv.shape[0] // 3)
    found = [name for name, v in VARIANTS.items() if (v.latent_channels, v.patch_size) == (latent_channels, patch)]
    described = f"{latent_channels} latent channels, patch {'?' if patch is None else patch}"
    named = variant or variant_of_name(path.stem, VARIANTS)  # taew2_1.pth, taehv1_5.safetensors, taew2_1_arch_...
    if named is None:
        if len(found) != 1:
            raise ValueError(
                f"{path}: weights for {described} fit the TAEHV variants "
                f"{found or 'none of ' + str(sorted(VARIANTS))}: pass variant=<the variant of this file>"
            )
        return state, found[0]
    preset = preset_of(named, VARIANTS, "TAEHV")
    if named not in found:
        looks_like = f"looks like {' or '.join(found)}" if found else f"matches no TAEHV variant ({sorted(VARIANTS)})"
        raise ValueError(
            f"{path} holds a TAEHV for {described}, which {looks_like}, not {named} "
            f"({preset.latent_channels} latent channels, patch {preset.patch_size}): load it as its own variant"
        )
    return state, named


def _trim_tgrow(model: TAEHVDecoder, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """madebyollin's loading rule: a file whose TGrow makes more frames than the model's (trained with temporal
    upsampling that the variant turns off) keeps the output channels of the last frame. Anything else must match."""
    state = dict(state)
    for index in _TGROW_INDICES:
        key = f"{index}.conv.weight"
        rows = model.state_dict()[key].shape[0]
        if key in state and state[key].shape[0] > rows and state[key].shape[0] % rows == 0:
            state[key] = state[key][-rows:]
    return state


def _part(state: dict[str, Tensor], part: str, path) -> dict[str, Tensor]:
    prefix = f"{part}."
    chosen = {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}
    if not chosen:
        raise ValueError(f"{path} has no '{prefix}*' weights: it holds no TAEHV {part}")
    return chosen


def is_weights_file(path: Path) -> bool:
    """madebyollin's TAEHV files: a variant's name (taew2_1.pth), or weights keyed decoder.N.* (a TAESD .pth is
    keyed N.*; a diffusers .safetensors sits next to a config.json)."""
    if path.suffix not in (".pth", ".pt", ".safetensors"):
        return False
    if variant_of_name(path.stem, VARIANTS) is not None:
        return True
    if path.suffix == ".safetensors":
        return not (path.parent / "config.json").is_file()
    return "decoder.1.weight" in read_state_dict(path, "the file is truncated or not a weights file; download it again")


register(Family(
    name="taehv", order=50, classes=(TAEHVDecoder,),
    names={name: Weights(files=(f"{name}.safetensors", f"{name}.pth"), github=GITHUB,
                         about=f"{variant.latents_of}, {variant.latent_channels} ch")
           for name, variant in VARIANTS.items()},
    weights_file=is_weights_file,
    read_file=lambda path, name: TAEHVDecoder.from_file(path, name if name in VARIANTS else None),
    # 16 channels: Wan 2.1's; taehv and taecvx read 16-channel HunyuanVideo and CogVideoX latents (pass their name)
    video_defaults={16: "taew2_1", 32: "taehv1_5", 48: "taew2_2", 128: "taeltx_2"},
))
