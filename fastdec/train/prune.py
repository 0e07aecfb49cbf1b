"""Structured channel pruning of a TAESD-family decoder: the teacher's weights, fewer channels.

A TAESD decoder is a residual stream of ``width`` channels per stage (first conv, blocks, upsampling convs between
stages, last conv), each block holding two inner activations of that width and, in TAEF2, a 1x1 -> GroupNorm(4) ->
1x1 branch four times as wide. Pruning keeps, for each stage's stream and for each inner activation, the channels
that carry the most signal: the mean absolute activation over a few latents decoded by the teacher (weights alone
do not see the scale of what flows through them). The student is then the teacher's architecture at the smaller
widths with the teacher's kept rows and columns, a far better start for distillation than random weights. The
branch keeps the same number of channels in each of its four groups, so its GroupNorm still has four groups of
equal size.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from fastdec.models.taesd import Block, TAESDDecoder, UpsampleConv, stage_widths


def channel_scores(modules: list[nn.Module], run: Callable[[], object]) -> dict[nn.Module, Tensor]:
    """Per module, the mean absolute value of each output channel while ``run()`` runs (dim 1 of image outputs,
    the last dim of (B, tokens, C) ones), normalised by its mean and summed over the module's calls."""
    scores: dict[nn.Module, Tensor] = {}

    def keep(module: nn.Module, inputs, output: Tensor) -> None:
        score = output.detach().abs().mean(dim=(0, 1) if output.dim() == 3 else (0, 2, 3))
        scores[module] = scores.get(module, 0) + score / score.mean().clamp_min(1e-12)

    hooks = [module.register_forward_hook(keep) for module in modules]
    try:
        with torch.no_grad():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    return scores


def kept_channels(score: Tensor, count: int, groups: int = 1) -> Tensor:
    """The ``count`` highest-scoring channels, the same number from each of ``groups`` equal groups (a GroupNorm's),
    in order."""
    per_group = score.view(groups, -1)
    top = per_group.topk(count // groups, dim=1).indices.sort(dim=1).values
    return (top + torch.arange(groups)[:, None] * per_group.shape[1]).flatten()


def _activation_scores(decoder: TAESDDecoder, latents: Tensor) -> dict[nn.Module, Tensor]:
    """channel_scores of every point pruning ranks, over the decodes of ``latents``."""
    recorded = [decoder[2]]  # the ReLU after the first conv: the stream's start
    for block in decoder.modules():
        if isinstance(block, Block):
            recorded += [block.conv[1], block.conv[3], block.fuse]  # inner activations, the stream after the block
            if block.pool is not None:
                recorded.append(block.pool[1])
    recorded += [module for module in decoder if isinstance(module, UpsampleConv)]
    return channel_scores(recorded, lambda: decoder(latents))


def prune_taesd(teacher: TAESDDecoder, width: int | Sequence[int], latents: Tensor) -> TAESDDecoder:
    """The teacher at ``width`` channels (one for all stages, or one per stage, low resolution to high), keeping the
    channels most active on ``latents`` (B, C, h, w)."""
    if not isinstance(teacher, TAESDDecoder):
        raise TypeError(f"prune_taesd prunes a TAESDDecoder, got a {type(teacher).__name__}")
    full, stages = teacher.widths, len(teacher.config["blocks"])
    widths = stage_widths(width, stages)
    teacher_width = teacher.config["width"]  # one int, or the list per stage
    if any(w % 4 or not 4 <= w <= f for w, f in zip(widths, full, strict=True)):
        raise ValueError(f"width must be, per stage, a multiple of 4 from 4 to the teacher's {teacher_width} "
                         f"channels, got {width}")
    if widths == full:
        raise ValueError(f"width {width} is not below the teacher's {teacher_width} channels in any stage: a "
                         "student must be narrower somewhere")
    teacher = copy.deepcopy(teacher).float().eval()  # the caller's teacher keeps its dtype
    scores = _activation_scores(teacher, latents.float())
    # The skips tie every point of a stage's stream; an upsampling conv starts the next stage's stream afresh.
    points: list[list[nn.Module]] = [[teacher[2]]]
    for module in teacher:
        if isinstance(module, Block):
            points[-1].append(module.fuse)
        elif isinstance(module, UpsampleConv):
            points.append([module])
    streams = [kept_channels(sum(scores[m] for m in stage), w) for stage, w in zip(points, widths, strict=True)]
    student = TAESDDecoder(**teacher.config | {"width": widths}).eval()
    stage = 0
    with torch.no_grad():
        for index, (old, new) in enumerate(zip(teacher, student, strict=True)):
            if isinstance(old, nn.Conv2d):  # the first conv (latents -> stream) or the last (stream -> RGB)
                rows = streams[0] if index == 1 else slice(None)
                cols = slice(None) if index == 1 else streams[-1]
                new.weight.copy_(old.weight[rows][:, cols])
                new.bias.copy_(old.bias[rows])
            elif isinstance(old, UpsampleConv):
                new.weight.copy_(old.weight[streams[stage + 1]][:, streams[stage]])
                stage += 1
            elif isinstance(old, Block):
                _prune_block(old, new, streams[stage], scores, widths[stage])
    return student


def _prune_block(old: Block, new: Block, stream: Tensor, scores: dict[nn.Module, Tensor], width: int) -> None:
    first, second = kept_channels(scores[old.conv[1]], width), kept_channels(scores[old.conv[3]], width)
    for conv_index, rows, cols in ((0, first, stream), (2, second, first), (4, stream, second)):
        new.conv[conv_index].weight.copy_(old.conv[conv_index].weight[rows][:, cols])
        new.conv[conv_index].bias.copy_(old.conv[conv_index].bias[rows])
    if old.pool is not None:
        norm = old.pool[1]
        hidden = kept_channels(scores[norm], width * norm.num_groups, norm.num_groups)
        new.pool[0].weight.copy_(old.pool[0].weight[hidden][:, stream])
        new.pool[1].weight.copy_(norm.weight[hidden])
        new.pool[1].bias.copy_(norm.bias[hidden])
        new.pool[3].weight.copy_(old.pool[3].weight[stream][:, hidden])
