"""Writing decoded video: ``fastdec.save_video(frames, path, fps=...)`` -> an H.264 mp4 through PyAV.

PyAV (``pip install av``) is an optional dependency: only this module needs it, and it says so when it is missing.
Frames come as a tensor or, to keep memory flat for long clips, as an iterable of chunks (what a TAEHVStream's
``push`` returns), each written as soon as it arrives.
"""

from __future__ import annotations

from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import torch
from torch import Tensor

from fastdec.pixels import to_uint8_hwc


def to_uint8_frames(frames: Tensor) -> Tensor:
    """Frames (T, 3, H, W) float in [0, 1] or (T, H, W, 3) uint8 (a leading batch of 1 is allowed) -> (T, H, W, 3)
    uint8 on the CPU. Float values outside [0, 1] or NaN raise rather than being clipped."""
    if not isinstance(frames, Tensor):
        raise TypeError(f"frames must be a torch.Tensor, got a {type(frames).__name__}")
    if frames.dim() == 5:
        if frames.shape[0] != 1:
            raise ValueError(
                f"frames of shape {tuple(frames.shape)} hold {frames.shape[0]} videos; save_video writes one: pass "
                "frames[i] for each"
            )
        frames = frames[0]
    if frames.dtype == torch.uint8:
        if frames.dim() != 4 or frames.shape[-1] != 3:
            raise ValueError(f"uint8 frames must be (T, H, W, 3), got {tuple(frames.shape)}")
        return frames.cpu().contiguous()
    if not frames.is_floating_point() or frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(
            f"frames must be (T, 3, H, W) floats in [0, 1] (what fastdec.decode returns) or (T, H, W, 3) uint8, got "
            f"{frames.dtype} {tuple(frames.shape)}"
        )
    if frames.numel() and not (bool(torch.isfinite(frames).all()) and frames.min() >= 0 and frames.max() <= 1):
        raise ValueError("float frames must lie in [0, 1] and be finite (fastdec.decode's output does)")
    return to_uint8_hwc(frames).cpu()


def save_video(
    frames: Tensor | Iterable[Tensor],
    path: str | Path,
    fps: float | Fraction = 16,
    crf: int = 18,
) -> Path:
    """Writes frames as an H.264 mp4 (yuv420p, ``crf``: lower is higher quality) at ``fps`` and returns the path.

    ``frames``: (T, 3, H, W) floats in [0, 1] or (T, H, W, 3) uint8, with an optional batch axis of 1 (what
    ``fastdec.decode`` returns for one video), or an iterable of such chunks, written as they come. H and W must be
    even (H.264 4:2:0).
    """
    try:
        import av
    except ImportError as error:
        raise ImportError(
            "fastdec.save_video writes mp4 through PyAV, which is not installed: pip install av "
            "(or save the frames yourself: fastdec.decode(latents, output='uint8') gives (B, T, H, W, 3) uint8)"
        ) from error
    if isinstance(fps, bool) or not isinstance(fps, (int, float, Fraction)) or not fps > 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    rate = Fraction(fps).limit_denominator(1001)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    chunks = [frames] if isinstance(frames, Tensor) else frames
    try:
        _write(av, path, chunks, rate, crf)
    except BaseException:
        path.unlink(missing_ok=True)  # no half-written video left behind
        raise
    return path


def _write(av, path: Path, chunks: Iterable[Tensor], rate: Fraction, crf: int) -> None:
    written, stream = 0, None
    with av.open(str(path), mode="w") as container:
        for chunk in chunks:
            pixels = to_uint8_frames(chunk)
            if stream is None:
                height, width = pixels.shape[1:3]
                if height % 2 or width % 2:
                    raise ValueError(f"H.264 (yuv420p) needs an even frame size, got {height}x{width}: crop or pad")
                stream = container.add_stream("libx264", rate=rate)
                stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
                stream.options = {"crf": str(crf)}
            elif tuple(pixels.shape[1:3]) != (stream.height, stream.width):
                raise ValueError(f"frame size changed mid-video: {tuple(pixels.shape[1:3])} after "
                                 f"{(stream.height, stream.width)}")
            for array in pixels.numpy():
                container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
            written += pixels.shape[0]
        if stream is None or written == 0:
            raise ValueError("no frames to write: save_video needs at least one frame")
        container.mux(stream.encode())  # flush the encoder
