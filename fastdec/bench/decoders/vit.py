"""vit-s, vit-b: the paper's ViT decoder presets (no diffusers implementation; 2x2-latent patches)."""

from __future__ import annotations

from fastdec.bench.spec import BenchDecoder
from fastdec.models.base import Decoder


def _preset(name: str):
    def build() -> Decoder:
        from fastdec.models import vit

        cls, config = vit.PRESETS[name]
        return cls(**config)
    return build


ENTRIES = tuple(BenchDecoder(name, _preset(name), "ViTDecoder", side_multiple=16,
                             lightweight=True, order=40, kind="paper decoder (ViT)")
                for name in ("vit-s", "vit-b"))
