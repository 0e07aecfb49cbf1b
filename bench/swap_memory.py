"""Weight memory of a pipeline with fastdec swapped in, per diffusers VAE class, at the real VAEs' sizes (issue 20).

For each class a VAE of its published configuration is built with random weights (nothing is downloaded), put in a
one-component diffusers pipeline, and ``fastdec.diffusers.weight_bytes`` (parameters and buffers, each storage
once) is read unswapped, swapped with the exact decoder (``fastdec.load(vae)``) and swapped with a tiny one.
Prints the README's table (markdown). CPU, fp32; about a minute and a few GB of memory.

    PYTHONPATH=. python bench/swap_memory.py
"""

from __future__ import annotations

import gc

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    AutoencoderKLQwenImage,
    AutoencoderKLTemporalDecoder,
    AutoencoderKLWan,
    AutoencoderTiny,
    DiffusionPipeline,
)
from diffusers.models.autoencoders.autoencoder_kl_flux2 import AutoencoderKLFlux2

import fastdec
from fastdec.diffusers import swap_vae, unswap_vae, weight_bytes
from fastdec.models.tae_temporal import TAETemporalDecoder
from fastdec.models.taehv import TAEHVDecoder
from fastdec.models.taesd import TAESDDecoder

SD = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
          up_block_types=("UpDecoderBlock2D",) * 4)
# (row label, VAE factory, tiny decoder factory or None)
CASES = [
    ("AutoencoderKL (SD 1.x/2.x, SDXL)", lambda: AutoencoderKL(**SD, sample_size=512), lambda: TAESDDecoder("taesd")),
    ("AutoencoderKL, latents_mean/std (Playground v2.5)",
     lambda: AutoencoderKL(**SD, sample_size=1024, latents_mean=[0.58, 0.25, -0.2, 0.1],
                           latents_std=[3.5, 2.0, 1.5, 4.0]), lambda: TAESDDecoder("taesdxl")),
    ("AutoencoderKL (FLUX.1, 16 channels)",
     lambda: AutoencoderKL(**SD, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                           scaling_factor=0.3611, shift_factor=0.1159), lambda: TAESDDecoder("taef1")),
    ("AutoencoderKLFlux2 (default config: FLUX.2)", lambda: AutoencoderKLFlux2(), lambda: TAESDDecoder("taef2")),
    ("AutoencoderDC (diffusers' default config)", lambda: AutoencoderDC(),
     lambda: TAESDDecoder("tae-192", latent_channels=32, blocks=(1,) * 6)),
    ("AutoencoderKLWan (Wan 2.1)", lambda: AutoencoderKLWan(), lambda: TAEHVDecoder("taew2_1")),
    ("AutoencoderKLQwenImage (Qwen-Image)", lambda: AutoencoderKLQwenImage(), lambda: TAEHVDecoder("taew2_1")),
    ("AutoencoderKLTemporalDecoder (SVD)", lambda: AutoencoderKLTemporalDecoder(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4),
     lambda: TAETemporalDecoder()),
    ("AutoencoderTiny (TAESD)", lambda: AutoencoderTiny(), None),
]


class VaeOnlyPipeline(DiffusionPipeline):
    def __init__(self, vae):
        super().__init__()
        self.register_modules(vae=vae)


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f}"


def main() -> None:
    print("| VAE class | unswapped (MiB) | exact decoder swapped (MiB) | ratio | shared / own tensors | "
          "tiny decoder swapped (MiB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, make_vae, make_tiny in CASES:
        torch.manual_seed(0)
        pipe = VaeOnlyPipeline(make_vae().eval())
        plain = weight_bytes(pipe)
        adapter = swap_vae(pipe, fastdec.load(pipe.vae))
        exact = weight_bytes(pipe)
        counts = f"{len(adapter.weights.shared)} / {len(adapter.weights.own)}"
        tiny = "-"
        if make_tiny is not None:
            unswap_vae(pipe)
            swap_vae(pipe, make_tiny())
            tiny = mib(weight_bytes(pipe))
        print(f"| {label} | {mib(plain)} | {mib(exact)} | {exact / plain:.4f} | {counts} | {tiny} |", flush=True)
        del pipe, adapter
        gc.collect()


if __name__ == "__main__":
    main()
