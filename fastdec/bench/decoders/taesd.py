"""taesd, taef2, tae-192: madebyollin's tiny decoders, against diffusers' AutoencoderTiny where it has them."""

from __future__ import annotations

from torch import nn

from fastdec.bench.spec import BenchDecoder, Goal, empty_diffusers_module
from fastdec.models.base import Decoder


def twin(model: Decoder) -> tuple[nn.Module | None, str | None]:
    """diffusers' AutoencoderTiny with ``model``'s weights, or (None, why) for the GroupNorm mid-block variant."""
    import diffusers

    config = model.config
    if config["midblock_gn"]:
        return None, "diffusers' AutoencoderTiny has no GroupNorm mid-block branch"
    if not isinstance(config["width"], int):
        return None, f"diffusers' AutoencoderTiny has one width for all stages, this decoder {config['width']}"
    blocks = tuple(config["blocks"])
    tiny = empty_diffusers_module(
        diffusers.AutoencoderTiny, latent_channels=config["latent_channels"],
        decoder_block_out_channels=(config["width"],) * len(blocks), num_decoder_blocks=blocks,
    )
    # madebyollin's index i (fastdec's keys) is diffusers' i - 1: DecoderTiny clamps in forward, not in a layer.
    shifted = {f"{int(key.split('.', 1)[0]) - 1}.{key.split('.', 1)[1]}": value
               for key, value in model.state_dict().items()}
    tiny.decoder.layers.load_state_dict(shifted, strict=True)
    return tiny, None


def _taesd(name: str, **config):
    def build() -> Decoder:
        from fastdec.models.taesd import TAESDDecoder

        return TAESDDecoder(name, **config)
    return build


ENTRIES = (
    BenchDecoder("taesd", _taesd("taesd"), "TAESDDecoder", twin, lightweight=True, order=20, quick=True,
                 kind="tiny image decoder",
                 goals=(Goal("TAESD decode 512x512", "taesd", "fastdec", 512, 1, "median_ms", 0.8,
                             "diffusers eager 2.54 ms (H200)"),)),
    # taef2 reads FLUX.2's 32-channel latents, so it replaces no SD VAE.
    BenchDecoder("taef2", _taesd("taef2"), "TAESDDecoder", order=20, kind="tiny image decoder",
                 no_twin_reason="no diffusers implementation (AutoencoderTiny lacks TAEF2's GroupNorm mid-block "
                                "branch)"),
    BenchDecoder("tae-192", _taesd("tae-192", latent_channels=4), "TAESDDecoder", twin, lightweight=True, order=20,
                 kind="paper decoder (TAE-192)"),
)
