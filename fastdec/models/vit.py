"""ViT decoders: latent patches through a pre-norm transformer; each token's head output is one pixel patch.

Latents (B, C, h, w), latent patch q (1 or 2), pixel patch p = 8q:

    patch_embed    conv C -> dim, kernel = stride = q          -> N = (h/q)(w/q) tokens of width dim
    + position     2-D sin-cos encoding of the (h/q, w/q) grid, computed for whatever grid comes in
    blocks         depth x [x + attn(LN(x)), x + MLP(LN(x))]    ``ops.attention`` on (B, heads, N, 64)
    norm, head     LayerNorm, then linear dim -> p*p*3 without its bias
    patch_unembed  tokens -> (B, 3, 8h, 8w); the head's bias is added inside that fused kernel

Presets keep ViT-S/ViT-B's width, heads and depth (12) and use q = 2 (16x16-pixel patches): 1024 tokens at
512x512 and 4096 at 1024x1024, so attention stays a small part of the cost at high resolution (q = 1 would
quadruple the tokens and multiply the attention FLOPs by 16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdec import ops
from fastdec.models.base import Decoder
from fastdec.models.registry import Family, register

NORM_EPS = 1e-6


def sincos_position_encoding(grid_h: int, grid_w: int, dim: int, device=None, dtype=None) -> Tensor:
    """(grid_h*grid_w, dim) fixed 2-D sin-cos encoding (MAE's), row-major over the grid.

    The first half of the channels encodes the row, the second half the column, each as sin and cos of the
    position at dim/4 frequencies 10000^(-i / (dim/4)). Computed in fp32 for any grid, then cast.
    """
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos position encoding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    frequencies = 10000.0 ** (-torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    rows = torch.arange(grid_h, device=device, dtype=torch.float32)[:, None] * frequencies
    cols = torch.arange(grid_w, device=device, dtype=torch.float32)[:, None] * frequencies
    rows = rows[:, None, :].expand(grid_h, grid_w, quarter)
    cols = cols[None, :, :].expand(grid_h, grid_w, quarter)
    encoding = torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=-1)
    return encoding.reshape(grid_h * grid_w, dim).to(dtype)


class Attention(nn.Module):
    """Multi-head self-attention on (B, N, dim) tokens, the heads' softmax(qk^T)v in one ``ops.attention``."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads; pick heads that divide it")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        out = ops.attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (timm's Mlp parameter names)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block on (B, N, dim) tokens."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTDecoder(Decoder):
    """Latents -> images (B, 3, spatial_factor*h, spatial_factor*w) in ~[-1, 1]; h and w multiples of the
    latent patch."""

    def __init__(
        self,
        latent_channels: int = 4,
        dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        latent_patch: int = 2,
        mlp_ratio: float = 4.0,
        spatial_factor: int = 8,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
    ):
        super().__init__()
        if latent_patch < 1 or spatial_factor < 1 or depth < 0:
            raise ValueError(
                f"latent_patch and spatial_factor must be >= 1 and depth >= 0, got latent_patch={latent_patch},"
                f" spatial_factor={spatial_factor}, depth={depth}"
            )
        if dim % 4:
            raise ValueError(f"dim must be divisible by 4 (the 2-D sin-cos position encoding), got {dim}")
        self.config = dict(
            latent_channels=latent_channels, dim=dim, depth=depth, num_heads=num_heads, latent_patch=latent_patch,
            mlp_ratio=mlp_ratio, spatial_factor=spatial_factor, scaling_factor=scaling_factor,
            shift_factor=shift_factor,
        )
        self.latent_channels = latent_channels
        self.scaling_factor, self.shift_factor = scaling_factor, shift_factor
        self.latent_patch, self.spatial_factor = latent_patch, spatial_factor
        self.pixel_patch = latent_patch * spatial_factor
        self.dim = dim

        self.patch_embed = nn.Conv2d(latent_channels, dim, latent_patch, stride=latent_patch)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=NORM_EPS)
        self.head = nn.Linear(dim, self.pixel_patch**2 * 3)

        for layer in self.modules():  # ViT's initialisation: truncated-normal (std 0.02) linear weights, zero biases
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(dim, -1))  # as a linear over the patch (MAE)
        nn.init.zeros_(self.patch_embed.bias)

    def forward(self, z: Tensor) -> Tensor:
        """Latents in the decoder's own space (B, latent_channels, h, w) -> images (B, 3, f*h, f*w), ~[-1, 1],
        f = spatial_factor (8 for the presets)."""
        self.check_input(z)
        height, width = z.shape[-2:]
        q = self.latent_patch
        if height % q or width % q:
            raise ValueError(
                f"latent size {height}x{width} is not a multiple of the latent patch {q}; pad or crop the "
                f"latents to a multiple of {q} (images to a multiple of {self.pixel_patch} pixels)"
            )
        grid_h, grid_w = height // q, width // q
        x = self.patch_embed(z).flatten(2).transpose(1, 2)  # (B, N, dim)
        x = x + sincos_position_encoding(grid_h, grid_w, self.dim, x.device, x.dtype)
        x = self.norm(self.blocks(x))
        tokens = F.linear(x, self.head.weight)  # the bias is added by patch_unembed, in the same pass
        return ops.patch_unembed(tokens, self.pixel_patch, grid_h, grid_w, self.head.bias)


PRESETS: dict[str, tuple[type[Decoder], dict]] = {
    "vit-s": (ViTDecoder, dict(dim=384, depth=12, num_heads=6, latent_patch=2)),
    "vit-b": (ViTDecoder, dict(dim=768, depth=12, num_heads=12, latent_patch=2)),
}


register(Family(name="vit", order=70, classes=(ViTDecoder,), presets=PRESETS))
