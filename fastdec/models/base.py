"""What every fastdec decoder shares: the latent convention, the one decode() contract, strict save/load."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor, nn

from fastdec.read_errors import read_error_advice, read_error_reason
from fastdec.validate import check_latents, weights_device_and_dtype

Progress = Callable[[int, int], None]  # progress(done, total), in latent frames
Device = torch.device | str | None
DType = torch.dtype | None
Model = TypeVar("Model", bound=nn.Module)
# decode() with a tile_size attribute hands the decode to this tiler (decoder, checked latents, tile_size) -> images,
# or None where tiling is already under way. The orchestration layer installs it (fastdec.api: fastdec.tiling's
# tiled_decode), so that tiling wraps decoders and no model imports it.
Tiler = Callable[["Decoder", Tensor, int], "Tensor | None"]
_tiler: Tiler | None = None


def checked_chunk(chunk: object, name: str = "chunk_frames") -> int:
    """``chunk`` (latent frames per chunk, the option ``name``) if it is a positive int, else a ValueError."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"{name} must be a positive int (latent frames per chunk) or None, got {chunk!r}")
    return chunk


def install_tiler(tiler: Tiler | None) -> None:
    """Sets the tiler that ``Decoder.decode`` calls for a decoder with ``tile_size`` set."""
    global _tiler
    _tiler = tiler


class Decoder(nn.Module):
    """A latent-to-image decoder built from fastdec ops.

    Subclasses set ``latent_channels``, ``scaling_factor``, ``shift_factor`` (diffusion latents are mapped to the
    decoder's own space by ``latents / scaling_factor + shift_factor``), ``output_range`` ("-1,1" or "0,1": what
    ``forward`` returns) and ``config`` (the constructor's keyword arguments, so that ``from_pretrained`` can rebuild
    the module), and implement ``forward(z)`` on latents in the decoder's own space. A family changes decode() only
    through ``prepare`` (other forms of input) and ``decode_checked`` (the decode itself), and declares the options
    they take by name in ``input_options`` and ``decode_options``.
    """

    latent_channels: int
    latent_ndim: int = 4  # 4: image latents (B, C, h, w); 5: video latents (B, C, T, h, w)
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    output_range: str = "-1,1"
    config: dict
    tile_size: int | None = None  # set: decode() runs in exact slabs of this many pixel rows (fastdec.tiling)
    force_upcast: bool = False  # overflows in fp16 (diffusers' flag; swap_vae passes it to the pipeline)
    per_frame_latents: bool = False  # a video decoder that pipelines hand (B*T, C, h, w) and num_frames (SVD)
    input_options: tuple[str, ...] = ()  # options of prepare(), e.g. FLUX.2's image_size (token unpacking)
    decode_options: tuple[str, ...] = ()  # options of decode_checked(), e.g. chunk_frames, progress
    # A 2-D conv decoder whose faster layout on a GPU is channels_last: the GPU benchmarks run it so, and so does
    # fastdec.decode with a decoder it loads by name (Conv3d and ViT decoders keep the default layout).
    channels_last_on_cuda: bool = False

    def decode(self, latents: Tensor, check_finite: bool | None = None, **options) -> Tensor:
        """Diffusion latents (B, C, h, w) -> images (B, 3, H, W) in [0, 1], or video latents (B, C, T, h, w) ->
        frames (B, T_out, 3, H, W) in [0, 1], in the decoder's dtype. Latents of another float dtype are cast to
        the decoder's (bf16 latents into an fp32 decoder, fp32 into an fp16 one), as fastdec.decode does.

        The latents are checked first (fastdec.validate.check_latents: type, shape, channels, device, and NaN/Inf
        unless ``check_finite=False``, compiled or captured). ``options`` are the family's own (its
        ``input_options`` and ``decode_options``); one it does not take is a TypeError that lists those it does.
        With ``tile_size`` set, the decode runs in exact slabs (fastdec.tiling.tiled_decode); not with options,
        which a tiled decode does not pass on."""
        self.check_options(options)
        if isinstance(latents, Tensor) and latents.is_floating_point():
            # One behaviour with fastdec.decode: latents of any float dtype are cast to the decoder's.
            latents = latents.to(weights_device_and_dtype(self)[1])
        inputs = {name: options.pop(name) for name in self.input_options if name in options}
        latents = self.prepare(latents, check_finite, **inputs)
        if self.tile_size is not None and _tiler is not None and not options:
            images = _tiler(self, latents, self.tile_size)
            if images is not None:
                return images
        return self.decode_checked(latents, **options)

    def check_options(self, options: dict) -> None:
        """TypeError for an option this family does not take, naming the ones it does."""
        unknown = [name for name in options if name not in self.input_options + self.decode_options]
        if unknown:
            takes = ", ".join(["check_finite", *self.input_options, *self.decode_options])
            raise TypeError(
                f"{type(self).__name__}.decode does not take {', '.join(unknown)}; it takes: {takes}"
            )

    def prepare(self, latents: Tensor, check_finite: bool | None = None) -> Tensor:
        """The latents as given -> checked latents in the form ``decode_checked`` reads (what fastdec.decode tiles).
        FLUX.2 decoders also take packed latents and tokens here."""
        return check_latents(latents, self, check_finite)

    def decode_checked(self, latents: Tensor) -> Tensor:
        """Checked latents -> images in [0, 1]: ``forward`` in the decoder's own space, mapped to [0, 1]."""
        image = self(self.to_decoder_space(latents))
        if self.output_range == "-1,1":
            image = image * 0.5 + 0.5
        return image.clamp(0, 1)

    @torch.no_grad()
    def decode_stream(self, latents: Tensor, check_finite: bool | None = None, progress: Progress | None = None,
                      **options) -> Iterator[Tensor]:
        """decode() in pieces along the time axis, each yielded as soon as it is decoded (no autograd), so that a
        long clip can be written as it goes; ``progress(done, total)`` (latent frames) after each piece. Families
        that decode chunk by chunk override it; here the whole decode is one piece."""
        frames = self.decode(latents, check_finite, **options)
        if progress is not None:
            progress(latents.shape[2], latents.shape[2])
        yield frames

    def check_input(self, z: Tensor, hint: str = "") -> None:
        """forward's check of an image decoder's input: (B, latent_channels, h, w), else a ValueError + ``hint``."""
        if z.dim() != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"expected latents of shape (B, {self.latent_channels}, h, w), got {tuple(z.shape)}{hint}")

    def to_decoder_space(self, latents: Tensor) -> Tensor:
        """Diffusion latents -> the decoder's own space: ``latents / scaling_factor + shift_factor``."""
        return latents / self.scaling_factor + self.shift_factor

    def latent_affine(self) -> tuple[list[float], list[float]]:
        """``to_decoder_space`` as per-channel (scale, offset) lists, input = latents * scale + offset (swap_vae
        composes it with the pipeline's own map)."""
        channels = self.latent_channels
        return [1.0 / self.scaling_factor] * channels, [float(self.shift_factor)] * channels

    def save_pretrained(self, directory: str | Path) -> None:
        """Writes config.json (class and constructor arguments) and model.safetensors."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"class": type(self).__name__, **self.config}
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, directory: str | Path, device=None, dtype=None) -> Decoder:
        """Rebuilds the module from config.json and loads model.safetensors strictly (every key, no extras)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path, weights_path = directory / "config.json", directory / "model.safetensors"
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: save_pretrained() writes config.json and model.safetensors")
        config = json.loads(config_path.read_text())
        name = config.pop("class", cls.__name__)
        if name != cls.__name__:
            raise ValueError(
                f"{config_path} describes a {name}, not a {cls.__name__}; load it with {name}.from_pretrained"
            )
        return load_weights(cls(**config), load_file(str(weights_path)), str(weights_path), device, dtype)


