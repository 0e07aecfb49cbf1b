"""The latent preview: the cheapest decoder there is, a per-pixel linear map from latent channels to RGB (plus a
bias), upsampled bilinearly. What UIs show while sampling; fastdec eval's floor baseline.

``LatentPreview.fit`` solves the least-squares problem between latents and the images average-pooled to the latent
grid, so it needs only a few encoded images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdec.models.base import Decoder
from fastdec.models.registry import Family, register


class LatentPreview(Decoder):
    """Latents (B, C, h, w) -> RGB (B, 3, f*h, f*w) in [0, 1]: a 1x1 conv, then bilinear upsampling by f."""

    output_range = "0,1"

    def __init__(self, latent_channels: int, spatial_factor: int = 8):
        super().__init__()
        if latent_channels < 1 or spatial_factor < 1:
            raise ValueError(
                f"latent_channels and spatial_factor must be >= 1, got {latent_channels}, {spatial_factor}"
            )
        self.latent_channels, self.spatial_factor = latent_channels, spatial_factor
        self.config = {"latent_channels": latent_channels, "spatial_factor": spatial_factor}
        self.proj = nn.Conv2d(latent_channels, 3, 1)

    def forward(self, z: Tensor) -> Tensor:
        rgb = self.proj(z)
        return F.interpolate(rgb, scale_factor=self.spatial_factor, mode="bilinear", align_corners=False)

    @classmethod
    def fit(cls, latents: Sequence[Tensor], images: Sequence[Tensor], spatial_factor: int = 8) -> LatentPreview:
        """Least squares over every latent pixel of the pairs: latents (C, h, w) and images (3, f*h, f*w) in [0, 1]."""
        if not latents or len(latents) != len(images):
            raise ValueError(f"fit needs matching, non-empty lists of latents and images, got {len(latents)} and "
                             f"{len(images)}")
        rows, targets = [], []
        for z, image in zip(latents, images, strict=True):
            pooled = F.avg_pool2d(image[None].double(), spatial_factor)[0]
            if pooled.shape[-2:] != z.shape[-2:]:
                raise ValueError(f"an image of {tuple(image.shape)} does not match latents of {tuple(z.shape)} at "
                                 f"{spatial_factor}x")
            rows.append(z.double().flatten(1).T)
            targets.append(pooled.flatten(1).T)
        a = torch.cat(rows)
        a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
        solution = torch.linalg.lstsq(a, torch.cat(targets)).solution  # (C + 1, 3)
        model = cls(a.shape[1] - 1, spatial_factor)
        with torch.no_grad():
            model.proj.weight.copy_(solution[:-1].T[:, :, None, None].float())
            model.proj.bias.copy_(solution[-1].float())
        return model.eval()


register(Family(name="preview", order=90, classes=(LatentPreview,)))
