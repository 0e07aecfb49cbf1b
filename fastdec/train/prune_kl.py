"""Structured channel pruning of an AutoencoderKL-family decoder (SD, SDXL, SD3, FLUX.1, FLUX.2 VAEs): the same
architecture with narrower ``block_out_channels``, as FLUX.2's small decoder is its VAE's decoder at
[96, 192, 384, 384] instead of [128, 256, 512, 512].

Channels are kept by the same signal as fastdec.train.prune (the mean absolute activation on a few latents decoded
by the teacher), per *stream* and per inner activation:

* a stream is what residual additions tie together: conv_in's output through the mid block (whose attention adds
  to it) and every ResNet block with an identity shortcut; a ResNet block with a 1x1 shortcut conv and each
  upsampling conv start a new one;
* each ResNet block's conv1 output, and the attention's query/key and value channels, are chosen on their own.

Every one of them feeds a GroupNorm, so each keeps the same number of channels in every group (the student keeps
the teacher's ``norm_num_groups``). The mid-block attention is one head as wide as the channels, so its scale
1/sqrt(width) grows when it narrows: the kept query rows are scaled by sqrt(new / old) to keep every kept score.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fastdec.models.autoencoder_kl import AutoencoderKLDecoder, ResnetBlock, SelfAttention, Upsample
from fastdec.train.prune import channel_scores, kept_channels


def _scores(teacher: AutoencoderKLDecoder, latents: Tensor) -> dict[nn.Module, Tensor]:
    """channel_scores of every point pruning ranks (outputs of conv_in, ResNet blocks, conv1s, attentions, query,
    key, value and upsampling convs), over the decodes of ``latents``."""
    decoder = teacher.decoder
    recorded = [decoder.conv_in]
    for module in decoder.modules():
        if isinstance(module, ResnetBlock):
            recorded += [module, module.conv1]
        elif isinstance(module, SelfAttention):
            recorded += [module, module.to_q, module.to_k, module.to_v]
        elif isinstance(module, Upsample):
            recorded.append(module)
    # diffusion latents, as the encoder writes them
    return channel_scores(recorded, lambda: teacher.decode(latents, check_finite=False))


def kl_selections(teacher: AutoencoderKLDecoder, widths: Sequence[int], latents: Tensor) -> dict[str, Tensor]:
    """Per parameter name of the student, the kept channels of each dim (``name@0`` rows, ``name@1`` columns)."""
    groups, scores = teacher.config["norm_num_groups"], _scores(teacher, latents)
    decoder = teacher.decoder
    width_of = list(reversed(widths))  # up block i has width_of[i]; the mid block width_of[0]
    streams: list[list[nn.Module]] = [[decoder.conv_in]]  # the points of each stream, in order
    stream_width = [width_of[0]]
    owner: dict[str, int] = {"conv_in": 0}  # module name -> index of the stream its output is on
    inner: dict[str, tuple[Tensor, ...]] = {}

    def add_stream(module: nn.Module, width: int) -> int:
        streams.append([module])
        stream_width.append(width)
        return len(streams) - 1

    blocks = [("mid_block", decoder.mid_block, width_of[0])] + [
        (f"up_blocks.{i}", block, width_of[i]) for i, block in enumerate(decoder.up_blocks)]
    current = 0
    for prefix, block, width in blocks:
        for name, module in block.named_modules(prefix=prefix):
            if isinstance(module, ResnetBlock):
                owner[f"{name}.in"] = current
                if module.conv_shortcut is not None:
                    current = add_stream(module, width)
                else:
                    streams[current].append(module)
                owner[name] = current
                inner[name] = (kept_channels(scores[module.conv1], width, groups),)
            elif isinstance(module, SelfAttention):
                streams[current].append(module)
                owner[name] = current
                qk = scores[module.to_q] * scores[module.to_k]
                inner[name] = (kept_channels(qk, width, groups), kept_channels(scores[module.to_v], width, groups))
            elif isinstance(module, Upsample):
                owner[f"{name}.in"] = current
                current = add_stream(module, width)
                owner[name] = current
    kept = [kept_channels(sum(scores[m] for m in points), w, groups)
            for points, w in zip(streams, stream_width, strict=True)]
    return _parameter_selections(decoder, owner, inner, kept)


def _parameter_selections(decoder, owner, inner, kept) -> dict[str, Tensor]:
    select: dict[str, Tensor] = {}

    def put(name: str, rows: Tensor | None, cols: Tensor | None = None) -> None:
        if rows is not None:
            select[f"decoder.{name}.weight@0"] = select[f"decoder.{name}.bias@0"] = rows
        if cols is not None:
            select[f"decoder.{name}.weight@1"] = cols

    put("conv_in", kept[owner["conv_in"]])
    for name, module in decoder.named_modules():
        if isinstance(module, ResnetBlock):
            stream_in, stream_out, (hidden,) = kept[owner[f"{name}.in"]], kept[owner[name]], inner[name]
            put(f"{name}.norm1", stream_in)
            put(f"{name}.conv1", hidden, stream_in)
            put(f"{name}.norm2", hidden)
            put(f"{name}.conv2", stream_out, hidden)
            if module.conv_shortcut is not None:
                put(f"{name}.conv_shortcut", stream_out, stream_in)
        elif isinstance(module, SelfAttention):
            stream, (qk, value) = kept[owner[name]], inner[name]
            put(f"{name}.group_norm", stream)
            put(f"{name}.to_q", qk, stream)
            put(f"{name}.to_k", qk, stream)
            put(f"{name}.to_v", value, stream)
            put(f"{name}.to_out.0", stream, value)
        elif isinstance(module, Upsample):
            put(f"{name}.conv", kept[owner[name]], kept[owner[f"{name}.in"]])
    last = kept[-1]
    put("conv_norm_out", last)
    put("conv_out", None, last)
    return select


def prune_autoencoder_kl(teacher: AutoencoderKLDecoder, block_out_channels: Sequence[int], latents: Tensor
                         ) -> AutoencoderKLDecoder:
    """The teacher (an AutoencoderKLDecoder or subclass, e.g. Flux2VAEDecoder) with ``block_out_channels``, keeping
    the channels most active on ``latents`` (the teacher's own latent space)."""
    if not isinstance(teacher, AutoencoderKLDecoder):
        raise TypeError(f"prune_autoencoder_kl prunes an AutoencoderKLDecoder, got a {type(teacher).__name__}")
    full, groups = list(teacher.config["block_out_channels"]), teacher.config["norm_num_groups"]
    widths = [int(w) for w in block_out_channels]
    if len(widths) != len(full) or any(w % groups or not groups <= w <= f for w, f in zip(widths, full, strict=True)):
        raise ValueError(
            f"block_out_channels must be {len(full)} widths, each a multiple of the {groups} norm groups and at most "
            f"the teacher's {full}; got {list(block_out_channels)}"
        )
    tied = [i for i in range(1, len(full)) if full[i] == full[i - 1] and widths[i] != widths[i - 1]]
    if tied:
        raise ValueError(
            f"block_out_channels {widths}: the teacher's blocks {tied[0] - 1} and {tied[0]} are both {full[tied[0]]} "
            "wide, joined by a ResNet block without a shortcut conv, so the student's must be equal too"
        )
    teacher = copy.deepcopy(teacher).float().eval()  # the caller's teacher keeps its dtype
    teacher.tile_size = None
    selections = kl_selections(teacher, widths, latents.float())
    student = type(teacher)(**teacher.config | {"block_out_channels": widths}).eval()
    old_state = teacher.state_dict()
    with torch.no_grad():
        for name, target in student.state_dict().items():
            value = old_state[name]
            for dim in (0, 1):
                if f"{name}@{dim}" in selections:
                    value = value.index_select(dim, selections[f"{name}@{dim}"])
            if value.shape != target.shape:
                raise RuntimeError(f"pruning {name}: {tuple(value.shape)} does not fit {tuple(target.shape)}")
            target.copy_(value)
        for module_name, module in student.named_modules():  # one head: scale 1/sqrt(width) grows as it narrows
            if isinstance(module, SelfAttention):
                old = teacher.get_submodule(module_name).to_q.out_features
                factor = math.sqrt(module.to_q.out_features / old)
                module.to_q.weight.mul_(factor)
                module.to_q.bias.mul_(factor)
    return student
