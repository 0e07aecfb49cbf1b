"""Decoded images as 8-bit pixels: the one conversion fastdec.decode(output="uint8"/"pil"), the mp4 writer and the
parallel CLI share."""

from __future__ import annotations

import torch
from torch import Tensor


def to_uint8_hwc(images: Tensor) -> Tensor:
    """Images (..., 3, H, W) in [0, 1], any float dtype -> (..., H, W, 3) uint8, round(255 * x), on their device."""
    return (images.float() * 255).round().to(torch.uint8).movedim(-3, -1).contiguous()
