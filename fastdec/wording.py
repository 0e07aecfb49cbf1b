"""Advice in the caller's words. A message raised deep in the library tells a Python caller what to pass
(``decoder='taef1'``, ``check_finite=False``) and a `fastdec` command-line user what to type (``--decoder taef1``,
``FASTDEC_CHECK_FINITE=0``): the CLI sets ``cli_words`` for the length of a command, and the few places that give
advice ask this module for the words. A process-wide switch (not a context variable) because the batch engine's
threads raise these messages too."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

_cli = [False]


@contextmanager
def cli_words(enabled: bool = True) -> Iterator[None]:
    """Within this block, advice is worded for the `fastdec` command line."""
    previous, _cli[0] = _cli[0], enabled
    try:
        yield
    finally:
        _cli[0] = previous


def speaking_cli() -> bool:
    return _cli[0]


def decoder_choice(name: str | None = None) -> str:
    """How to pass a decoder: ``decoder='taef1'`` / ``--decoder taef1`` (a placeholder without a name)."""
    if speaking_cli():
        return f"--decoder {name or '<a name or path for this latent space>'}"
    return f"decoder={name!r}" if name else "decoder=<a name, path or Decoder for this latent space>"


def loading(name: str) -> str:
    """How the caller asked for a decoder by name or path: ``fastdec.load('taef1')`` / ``--decoder taef1``."""
    return f"--decoder {name}" if speaking_cli() else f"fastdec.load({name!r})"


def finite_check_off(env_name: str) -> str:
    """How to turn the NaN/Inf check of the latents off."""
    return f"the environment variable {env_name}=0" if speaking_cli() else f"check_finite=False or {env_name}=0"


def float_cast() -> str:
    """How to turn integer latents into floating point ones."""
    return "save them as float32, float16 or bfloat16" if speaking_cli() else "cast them, e.g. latents.float()"


def frames_as_images() -> str:
    """How to decode video latents (B, C, T, h, w) frame by frame with an image decoder."""
    if speaking_cli():
        return "save the frames as image latents (B*T, C, h, w)"
    return "decode the frames as images: latents.transpose(1, 2).flatten(0, 1)"


def tile_size_option() -> str:
    return "--tile-size" if speaking_cli() else "tile_size"
