"""Training data: image folders (read robustly), the frozen encoder's latents of each image, encoded once and cached,
and the random crops a training step draws.

Each image is cropped (centred) to a multiple of the encoder's downscale and encoded whole, once, and once more
mirrored (so a flipped crop's latents are the encoder's own, not the mirror of them). A training crop is then a window
of the latents aligned to the latent grid and the matching window of pixels (and of the teacher's decode): cropping
cached latents costs nothing, where encoding each crop would cost an encoder pass per step.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fastdec.files import write_atomically
from fastdec.latents_io import read_latents

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
CACHE_FORMAT = 1
log = logging.getLogger("fastdec.train")


def list_images(folder: str | Path) -> list[Path]:
    """Every jpg/jpeg/png/webp file under ``folder`` (recursive, sorted); an error if there is none."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist or is not a folder")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(
            f"no images in {folder}: expected {', '.join(IMAGE_SUFFIXES)} files (searched recursively)"
        )
    return paths


def read_rgb(path: Path) -> Tensor:
    """An image file as float RGB (3, H, W) in [0, 1]: grayscale is repeated to 3 channels, alpha is dropped
    (the colour as stored, not composited), 16-bit and 32-bit integer images are scaled by their range."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(image, dtype=np.float64)
            array = array / (65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0)
            array = np.repeat(array[..., None], 3, axis=2)
        elif image.mode == "F":
            raise ValueError(f"{path}: floating-point images (mode F) have no fixed range; save it as 8/16-bit")
        else:
            array = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float().clamp_(0, 1)


def centre_crop(image: Tensor, multiple: int) -> Tensor:
    """The centred crop of (.., H, W) to the largest multiple of ``multiple`` in each dimension."""
    height, width = image.shape[-2:]
    h, w = height // multiple * multiple, width // multiple * multiple
    top, left = (height - h) // 2, (width - w) // 2
    return image[..., top:top + h, left:left + w]


@dataclass
class Sample:
    """One cached image: uint8 pixels (3, H, W), latents (C, H/f, W/f) of the image and of its mirror, and the
    teacher's uint8 decodes of both (None without a teacher)."""

    name: str
    image: Tensor
    latents: Tensor
    latents_flipped: Tensor
    teacher: Tensor | None = None
    teacher_flipped: Tensor | None = None

    def to(self, device: torch.device) -> Sample:
        """The sample with its tensors on ``device`` (on a GPU: crops are cut there, no copy per step)."""
        return Sample(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in vars(self).items()})


@dataclass
class Skips:
    """Files left out of a data set, with why; logged and recorded in the model card."""

    unreadable: list[str] = field(default_factory=list)
    too_small: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        return {"unreadable": len(self.unreadable), "smaller_than_crop": len(self.too_small)}


def _to_uint8(images: Tensor) -> Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def _cache_key(path: Path, *parts: str) -> str:
    stat = path.stat()
    text = "|".join([str(CACHE_FORMAT), str(path.resolve()), str(stat.st_size), str(stat.st_mtime_ns), *parts])
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def _save(file: Path, tensors: dict[str, Tensor]) -> None:
    from safetensors.torch import save_file

    write_atomically(file, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)))


def _teacher_decodes(teacher: Callable[[Tensor], Tensor], tensors: dict[str, Tensor], path: Path) -> dict:
    """The teacher's uint8 decodes of an image's latents (and of its mirror's)."""
    flipped = "latents_flipped" in tensors
    pair = torch.stack([tensors["latents"], tensors["latents_flipped"]]) if flipped else tensors["latents"][None]
    with torch.no_grad():
        decoded = _to_uint8(teacher(pair).float())
    if decoded.shape[-2:] != tensors["image"].shape[-2:]:
        raise ValueError(
            f"the teacher decodes {path}'s latents to {tuple(decoded.shape[-2:])} pixels, the image has "
            f"{tuple(tensors['image'].shape[-2:])}: the teacher belongs to another latent space"
        )
    return {"teacher": decoded[0], **({"teacher_flipped": decoded[1]} if flipped else {})}


