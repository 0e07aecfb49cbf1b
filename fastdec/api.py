"""The two calls most users need: ``fastdec.load`` (a decoder from a name, a folder, a file or a module) and
``fastdec.decode`` (diffusion latents -> images in [0, 1]).

Where names look for weights, in order:

1. ``$FASTDEC_HOME`` (default ``~/.cache/fastdec``): ``<name>_decoder.pth`` (madebyollin's TAESD files) or a folder
   ``<name>/`` holding ``config.json`` and ``diffusion_pytorch_model.safetensors`` (a diffusers VAE folder);
2. the Hugging Face Hub through ``huggingface_hub.hf_hub_download`` (its cache first; nothing is fetched when
   ``HF_HUB_OFFLINE=1``).

A name that is found nowhere raises FileNotFoundError naming the file to fetch, where from, and where to put it.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from fastdec import tiling, wording
from fastdec.models import registry
from fastdec.models.base import Decoder, install_tiler
from fastdec.pixels import to_uint8_hwc
from fastdec.read_errors import read_error_advice, read_error_reason
from fastdec.validate import check_latents_tensor, weights_device_and_dtype

OUTPUTS = ("tensor", "uint8", "pil")
WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors", ".ckpt", ".bin")  # files load() reads, or that users try
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def __getattr__(name: str):
    """The registry's tables under the names this module gave them before fastdec.models.registry existed."""
    views = {"ALIASES": registry.aliases, "RANDOM_PRESETS": lambda: tuple(registry.presets()),
             "DEFAULT_DECODERS": registry.default_decoders,
             "DEFAULT_VIDEO_DECODERS": lambda: registry.default_decoders(5)}
    if name in views:
        return views[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class RandomWeightsWarning(UserWarning):
    """load() built an architecture with random weights: it decodes noise until trained or given trained weights."""


def fastdec_home() -> Path:
    """The folder that names look in before the Hub: $FASTDEC_HOME, default ~/.cache/fastdec."""
    return Path(os.environ.get("FASTDEC_HOME") or "~/.cache/fastdec").expanduser()


def shipped_weights() -> dict[str, Path]:
    """Decoders trained by fastdec and shipped with it (the repo's weights/, in a wheel fastdec/weights/): name ->
    save_pretrained folder. They load offline, by name."""
    package = Path(__file__).resolve().parent
    found = {}
    for root in (package / "weights", package.parent / "weights"):  # wheel install, source checkout
        if root.is_dir():
            found.update({p.parent.name: p.parent for p in sorted(root.glob("*/config.json"))})
    return found


def names() -> list[str]:
    """Every name load() accepts."""
    return [*registry.named(), *registry.aliases(), *registry.presets(), *shipped_weights()]


def load(source, device=None, dtype=None, **config_overrides) -> Decoder:
    """A fastdec Decoder from a name, a path or a module, on ``device`` in ``dtype``.

    ``source`` is one of:

    * a fastdec ``Decoder``: moved/cast in place and returned;
    * a diffusers ``AutoencoderKL`` (-> AutoencoderKLDecoder), ``AutoencoderKLFlux2`` (-> Flux2VAEDecoder),
      ``AutoencoderDC`` (-> DCAEDecoder), ``AutoencoderKLWan`` / ``AutoencoderKLQwenImage`` (-> WanDecoder),
      ``AutoencoderKLTemporalDecoder`` (Stable Video Diffusion, -> SVDDecoder) or ``AutoencoderTiny``
      (-> TAESDDecoder); device and dtype default to the VAE's;
    * a folder: a fastdec ``save_pretrained`` folder, a diffusers VAE folder (config.json ``_class_name``
      one of the diffusers classes above) or a pipeline folder with a ``vae/`` subfolder;
    * a madebyollin TAESD ``.pth`` decoder file (variant from the file name, e.g. taesdxl_decoder.pth, else from
      the weights);
    * a Hub repo id: owner/repo (a diffusers VAE repo, or a pipeline repo whose VAE is in vae/) or
      owner/repo/subfolder;
    * a name: a decoder trained by fastdec and shipped with it (``shipped_weights()``, offline); taesd, taesdxl,
      taesd3, taef1, taef2 (TAESD family); sd (sd1, sd2), sdxl, sd3, flux (flux1), flux2, dc-ae (SANA's): the exact
      VAE decoder; svd: Stable Video Diffusion's video VAE decoder; tae-192, efficientvit, efficientvit-attn (DC-AE
      configurations), vit-s, vit-b, tae-temporal (a video decoder): random weights (a RandomWeightsWarning says
      so), and ``config_overrides`` such as ``latent_channels=16`` pass through.

    An existing path wins over a name. Trained weights fix the architecture, so config overrides are only accepted
    for the random presets.
    """
    if isinstance(source, Decoder):
        _refuse_overrides(config_overrides, "a Decoder module")
        return source.to(device=device, dtype=dtype)
    if isinstance(source, nn.Module):
        _refuse_overrides(config_overrides, "a diffusers VAE")
        return _from_diffusers_module(source, device, dtype)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"load() takes a name, a path, a fastdec Decoder or a diffusers VAE, got a {type(source).__name__}"
        )
    path = Path(source).expanduser()
    if path.exists():
        _refuse_overrides(config_overrides, f"trained weights ({path})")
        return _from_path(path, device, dtype)
    name = registry.aliases().get(str(source).lower(), str(source).lower())
    shipped = shipped_weights()
    if name in shipped:
        _refuse_overrides(config_overrides, f"the trained decoder {name!r}")
        return _from_folder(shipped[name], device, dtype)
    if name in registry.presets():
        model = build_preset(name, device, dtype, **config_overrides)
        warnings.warn(
            f"{wording.loading(name)} built a {type(model).__name__} with random weights: it decodes noise until "
            f"trained. Load trained weights with {wording.loading('<folder written by save_pretrained>')}.",
            RandomWeightsWarning,
            stacklevel=2,
        )
        return model
    if name in registry.named():
        _refuse_overrides(config_overrides, f"the trained decoder {name!r}")
        return _from_name(name, device, dtype)
    # A path to a weights file or an explicit path that does not exist: a typo, not a Hub id or a name.
    if path.suffix.lower() in WEIGHT_SUFFIXES or str(source).startswith((".", "/", "~")):
        where = "" if path.is_absolute() else f" (relative to the working directory {Path.cwd()})"
        raise FileNotFoundError(f"no such file or folder: {path}{where}")
    if str(source).count("/") in (1, 2):
        _refuse_overrides(config_overrides, f"the Hub repo {source!r}")
        return _from_hub_id(str(source), device, dtype)
    close = difflib.get_close_matches(name, names(), n=3, cutoff=0.6)
    raise FileNotFoundError(
        f"{source!r} is neither an existing path, a Hub repo id (owner/repo[/subfolder]) nor a known name; "
        + (f"did you mean {' or '.join(repr(match) for match in close)}?" if close else f"names: {', '.join(names())}")
    )


