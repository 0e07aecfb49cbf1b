"""efficientvit, efficientvit-attn: the paper's EfficientViT decoder presets (no diffusers implementation)."""

from __future__ import annotations

from fastdec.bench.spec import BenchDecoder
from fastdec.models.base import Decoder


def _preset(name: str):
    def build() -> Decoder:
        from fastdec.models import efficientvit

        cls, config = efficientvit.PRESETS[name]
        return cls(**config)
    return build


ENTRIES = tuple(BenchDecoder(name, _preset(name), "EfficientViTDecoder", lightweight=True, order=30)
                for name in ("efficientvit", "efficientvit-attn"))