def load_samples(
    folder: str | Path,
    encode: Callable[[Tensor], Tensor],
    downscale: int,
    min_size: int,
    encoder_id: str,
    teacher: Callable[[Tensor], Tensor] | None = None,
    teacher_id: str = "",
    cache_dir: str | Path | None = None,
    latents_folder: str | Path | None = None,
    flips: bool = True,
    limit: int | None = None,
) -> tuple[list[Sample], Skips]:
    """Every usable image of ``folder`` with its latents (and teacher decodes), from ``cache_dir`` when cached there.

    ``encode``: RGB (1, 3, H, W) in [0, 1] -> latents (1, C, H/downscale, W/downscale). ``latents_folder``: precomputed
    latents instead, ``<image stem>.safetensors`` (one tensor) or ``.pt`` per image at the same relative path, for
    the image as stored cropped to a multiple of ``downscale`` (no mirrored latents: flips are then off).
    ``flips``: also encode (and teacher-decode) each image mirrored, for flip augmentation; twice the encoding cost.
    Unreadable files and images smaller than ``min_size`` are skipped, counted and logged; no usable image left
    is an error. ``limit``: stop after that many usable images (the first, in sorted order): nothing more is encoded.
    """
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    paths, skips, samples = list_images(folder), Skips(), []
    cache = Path(cache_dir).expanduser() if cache_dir else None
    for index, path in enumerate(paths):
        # The latents and the teacher's decodes are cached apart, so the stages of a distillation (with a teacher,
        # then without) encode every image once.
        cached = teacher_cached = None
        if cache is not None and latents_folder is None:
            cached = cache / f"{_cache_key(path, encoder_id, '', str(downscale), str(flips))}.safetensors"
            key = _cache_key(path, encoder_id, teacher_id, str(downscale), str(flips))
            teacher_cached = cache / f"{key}.teacher.safetensors" if teacher is not None else None
        if cached is not None and cached.is_file():
            tensors = load_file(str(cached))
        else:
            try:
                image = centre_crop(read_rgb(path), downscale)
            except Exception as error:  # PIL raises many types for truncated / non-image files
                skips.unreadable.append(str(path))
                log.warning("skipping unreadable image %s (%s: %s)", path, type(error).__name__, error)
                continue
            if min(image.shape[-2:]) < min_size:
                skips.too_small.append(str(path))
                log.warning("skipping %s: %dx%d is smaller than the %d px crop", path, *image.shape[-2:], min_size)
                continue
            tensors = {"image": _to_uint8(image)}
            with torch.no_grad():
                if latents_folder is not None:
                    tensors["latents"] = _read_latents_for(path, folder, Path(latents_folder))
                else:
                    pair = encode(torch.stack([image, image.flip(-1)]) if flips else image[None])
                    tensors["latents"] = pair[0].float()
                    if flips:
                        tensors["latents_flipped"] = pair[1].float()
            if cached is not None:
                _save(cached, tensors)
        if teacher is not None and teacher_cached is not None and teacher_cached.is_file():
            tensors.update(load_file(str(teacher_cached)))
        elif teacher is not None:
            decodes = _teacher_decodes(teacher, tensors, path)
            tensors.update(decodes)
            if teacher_cached is not None:
                _save(teacher_cached, decodes)
        if min(tensors["image"].shape[-2:]) < min_size:
            skips.too_small.append(str(path))
            continue
        latents = tensors["latents"]
        if tuple(latents.shape[-2:]) != tuple(s // downscale for s in tensors["image"].shape[-2:]):
            raise ValueError(
                f"latents of {path} are {tuple(latents.shape)}, expected (C, H/{downscale}, W/{downscale}) for the "
                f"{tuple(tensors['image'].shape[-2:])} image"
            )
        samples.append(Sample(
            path.relative_to(folder).as_posix(), tensors["image"], latents, tensors.get("latents_flipped"),
            tensors.get("teacher"), tensors.get("teacher_flipped"),
        ))
        if (index + 1) % 25 == 0:
            log.info("latents of %d/%d images ready", index + 1, len(paths))
        if limit is not None and len(samples) >= limit:
            break
    if skips.unreadable or skips.too_small:
        log.warning("skipped %d unreadable image(s) and %d smaller than %d px in %s", len(skips.unreadable),
                    len(skips.too_small), min_size, folder)
    if not samples:
        raise ValueError(
            f"no usable image in {folder}: {len(skips.unreadable)} unreadable, {len(skips.too_small)} smaller than the "
            f"{min_size} px crop; use a smaller --crop or other images"
        )
    return samples, skips


def _read_latents_for(path: Path, folder: Path, latents_folder: Path) -> Tensor:
    relative = path.relative_to(folder).with_suffix("")
    candidates = [latents_folder / f"{relative}{suffix}" for suffix in (".safetensors", ".pt", ".pth")]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise FileNotFoundError(f"no precomputed latents for {path}: expected one of {[str(c) for c in candidates]}")
    content = read_latents(found, several="store one latent tensor a file")
    if content.dim() not in (3, 4) or (content.dim() == 4 and len(content) != 1):
        raise ValueError(f"{found} must hold one latent tensor (C, h, w), got {content.shape}")
    return content.reshape(content.shape[-3:]).float()


def draw_batch(
    samples: Sequence[Sample], batch: int, crop: int, downscale: int, generator: torch.Generator, flips: bool,
    distill: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``batch`` random crops (latents, images, teacher images) aligned to the latent grid, drawn from
    ``generator`` only, so that a step's batch is a function of the seed and the step (exact resume)."""
    cell = crop // downscale
    latents, images, teachers = [], [], []
    for _ in range(batch):
        sample = samples[int(torch.randint(len(samples), (1,), generator=generator))]
        flip = flips and bool(torch.randint(2, (1,), generator=generator))
        h, w = sample.latents.shape[-2:]
        top = int(torch.randint(h - cell + 1, (1,), generator=generator))
        left = int(torch.randint(w - cell + 1, (1,), generator=generator))
        z = sample.latents_flipped if flip else sample.latents
        image = sample.image.flip(-1) if flip else sample.image
        teacher = sample.teacher_flipped if flip else sample.teacher
        window = (slice(None), slice(top * downscale, (top + cell) * downscale),
                  slice(left * downscale, (left + cell) * downscale))
        latents.append(z[:, top:top + cell, left:left + cell])
        images.append(image[window])
        if distill:
            teachers.append(teacher[window])
    as_float = [torch.stack(images).float() / 255, torch.stack(teachers).float() / 255 if distill else None]
    return torch.stack(latents).float(), as_float[0], as_float[1]