def default_decoder_name(latent_channels: int) -> str:
    """The TAESD-family decoder decode() uses for latents with this many channels."""
    defaults = registry.default_decoders()
    if latent_channels not in defaults:
        raise ValueError(
            f"no default decoder for {latent_channels}-channel latents (defaults exist for "
            f"{sorted(defaults)} channels): pass {wording.decoder_choice()}"
        )
    return defaults[latent_channels]


def default_video_decoder_name(latent_channels: int) -> str:
    """The video decoder decode() uses for video latents (B, C, T, h, w) with this many channels."""
    defaults = registry.default_decoders(5)
    if latent_channels not in defaults:
        video = [f"{name} ({weights.about})" if weights.about else name
                 for name, (family, weights) in registry.named().items() if family.classes[0].latent_ndim == 5]
        video += [name for name, (cls, _) in registry.presets().items() if cls.latent_ndim == 5]
        raise ValueError(
            f"no default decoder for {latent_channels}-channel video latents (defaults exist for "
            f"{sorted(defaults)} channels): pass {wording.decoder_choice()}: the video decoders are {', '.join(video)}"
        )
    return defaults[latent_channels]


def default_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype decode() and the CLI load decoders in unless told: bfloat16 on CUDA (float16 where the GPU lacks
    bf16), float32 elsewhere. bf16 rather than fp16 because the SD/SDXL VAE decoders overflow fp16 (force_upcast)."""
    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def decode(
    latents: Tensor,
    decoder=None,
    output: str = "tensor",
    check_finite: bool | None = None,
    image_size: tuple[int, int] | None = None,
    tile_size: int | None = None,
):
    """Diffusion latents -> images in [0, 1], through the decoder's own latent convention.

    ``latents`` are what a diffusion model produces (a diffusers pipeline's ``output_type="latent"``), shaped
    (C, h, w) or (B, C, h, w), or video latents (B, C, T, h, w), any float dtype (cast to the decoder's), on the
    decoder's device.

    ``decoder``: None picks the TAESD-family decoder for the channel count (4: taesd, 16: taef1, 32: taef2; for SD3
    latents pass ``decoder="taesd3"``), loaded on the latents' device in ``default_dtype`` and cached. A name is
    loaded the same way and cached; a path or module goes through ``load`` on every call (load it once yourself
    and pass the Decoder); a Decoder is used as is. Cached decoders are shared: do not modify them. On CUDA a
    decoder loaded by name runs channels_last where that is its faster layout (``Decoder.channels_last_on_cuda``).

    ``output``: "tensor": (B, 3, H, W) in the decoder's dtype; "uint8": (B, H, W, 3) uint8, round(255 * x);
    "pil": a list of PIL images. An unbatched (C, h, w) input gives one image: (3, H, W), (H, W, 3) or an Image.

    Video latents (B, C, T, h, w) go to a video decoder (latent_ndim 5; None picks one by channel count: 16:
    taew2_1, 32: taehv1_5, 48: taew2_2, 128: taeltx_2) and give frames: "tensor" (B, T_out, 3, H, W), "uint8"
    (B, T_out, H, W, 3), "pil" one list of frames per video. TAEHV decoders decode the whole clip at once, or in
    chunks of latent frames when the clip is large (see TAEHVDecoder.decode; the same frames either way).

    ``check_finite``: the NaN/Inf check on the latents (a host read-back); None runs it in eager use unless
    FASTDEC_CHECK_FINITE=0, False skips it; it never runs under torch.compile or CUDA-graph capture.

    FLUX.2 (decoder "flux2", a loaded AutoencoderKLFlux2, or ``PackedLatentsDecoder(taef2, vae)``): raw VAE latents
    (B, 32, H/8, W/8) and packed ones (B, 128, H/16, W/16) are told apart by their channels; the token sequence
    ``Flux2Pipeline(output_type="latent")`` returns, (B, H*W/256, 128), needs ``image_size=(H, W)``, the size the
    pipeline generated, to be laid out on its grid (fastdec.models.flux2).

    ``tile_size``: decode in exact horizontal slabs of this many pixel rows (a multiple of the decoder's
    latent-to-pixel factor, e.g. 8), same pixels as untiled, device memory bounded by one slab (fastdec.tiling);
    0 never tiles; None (default) uses the decoder's ``tile_size`` attribute, else tiles only when the untiled
    decode would not fit in free CUDA memory (and logs that it does).
    """
    if output not in OUTPUTS:
        raise ValueError(f"unknown output kind {output!r}: choose one of {OUTPUTS}")
    check_latents_tensor(latents)
    if latents.dim() not in (3, 4, 5):
        raise ValueError(
            f"latents must be (C, h, w) or (B, C, h, w) image latents or (B, C, T, h, w) video latents, got shape "
            f"{tuple(latents.shape)}"
        )
    options = {} if image_size is None else {"image_size": image_size}  # tokens (B, N, C): batched
    unbatched = latents.dim() == 3 and not options
    batch = latents.unsqueeze(0) if unbatched else latents
    decoder = _decoder_for(batch, decoder)
    decoder.check_options(options)
    batch = decoder.prepare(batch, check_finite, **options)  # checked; the form tiling sees (FLUX.2: raw latents)
    _, weights_dtype = weights_device_and_dtype(decoder)
    with torch.no_grad():
        images = tiling.decode(decoder, batch.to(weights_dtype), tile_size, check_finite=False)  # checked above
    if latents.dim() == 5:
        return _frames_as(images, output)
    result = images if output == "tensor" else to_uint8_hwc(images)
    if output == "pil":
        from PIL import Image

        result = [Image.fromarray(array) for array in result.cpu().numpy()]
    return result[0] if unbatched else result


# --- decode() helpers ----------------------------------------------------------------------------------------------


def _frames_as(frames: Tensor, output: str):
    """Decoded videos (B, T, 3, H, W) as ``output`` asks."""
    if output == "tensor":
        return frames
    from fastdec.video import to_uint8_frames

    pixels = torch.stack([to_uint8_frames(video) for video in frames])
    if output == "uint8":
        return pixels.to(frames.device)
    from PIL import Image

    return [[Image.fromarray(array) for array in video] for video in pixels.numpy()]


def _tile_by_attribute(decoder: Decoder, latents: Tensor, tile_size: int) -> Tensor | None:
    """Decoder.decode with its ``tile_size`` attribute set: exact slabs, unless a tiled run (or fastdec.decode's
    tile_size=0) is under way."""
    if tiling.tiling_active():
        return None
    return tiling.tiled_decode(decoder, latents, tile_size, check_finite=False)  # checked by Decoder.decode


install_tiler(_tile_by_attribute)


def _decoder_for(latents: Tensor, decoder) -> Decoder:
    if isinstance(decoder, Decoder):
        return decoder
    if decoder is None:
        decoder = (default_video_decoder_name if latents.dim() == 5 else default_decoder_name)(latents.shape[1])
    if isinstance(decoder, str) and not Path(decoder).expanduser().exists():
        return _cached_decoder(decoder.lower(), latents.device, default_dtype(latents.device))
    return load(decoder, device=latents.device, dtype=default_dtype(latents.device))


@functools.cache
def _cached_decoder(name: str, device: torch.device, dtype: torch.dtype) -> Decoder:
    decoder = load(name, device=device, dtype=dtype)
    if device.type == "cuda" and decoder.channels_last_on_cuda:  # the layout the GPU benchmarks time
        decoder.to(memory_format=torch.channels_last)
    return decoder


# --- load() helpers ------------------------------------------------------------------------------------------------


def _refuse_overrides(config_overrides: dict, what: str) -> None:
    if config_overrides:
        raise TypeError(
            f"config overrides {sorted(config_overrides)} apply only to the random presets "
            f"{tuple(registry.presets())}; {what} fixes its architecture"
        )


def build_preset(name: str, device=None, dtype=None, **config_overrides) -> Decoder:
    """The architecture ``name`` (a random preset of the registry) with fresh random weights, in eval mode. Unlike
    ``load(name)`` it never reads a path of that name and does not warn: for code that trains it (fastdec train)."""
    cls, config = registry.presets()[name]
    config = {"latent_channels": 4, **config, **config_overrides}
    with torch.device(device or "cpu"):  # initialise where it will run: no CPU copy of a large model
        model = cls(**config)
    return model.to(dtype=dtype).eval()


def _from_diffusers_module(vae: nn.Module, device, dtype) -> Decoder:
    diffusers = sys.modules.get("diffusers")  # a diffusers VAE means diffusers is imported already
    readers, kind = registry.diffusers_readers(), None
    if diffusers is not None:
        kind = next((k for k in readers if isinstance(vae, getattr(diffusers, k, ()))), None)
    if kind is None:
        raise TypeError(
            f"load() takes fastdec Decoders and diffusers {' / '.join(readers)} modules, got a "
            f"{type(vae).__module__}.{type(vae).__name__}"
        )
    weights_device, weights_dtype = weights_device_and_dtype(vae)
    return readers[kind](vae, None).to(device=device or weights_device, dtype=dtype or weights_dtype)


def _from_path(path: Path, device, dtype) -> Decoder:
    if path.is_dir():
        return _from_folder(path, device, dtype)
    read = _reading(path, lambda: registry.file_reader(path))  # the family whose weights file this is
    if read is not None:
        return _reading(path, lambda: read(path, None)).to(device=device, dtype=dtype)
    if path.suffix in (".safetensors", ".json", ".bin") and (path.parent / "config.json").is_file():
        return _from_folder(path.parent, device, dtype)
    raise ValueError(
        f"{path}: load() reads folders (fastdec save_pretrained, diffusers VAE or pipeline folders) and TAESD .pth "
        "decoder files; for weights next to a config.json pass their folder"
    )


def _from_folder(folder: Path, device, dtype, name: str | None = None) -> Decoder:
    """``name``: the name being loaded, which tells the readers what a folder alone may not (a TAESD variant)."""
    config_path = folder / "config.json"
    if not config_path.is_file() and (folder / "vae" / "config.json").is_file():
        folder, config_path = folder / "vae", folder / "vae" / "config.json"  # a diffusers pipeline folder
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json (nor vae/config.json): expected a folder written by a fastdec decoder's "
            "save_pretrained, a diffusers VAE folder or a diffusers pipeline folder"
        )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON ({error}): re-download or re-save it") from error
    if "class" in config:
        classes = registry.decoder_classes()
        if config["class"] not in classes:
            raise ValueError(f"{config_path}: unknown decoder class {config['class']!r}; known: {sorted(classes)}")
        cls = classes[config["class"]]
        return _reading(folder, lambda: cls.from_pretrained(folder)).to(device=device, dtype=dtype)
    kind, readers = config.get("_class_name"), registry.diffusers_readers()
    if kind in readers:
        return _reading(folder, lambda: readers[kind](folder, name)).to(device=device, dtype=dtype)
    raise ValueError(
        f"{config_path} describes neither a fastdec decoder (a 'class' key) nor a diffusers "
        f"{', '.join(readers)} (_class_name is {kind!r})"
    )


def _reading(source: Path, read):
    """Runs a loader on the CPU; a truncated or corrupt weights file (safetensors or torch.load errors) becomes a
    ValueError that names the file and says to re-download it. Key, shape and config mismatches (ValueError) and
    missing files (FileNotFoundError) pass through unchanged."""
    import pickle

    from safetensors import SafetensorError

    try:
        return read()
    except FileNotFoundError:
        raise
    except (SafetensorError, RuntimeError, EOFError, pickle.UnpicklingError, OSError) as error:
        advice = read_error_advice(error, "the file is truncated or corrupt; re-download it")
        raise ValueError(
            f"could not read the weights in {source} ({type(error).__name__}: {read_error_reason(error)}): {advice}"
        ) from error


def _from_name(name: str, device, dtype) -> Decoder:
    """A name's weights: its files in $FASTDEC_HOME, the folder $FASTDEC_HOME/<name>/, then the Hub."""
    family, weights = registry.named()[name]
    home = fastdec_home()
    for path in (home / file for file in weights.files):
        if path.is_file():
            return _reading(path, lambda path=path: family.read_file(path, name)).to(device=device, dtype=dtype)
    if (home / name / "config.json").is_file():
        return _from_folder(home / name, device, dtype, name)
    published = weights.files[-1] if weights.files else None
    if weights.hub is None:
        raise FileNotFoundError(
            f"{wording.loading(name)}: {published} not found in {home} (FASTDEC_HOME). It is published on GitHub: "
            f"download {weights.github}/raw/main/{published} into {home}/, or pass its path: "
            f"{wording.loading('/path/to/' + published)}"
        )
    also = f" Or put {published} ({weights.github}) in {home}/." if published else ""
    return _from_folder(_hub_folder(name, *weights.hub, home, also), device, dtype, name)


def _from_hub_id(hub_id: str, device, dtype) -> Decoder:
    """owner/repo (a VAE repo, or a pipeline repo whose VAE is in vae/) or owner/repo/subfolder on the Hub."""
    owner, repo, *subfolder = hub_id.split("/")
    repo_id, home = f"{owner}/{repo}", fastdec_home()
    # $FASTDEC_HOME/<hub id>/ first: where the offline error tells the user to put the files (a pipeline's vae/ too).
    for local in (home / hub_id, home / hub_id / "vae"):
        if (local / "config.json").is_file():
            return _from_folder(local, device, dtype, None)
    if subfolder:
        return _from_folder(_hub_folder(hub_id, repo_id, subfolder[0], home), device, dtype, None)
    try:
        folder = _hub_folder(hub_id, repo_id, None, home)
    except FileNotFoundError as at_root:
        try:
            folder = _hub_folder(hub_id, repo_id, "vae", home)  # a pipeline repo
        except FileNotFoundError:
            raise at_root from None
    return _from_folder(folder, device, dtype, None)


def _hub_folder(name: str, repo: str, subfolder: str | None, home: Path, also: str = "") -> Path:
    """Fetches (or finds in the Hub cache) config.json and the safetensors weights; returns their folder. ``also``:
    another place the error can suggest."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as error:
        raise FileNotFoundError(
            f"{wording.loading(name)} needs huggingface_hub to fetch {repo} (pip install huggingface_hub), or put "
            f"config.json and {DIFFUSERS_WEIGHTS} in {home / name}/"
        ) from error
    from huggingface_hub import constants
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError

    # HF_HUB_OFFLINE read now: huggingface_hub reads it once, at import
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    try:
        paths = [
            hf_hub_download(repo, filename, subfolder=subfolder, local_files_only=offline, library_name="fastdec")
            for filename in ("config.json", DIFFUSERS_WEIGHTS)
        ]
    # Not cached, offline, HTTP and gated-repo errors are OSErrors; a file missing from the repo is not (hub >= 1).
    except (OSError, EntryNotFoundError) as error:
        where = f"https://huggingface.co/{repo}" + (f" (folder {subfolder}/)" if subfolder else "")
        gated = (
            " The repo is gated: accept its license on its Hub page and log in (hf auth login)."
            if isinstance(error, GatedRepoError) else ""
        )
        raise FileNotFoundError(
            f"{wording.loading(name)}: the weights are not in {home} (FASTDEC_HOME) nor in the Hugging Face cache, "
            f"and {'HF_HUB_OFFLINE is set' if offline else 'the Hub could not be reached'} "
            f"({type(error).__name__}). Fetch config.json and {DIFFUSERS_WEIGHTS} from {where} into {home / name}/ "
            f"(or run `hf download {repo}` while online, into the Hugging Face cache).{also} Or pass a path: "
            f"{wording.loading('/path/to/folder')}." + gated
        ) from error
    return Path(paths[1]).parent
