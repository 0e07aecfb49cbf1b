"""Reading latents from files: the one reader behind ``fastdec decode`` and ``fastdec batch``."""

from __future__ import annotations

from pathlib import Path

import torch

LATENT_SUFFIXES = (".safetensors", ".pt", ".pth", ".npy", ".npz")


def read_latents(path: Path, key: str | None = None, several: str = "pick one with --key") -> torch.Tensor:
    """A latent tensor from .safetensors, .pt/.pth (torch.load, weights only), .npy or .npz; ``key`` picks one
    tensor of a file holding several; ``several``: what to do about a file holding several, in the caller's words
    (``fastdec decode`` has --key, ``fastdec batch`` has not)."""
    if path.is_dir():
        raise ValueError(f"{path} is a directory: pass a latents file in it (.safetensors, .pt, .npy or .npz)")
    if not path.is_file():
        raise FileNotFoundError(f"latents file {path} not found")
    import pickle

    from safetensors import SafetensorError

    suffix = path.suffix.lower()
    if suffix not in LATENT_SUFFIXES:
        raise ValueError(f"{path}: unsupported latents file type {suffix!r}; use .safetensors, .pt, .npy or .npz")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            content = load_file(str(path))
        elif suffix in (".pt", ".pth"):
            content = torch.load(path, map_location="cpu", weights_only=True)
        else:
            import numpy as np

            content = np.load(path, allow_pickle=False)
            content = {name: content[name] for name in content.files} if suffix == ".npz" else content
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as error:
        from fastdec.read_errors import REFUSED_PICKLE_ADVICE, is_refused_pickle, read_error_reason

        advice = f": {REFUSED_PICKLE_ADVICE}" if is_refused_pickle(error) else ""
        raise ValueError(
            f"could not read latents from {path} ({type(error).__name__}: {read_error_reason(error)}){advice}"
        ) from error
    if isinstance(content, dict):
        tensors = {name: value for name, value in content.items() if hasattr(value, "shape")}
        if not tensors:
            keys = sorted(str(name) for name in content)
            raise ValueError(f"{path} holds a dict without a tensor at its top level (keys: {keys[:10]}"
                             f"{', ...' if len(keys) > 10 else ''}): save the latents tensor itself, or a flat dict "
                             "of tensors")
        if key is not None:
            if key not in tensors:
                raise ValueError(f"{path} has no tensor {key!r}; its tensors: {sorted(tensors)}")
            content = tensors[key]
        elif len(tensors) == 1:
            content = next(iter(tensors.values()))
        else:
            raise ValueError(f"{path} holds {len(tensors)} tensors {sorted(tensors)}: {several}")
    elif key is not None:
        raise ValueError(f"{path} holds a single tensor, not a dict: drop --key")
    if not isinstance(content, torch.Tensor):
        import numpy as np

        if not isinstance(content, np.ndarray):
            raise ValueError(f"{path} holds a {type(content).__name__}, not a tensor")
        content = torch.from_numpy(content)
    return content
