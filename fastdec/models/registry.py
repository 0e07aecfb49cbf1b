"""The decoder families: each ``fastdec/models/<family>.py`` registers a ``Family`` here, where it is defined, and
every reader (``fastdec.load`` and ``fastdec.decode``, validate, the CLI, train) looks families up here.

A leaf: it imports no other fastdec module. The families are found by importing every module of fastdec.models on
the first lookup, so adding a family is adding its module (and its tests); nothing else lists families.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Weights:
    """Where the trained weights of a name are: files in $FASTDEC_HOME first (read by the family's ``read_file``),
    then a folder ``$FASTDEC_HOME/<name>/``, then the Hub. ``github``: the repository that publishes the files (the
    last of ``files`` is the published one), for names that are not on the Hub or as a second source."""

    hub: tuple[str, str | None] | None = None  # (repo, subfolder) of a diffusers VAE folder on the Hub
    files: tuple[str, ...] = ()
    github: str | None = None
    about: str = ""  # the latent space, where the name alone does not say it (in error messages)


@dataclass(frozen=True)
class Family:
    """What ``fastdec.load`` and ``fastdec.decode`` need to know of a family.

    ``diffusers``: diffusers VAE class name -> ``read(module_or_folder, name)``, a Decoder (``name``: the name
    being loaded, None for a module or a path). ``weights_file(path)`` says whether a file is this family's
    weights and ``read_file(path, name)`` reads it. ``presets``: architectures with random weights, name ->
    (class, config). ``vae_keys``: diffusers VAE class -> (a decoder tensor's name -> that VAE's name for it),
    where they differ (``swap_vae`` shares the VAE's tensors by name). ``image_defaults`` / ``video_defaults``:
    the name ``fastdec.decode`` picks for latents of that many channels when given no decoder.
    """

    name: str
    order: int  # listings (names, diffusers classes, file sniffing) go by order, then name
    classes: tuple[type, ...] = ()  # the Decoder classes its save_pretrained folders name ("class")
    names: Mapping[str, Weights] = field(default_factory=dict)
    aliases: Mapping[str, str] = field(default_factory=dict)
    diffusers: Mapping[str, Callable[[Any, str | None], Any]] = field(default_factory=dict)
    weights_file: Callable[[Path], bool] | None = None
    read_file: Callable[[Path, str | None], Any] | None = None
    presets: Mapping[str, tuple[type, dict]] = field(default_factory=dict)
    vae_keys: Mapping[str, Callable[[str], str]] = field(default_factory=dict)
    image_defaults: Mapping[int, str] = field(default_factory=dict)
    video_defaults: Mapping[int, str] = field(default_factory=dict)


_REGISTERED: dict[str, Family] = {}
_discovered = False


def register(family: Family) -> Family:
    """Called once by each family module; a name (or alias) claimed by two families is an error."""
    taken = {name for other in _REGISTERED.values() if other.name != family.name
             for name in (*other.names, *other.aliases, *other.presets)}
    clashes = sorted(taken & {*family.names, *family.aliases, *family.presets})
    if clashes:
        raise ImportError(f"decoder family {family.name!r} registers names {clashes} that another family has")
    _REGISTERED[family.name] = family
    return family


def families() -> list[Family]:
    """Every family, in listing order (the modules of fastdec.models are imported on the first call)."""
    global _discovered
    if not _discovered:
        package = __name__.rpartition(".")[0]
        for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
            importlib.import_module(f"{package}.{module.name}")
        _discovered = True
    return sorted(_REGISTERED.values(), key=lambda family: (family.order, family.name))


def named() -> dict[str, tuple[Family, Weights]]:
    """Every name with trained weights -> (its family, where its weights are)."""
    return {name: (family, weights) for family in families() for name, weights in family.names.items()}


def aliases() -> dict[str, str]:
    """Other spellings of names (sd1 -> sd)."""
    return {alias: name for family in families() for alias, name in family.aliases.items()}


def presets() -> dict[str, tuple[type, dict]]:
    """Random-weight architectures: name -> (Decoder class, config)."""
    return {name: preset for family in families() for name, preset in family.presets.items()}


def diffusers_readers() -> dict[str, Callable[[Any, str | None], Any]]:
    """diffusers VAE class name -> the reader that makes a fastdec decoder of it."""
    return {kind: read for family in families() for kind, read in family.diffusers.items()}


def vae_key_maps() -> dict[str, Callable[[str], str]]:
    """diffusers VAE class name -> (decoder tensor name -> the VAE's), for the classes whose names differ."""
    return {kind: rename for family in families() for kind, rename in family.vae_keys.items()}


def decoder_classes() -> dict[str, type]:
    """Class name -> Decoder class, for the "class" key of save_pretrained folders."""
    return {cls.__name__: cls for family in families() for cls in family.classes}


def file_reader(path: Path) -> Callable[[Path, str | None], Any] | None:
    """The ``read_file`` of the first family whose ``weights_file`` claims ``path``, else None."""
    for family in families():
        if family.weights_file is not None and family.weights_file(path):
            return family.read_file
    return None


def default_decoders(latent_ndim: int = 4) -> dict[int, str]:
    """What ``fastdec.decode`` picks without a decoder: latent channels -> name, for image (4) or video (5) latents."""
    return {channels: name for family in families()
            for channels, name in (family.video_defaults if latent_ndim == 5 else family.image_defaults).items()}
