"""Training losses beyond L1/MSE: LPIPS (when its weights are on this machine) and a patch discriminator."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The torchvision AlexNet weights the lpips package builds its metric on (torch.hub caches them under this file name).
LPIPS_ALEX_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"


class LPIPSUnavailable(RuntimeError):
    """LPIPS cannot run here: the lpips package or a backbone's weights are missing (the message says what to do)."""


def lpips_unavailable_reason() -> str | None:
    """Why LPIPS cannot run offline here, or None when it can."""
    try:
        import lpips  # noqa: F401
    except ImportError:
        return "the lpips package is not installed (pip install lpips)"
    weights = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_ALEX_URL.rsplit("/", 1)[1]
    if not weights.is_file():
        return (
            f"the alex backbone weights are not on this machine: download {LPIPS_ALEX_URL} and put it at {weights} "
            "(torch.hub's cache; $TORCH_HOME moves it), then LPIPS runs offline"
        )
    return None


def load_lpips(device: torch.device | str = "cpu") -> nn.Module:
    """The lpips package's LPIPS metric, frozen, taking images in [0, 1]; LPIPSUnavailable when it cannot run."""
    reason = lpips_unavailable_reason()
    if reason is not None:
        raise LPIPSUnavailable(f"LPIPS is not available: {reason}")
    import lpips

    return _UnitRange(lpips.LPIPS(net="alex", verbose=False)).to(device).eval().requires_grad_(False)


class _UnitRange(nn.Module):
    def __init__(self, metric: nn.Module):
        super().__init__()
        self.metric = metric

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-image LPIPS distance (B,) of images in [0, 1]."""
        return self.metric(x * 2 - 1, y * 2 - 1).flatten()


class PatchDiscriminator(nn.Module):
    """A small PatchGAN: strided convs to a map of real/fake logits, one per overlapping patch."""

    def __init__(self, width: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        channels = width
        for _ in range(layers - 1):
            blocks += [nn.Conv2d(channels, channels * 2, 4, 2, 1), nn.GroupNorm(8, channels * 2), nn.LeakyReLU(0.2)]
            channels *= 2
        blocks.append(nn.Conv2d(channels, 1, 3, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images * 2 - 1)


def discriminator_hinge_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def generator_adversarial_loss(fake_logits: Tensor) -> Tensor:
    return -fake_logits.mean()


def psnr(output: Tensor, target: Tensor) -> Tensor:
    """Per-image PSNR (B,) in dB of images in [0, 1] (output clamped to [0, 1] first)."""
    mse = (output.clamp(0, 1) - target).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-12))
