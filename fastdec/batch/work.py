"""The work both engines do on a unit, in one place: load the decoder, decode a unit to uint8 pixels (through
``fastdec.decode``, as ``fastdec decode`` does), encode each image to file bytes."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np
import torch

from fastdec.batch.reader import Unit
from fastdec.models.base import Decoder
from fastdec.validate import check_latents

# --format name -> (PIL format, file suffix, takes a quality)
FORMATS = {"png": ("PNG", ".png", False), "webp": ("WEBP", ".webp", True), "jpeg": ("JPEG", ".jpg", True)}
VIDEO_SUFFIX = ".mp4"


@dataclass(frozen=True)
class OutputFormat:
    """How images are written: png (lossless, PIL defaults: the bytes `fastdec decode` writes), webp or jpeg at
    ``quality`` (1-100; PIL's default when None)."""

    name: str = "png"
    quality: int | None = None
    fps: float = 16.0  # video latents: mp4 through fastdec.save_video, as `fastdec decode` writes them

    def __post_init__(self) -> None:
        if self.name not in FORMATS:
            raise ValueError(f"unknown image format {self.name!r}: choose one of {sorted(FORMATS)}")
        if self.quality is not None:
            if not FORMATS[self.name][2]:
                raise ValueError(f"--quality applies to webp and jpeg; {self.name} is lossless: drop --quality")
            if not 1 <= self.quality <= 100:
                raise ValueError(f"--quality {self.quality} is out of range: use 1 (smallest) to 100 (best)")
        if not self.fps > 0:
            raise ValueError(f"--fps must be positive, got {self.fps}")

    @property
    def suffix(self) -> str:
        return FORMATS[self.name][1]

    def suffix_of(self, pixels: np.ndarray) -> str:
        return VIDEO_SUFFIX if pixels.ndim == 4 else self.suffix

    def encode(self, pixels: np.ndarray) -> bytes:
        """(H, W, 3) uint8 -> the bytes of the image file; (T, H, W, 3) uint8 frames -> the bytes of an mp4."""
        if pixels.ndim == 4:
            return _encode_video(pixels, self.fps)
        from PIL import Image

        options = {} if self.quality is None else {"quality": self.quality}
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=FORMATS[self.name][0], **options)
        return buffer.getvalue()


def _encode_video(frames: np.ndarray, fps: float) -> bytes:
    """fastdec.save_video writes to a path: encode into a temporary file and return its bytes."""
    import os
    import tempfile

    from fastdec.video import save_video

    handle, name = tempfile.mkstemp(suffix=VIDEO_SUFFIX, prefix="fastdec-batch-")
    os.close(handle)
    try:
        save_video(torch.from_numpy(frames), name, fps=fps)
        with open(name, "rb") as file:
            return file.read()
    finally:
        os.unlink(name)


def resolve_device(name: str | torch.device | None) -> torch.device:
    """--device: None means cuda when there is a GPU, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r} is not a device ({error}); use cpu, cuda or cuda:<index>") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def job_identity(decoder: Decoder, output_format: OutputFormat, batch_size: int) -> str:
    """What makes a job's bytes, as a hash: the decoder's class, config and weights (values, dtypes, shapes), the
    output settings and the batch size (the batch an item is decoded in may change its last bit). The same weights
    given by another path (absolute, relative, a copy) are the same job; other weights under the same file name are
    not."""
    digest = hashlib.sha256()
    digest.update(json.dumps([type(decoder).__name__, getattr(decoder, "config", {}),
                              dataclasses.asdict(output_format), batch_size], sort_keys=True, default=str).encode())
    for key, tensor in sorted(decoder.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def load_decoder(decoder: str | Decoder, device: torch.device, dtype: torch.dtype | None) -> Decoder:
    """The decoder of a job, as `fastdec decode` loads it: a name or path through fastdec.load, on ``device`` in
    ``dtype`` (default: fastdec's default for the device); a Decoder is copied to the device."""
    import copy

    import fastdec
    from fastdec.api import default_dtype

    dtype = dtype or default_dtype(device)
    if isinstance(decoder, Decoder):
        return copy.deepcopy(decoder).to(device=device, dtype=dtype).eval()
    return fastdec.load(decoder, device=device, dtype=dtype)


def decode_unit(decoder: Decoder, unit: Unit, device: torch.device) -> tuple[list[str], np.ndarray | None,
                                                                              list[tuple[str, str]]]:
    """(ids decoded, their pixels (B, H, W, 3) uint8, or frames (B, T, H, W, 3) for video latents, failures
    (id, reason)). Latents that fail the decoder's check (channels, rank, NaN/Inf, ...) fail one by one; the rest of
    the unit still decodes."""
    import fastdec

    assert unit.latents is not None
    latents = unit.latents.to(device)
    ids, failures = list(unit.ids), []
    try:
        check_latents(latents, decoder)
    except (TypeError, ValueError) as unit_error:
        keep = []
        for index, item_id in enumerate(unit.ids):
            try:
                check_latents(latents[index:index + 1], decoder)
                keep.append(index)
            except (TypeError, ValueError) as error:
                failures.append((item_id, str(error)))
        if not failures:  # the batch failed as a whole only: report that for every item
            return [], None, [(item_id, str(unit_error)) for item_id in unit.ids]
        ids, latents = [unit.ids[index] for index in keep], latents[keep]
    if not ids:
        return [], None, failures
    try:
        pixels = fastdec.decode(latents, decoder, output="uint8", check_finite=False)  # checked above
    except Exception as error:  # noqa: BLE001 - a failed batch (out of memory, ...) is reported, the job goes on
        return [], None, failures + [(item_id, f"decode failed: {type(error).__name__}: {error}") for item_id in ids]
    return ids, pixels.cpu().numpy(), failures
