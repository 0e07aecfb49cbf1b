"""dc-ae (DC-AE f32c32, SANA-era layout) against diffusers' AutoencoderDC, and the paper's EfficientViT presets,
which are DC-AE configurations (8x), against the same AutoencoderDC configuration."""

from __future__ import annotations

import torch
from torch import nn

from fastdec.bench.spec import BenchDecoder, empty_diffusers_module
from fastdec.models.base import Decoder


def twin(model: Decoder) -> tuple[nn.Module, None]:
    """diffusers' AutoencoderDC with ``model``'s decoder weights (a one-stage encoder, never run). The bench runs
    BatchNorm models fused (BatchNorm folded into conv2, which gains a bias); the twin then gets the folded conv2 and
    an identity BatchNorm carrying that bias (running mean 0, variance 1 - eps, weight 1): the same function."""
    import diffusers

    config = model.config
    stages = len(config["block_out_channels"])
    vae = empty_diffusers_module(
        diffusers.AutoencoderDC, in_channels=config["out_channels"], latent_channels=config["latent_channels"],
        attention_head_dim=config["attention_head_dim"], decoder_block_types=tuple(config["block_types"]),
        decoder_block_out_channels=tuple(config["block_out_channels"]),
        decoder_layers_per_block=tuple(config["layers_per_block"]),
        decoder_qkv_multiscales=tuple(tuple(s) for s in config["qkv_multiscales"]),
        decoder_norm_types=tuple(config["norm_types"]), decoder_act_fns=tuple(config["act_fns"]),
        upsample_block_type=config["upsample_block_type"], decoder_in_shortcut=config["in_shortcut"],
        decoder_conv_act_fn=config["conv_act_fn"], scaling_factor=config["scaling_factor"],
        encoder_block_out_channels=(8,) * stages, encoder_layers_per_block=(0,) * stages,
        encoder_block_types="ResBlock", encoder_qkv_multiscales=((),) * stages,
    )
    state = {k.removeprefix("decoder."): v for k, v in model.state_dict().items()}
    expected = vae.decoder.state_dict()
    for key in [k for k in state if k.endswith("conv2.bias") and k not in expected]:  # a folded BatchNorm
        norm = key.removesuffix("conv2.bias") + "norm."
        state[norm + "bias"] = state.pop(key)
        state[norm + "weight"] = torch.ones_like(state[norm + "bias"])
        state[norm + "running_mean"] = torch.zeros_like(state[norm + "bias"])
        state[norm + "running_var"] = torch.full_like(state[norm + "bias"], 1 - 1e-5)
        state[norm + "num_batches_tracked"] = expected[norm + "num_batches_tracked"]
    vae.decoder.load_state_dict(state, strict=True)
    return vae, None


def _build(name: str):
    def build() -> Decoder:
        from fastdec.models import dcae

        if name == "dc-ae":
            return dcae.DCAEDecoder(**dcae.F32C32)
        cls, config = dcae.PRESETS[name]
        return cls(**config)
    return build


ENTRIES = (
    # The GPU goal for this row, >= 2.5x diffusers eager at 1024^2 bf16, is a ratio: Goal only holds limits
    # on median_ms / peak memory, so it is read off the row's speed-up column.
    BenchDecoder("dc-ae", _build("dc-ae"), "DCAEDecoder", twin, downsample=32, side_multiple=32, order=15,
                 kind="exact image VAE"),
    *(BenchDecoder(name, _build(name), "DCAEDecoder", twin, lightweight=True, order=30,
                   quick=name == "efficientvit", kind="paper decoder (EfficientViT, DC-AE configuration)")
      for name in ("efficientvit", "efficientvit-attn")),
)