def read_diffusers_vae(vae_or_folder, *class_names: str) -> tuple[dict, dict[str, Tensor], str]:
    """(config, state dict, source) of a diffusers module of one of ``class_names`` (told by class name: diffusers
    is not imported), or of its ``save_pretrained`` folder or a pipeline folder's ``vae/`` subfolder (source: the
    weights file, diffusion_pytorch_model.safetensors, else the .bin read weights_only): what every
    ``from_diffusers`` reads. A module's config gets the ``_class_name`` that a folder's config.json holds."""
    if not isinstance(vae_or_folder, (str, Path)):
        kind = next((cls.__name__ for cls in type(vae_or_folder).__mro__ if cls.__name__ in class_names), None)
        if kind is None:
            raise ValueError(f"from_diffusers takes a diffusers.{' or '.join(class_names)} or a folder, got a "
                             f"{type(vae_or_folder).__name__}")
        return {**vae_or_folder.config, "_class_name": kind}, vae_or_folder.state_dict(), f"the given diffusers.{kind}"
    folder = Path(vae_or_folder)
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    config_path = folder / "config.json"
    weights = [folder / "diffusion_pytorch_model.safetensors", folder / "diffusion_pytorch_model.bin"]
    if not config_path.is_file() or not any(path.is_file() for path in weights):
        raise FileNotFoundError(
            f"{folder} is not a diffusers {class_names[0]} folder: it needs config.json and "
            f"diffusion_pytorch_model.safetensors ({class_names[0]}.save_pretrained writes both; sharded or variant "
            "weight files are not supported)"
        )
    config = json.loads(config_path.read_text())
    class_name = config.get("_class_name", class_names[0])
    if class_name not in class_names:
        raise ValueError(f"{config_path} describes a {class_name}, not an {' or '.join(class_names)}")
    path = next(path for path in weights if path.is_file())
    state = read_state_dict(path, f"the file is truncated or not a valid {class_name} checkpoint; re-download it")
    return config, state, str(path)


def read_state_dict(path: Path, corrupt_advice: str) -> dict[str, Tensor]:
    """The tensors of a .safetensors file, or of a torch file read with ``torch.load(weights_only=True)``. A file that
    cannot be read raises ValueError naming it, why, and ``corrupt_advice`` (what to do), except for a refused
    pickle, which gets the advice for that; a file that holds something other than tensors by name is refused."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated download, an HTML error page, a pickle of something else, ...
        raise ValueError(
            f"could not read {path} ({type(error).__name__}: {read_error_reason(error)}): "
            f"{read_error_advice(error, corrupt_advice)}"
        ) from error
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def load_state_dict_strict(module: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """load_state_dict that names every missing, unexpected or mis-shaped key and what to do about it."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        lines = [f"weights in {source} do not match {type(module).__name__}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_first(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_first(unexpected)}")
        if shapes:
            lines.append(f"  shape mismatches: {shapes[:8]}")
        lines.append("  check that the file belongs to this decoder and its config (latent channels, widths).")
        raise ValueError("\n".join(lines))
    with torch.no_grad():
        module.load_state_dict(state, strict=True)


def load_weights(model: Model, state: dict[str, Tensor], source: str, device: Device = None,
                 dtype: DType = None) -> Model:
    """load_state_dict_strict, then the model moved to ``device`` / ``dtype`` (None: as it is), in eval mode."""
    load_state_dict_strict(model, state, source)
    return model.to(device=device, dtype=dtype).eval()


def _first(keys: list[str], count: int = 8) -> str:
    return ", ".join(keys[:count]) + (f" ... and {len(keys) - count} more" if len(keys) > count else "")
