"""taew2_1 (TAEHV, Wan 2.1 latents): whole-clip and streaming, at two clip lengths, against diffusers'
AutoencoderKLWan eager, the decoder a Wan user runs otherwise (a different, much larger model: timed on the same
latents, no fidelity comparison). Video latents are (B, 16, T, side/8, side/8); rows show T in their latent column.

Peak memory against frame count: whole-clip memory grows with T, streaming (one latent frame per step, the state
carried) stays flat.
"""

from __future__ import annotations

from torch import Tensor, nn

from fastdec.bench.spec import BenchDecoder, video_latent_shape
from fastdec.models.base import Decoder

SHORT, LONG = 3, 12  # latent frames: 9 and 45 decoded frames


def _taew2_1(chunk_frames: int):
    def build() -> Decoder:
        from fastdec.models.taehv import TAEHVDecoder

        model = TAEHVDecoder("taew2_1")
        model.chunk_frames = chunk_frames  # >= T: the whole clip at once; 1: streaming
        return model
    return build


def wan_twin(model: Decoder) -> tuple[nn.Module | None, str | None]:
    """diffusers' AutoencoderKLWan (Wan 2.1's configuration), randomly initialised: speed does not depend on it."""
    import diffusers

    return diffusers.AutoencoderKLWan().eval(), None


def wan_decode(twin: nn.Module, latents: Tensor) -> Tensor:
    """(B, 3, T, H, W) in [-1, 1] -> (B, T, 3, H, W), fastdec's layout."""
    return twin.decode(latents, return_dict=False)[0].transpose(1, 2)


def _entry(name: str, frames: int, chunk_frames: int, twin: bool = False, quick: bool = False) -> BenchDecoder:
    other = {"twin": wan_twin, "twin_decode": wan_decode, "twin_is_other_model": True} if twin else {
        "no_twin_reason": "the AutoencoderKLWan comparison is on the taew2_1 row (3 latent frames)"}
    return BenchDecoder(name, _taew2_1(chunk_frames), "TAEHVDecoder",
                        latent_shape=video_latent_shape(lambda side: frames), order=60, quick=quick,
                        kind="tiny video decoder", **other)


ENTRIES = (
    _entry("taew2_1", SHORT, SHORT, twin=True, quick=True),
    _entry("taew2_1-stream", SHORT, 1),
    _entry("taew2_1-t12", LONG, LONG),
    _entry("taew2_1-stream-t12", LONG, 1),
)
