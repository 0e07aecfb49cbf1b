"""tae-temporal: the paper's temporal decoder (Buzovkin & Shilov 2025), a TAESD decoder with one temporal block.

The TAESD decoder (taesd.Block, taesd.conv) at width 192 with blocks (3, 2, 2, 1) and bilinear x2 upsampling, and
Stable Video Diffusion's temporal mid-block (svd.TemporalMidBlock = diffusers' MidBlockTemporalDecoder: spatial
ResnetBlock2D + (3, 1, 1) temporal resnet mixed by a learned alpha, attention with 2 heads of 96, then a second
such resnet) after the first group of blocks, at the lowest resolution, where mixing frames is cheapest.

It decodes Stable Video Diffusion's per-frame 4-channel latents as they are (scale 1, shift 0, like the TAESD
family) and outputs frames in about [0, 1]. Random weights only (no published checkpoint): train it, then
save_pretrained / from_pretrained. ``mid_block`` has diffusers' parameter names, so a MidBlockTemporalDecoder trained
in diffusers loads into it (``model.mid_block.load_state_dict(block.state_dict())``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from fastdec.models.registry import Family, register
from fastdec.models.svd import GROUPS, PerFrameVideoDecoder, TemporalMidBlock
from fastdec.models.taesd import Block, Clamp, block_counts, conv

WIDTH = 192
BLOCKS = (3, 2, 2, 1)  # Blocks per resolution, low to high; a bilinear x2 upsample + conv between stages
ATTENTION_HEAD_DIM = 96  # 2 heads at width 192
MID_BLOCK_LAYERS = 2  # resnet, attention, resnet (with 1, diffusers' block would skip its attention)


class TAETemporalDecoder(PerFrameVideoDecoder):
    """``decode_frames``: per-frame latents (B*T, C, h, w) + num_frames -> frames (B*T, 3, 8h, 8w) in about [0, 1]."""

    output_range = "0,1"

    def __init__(
        self,
        latent_channels: int = 4,
        width: int = WIDTH,
        blocks: Sequence[int] = BLOCKS,
        attention_head_dim: int = ATTENTION_HEAD_DIM,
        mid_block_layers: int = MID_BLOCK_LAYERS,
    ):
        super().__init__()
        blocks = block_counts(blocks, BLOCKS)
        if width % GROUPS:
            raise ValueError(f"width must be a multiple of {GROUPS} (the temporal mid-block's GroupNorm), got {width}")
        if mid_block_layers < 2:
            raise ValueError(f"mid_block_layers must be >= 2 (with 1 the attention never runs), got {mid_block_layers}")
        head = [Clamp(), conv(latent_channels, width), nn.ReLU(inplace=True)]
        self.head = nn.Sequential(*head, *(Block(width, width) for _ in range(blocks[0])))
        self.mid_block = TemporalMidBlock(width, width, attention_head_dim, mid_block_layers)
        tail = []
        for count in blocks[1:]:
            tail += [nn.Upsample(scale_factor=2, mode="bilinear"), conv(width, width, bias=False)]
            tail += [Block(width, width) for _ in range(count)]
        tail.append(conv(width, 3))
        self.tail = nn.Sequential(*tail)
        self.latent_channels = latent_channels
        self.scaling_factor, self.shift_factor = 1.0, 0.0
        self.config = dict(
            latent_channels=latent_channels, width=width, blocks=list(blocks), attention_head_dim=attention_head_dim,
            mid_block_layers=mid_block_layers,
        )

    def decode_frames(self, z: Tensor, num_frames: int) -> Tensor:
        self.check_frames(z, num_frames)
        return self.tail(self.mid_block(self.head(z), num_frames))


register(Family(
    name="tae_temporal", order=80, classes=(TAETemporalDecoder,),
    presets={"tae-temporal": (TAETemporalDecoder, {})},  # random weights: train it (no published checkpoint)
))
