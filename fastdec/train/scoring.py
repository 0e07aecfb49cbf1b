"""A decoder scored on held-out images: PSNR, SSIM, LPIPS and speed. ``fastdec eval`` reports these for several
decoders; training ends with ``quick_eval`` on its held-out folder."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdec.encoders import FrozenEncoder
from fastdec.models.base import Decoder
from fastdec.models.stats import count_params
from fastdec.train.data import centre_crop, list_images, read_rgb
from fastdec.train.losses import psnr


def ssim(output: Tensor, target: Tensor) -> Tensor:
    """Per-image SSIM (B,) of images in [0, 1] (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01,
    K2 0.03, valid region only), averaged over the RGB channels."""
    x, y = output.clamp(0, 1).double(), target.double()
    coords = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-coords**2 / (2 * 1.5**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(3, 1, 11, 11)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, window, groups=3)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    index = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return index.flatten(1).mean(1).float()


def load_eval_images(folder: str | Path, count: int | None, size: tuple[int, int] | None, multiple: int
                     ) -> list[tuple[str, Tensor]]:
    """(name, RGB (3, H, W) in [0, 1]) of the first ``count`` images, portrait turned to landscape, centre-cropped
    to ``size`` (H, W) or to a multiple of ``multiple``. An image that fails to read or is smaller than ``size`` is
    an error here: an evaluation set must be complete."""
    paths = list_images(folder)[:count]
    images = []
    for path in paths:
        try:
            image = read_rgb(path)
        except Exception as error:
            raise ValueError(f"cannot read evaluation image {path} ({type(error).__name__}: {error})") from error
        if image.shape[1] > image.shape[2]:
            image = image.rot90(1, (1, 2))  # landscape, as the reference measurements do
        if size is not None:
            height, width = image.shape[1:]
            if height < size[0] or width < size[1]:
                raise ValueError(f"{path} is {height}x{width} (landscape), smaller than --size {size[0]}x{size[1]}")
            top, left = (height - size[0]) // 2, (width - size[1]) // 2
            image = image[:, top:top + size[0], left:left + size[1]]
        else:
            image = centre_crop(image, multiple)
        images.append((path.relative_to(Path(folder)).as_posix(), image.contiguous()))
    return images


def speed_ms(decoder: Decoder, latents: list[Tensor], runs: int) -> float:
    """Median wall time of one decode, in ms, after one warm-up decode (CUDA synchronised)."""
    times = []
    with torch.no_grad():
        decoder.decode(latents[0])
        for z in (latents * runs)[:max(runs, 1)]:
            if z.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            decoder.decode(z, check_finite=False)
            if z.is_cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def measure(decoder: Decoder, latents: list[Tensor], images: list[Tensor], lpips=None, speed_runs: int = 3
            ) -> tuple[dict, list[Tensor]]:
    """Mean PSNR / SSIM (/ LPIPS) of ``decoder`` over the pairs, its speed, and its outputs (for the grid)."""
    scores: dict[str, list[float]] = {"psnr": [], "ssim": [], "lpips": []}
    outputs = []
    with torch.no_grad():
        for z, image in zip(latents, images, strict=True):
            out = decoder.decode(z).float()
            target = image[None].to(out.device)
            if out.shape != target.shape:
                raise ValueError(f"the decoder gives {tuple(out.shape)} for {tuple(z.shape)} latents, expected "
                                 f"{tuple(target.shape)}: it does not belong to this encoder's latent space")
            scores["psnr"].append(psnr(out, target).item())
            scores["ssim"].append(ssim(out.cpu(), target.cpu()).item())
            if lpips is not None:
                scores["lpips"].append(lpips(out, target).item())
            outputs.append(out[0].cpu())
    result = {k: statistics.fmean(v) for k, v in scores.items() if v}
    result["per_image"] = {k: v for k, v in scores.items() if v}
    if speed_runs > 0:
        result["ms_per_image"] = speed_ms(decoder, latents, speed_runs)
    result["params"] = count_params(decoder)
    return result, outputs


def quick_eval(decoder: Decoder, folder: str, encoder: FrozenEncoder | None, count: int, device) -> dict | None:
    """PSNR/SSIM of a freshly trained decoder on the first ``count`` images of ``folder`` (train's final eval)."""
    if encoder is None:
        return None
    images = load_eval_images(folder, count, None, 16)
    latents = [encoder.encode(image[None].to(device)) for _, image in images]
    result, _ = measure(decoder.to(device), latents, [image for _, image in images], speed_runs=0)
    return {"folder": str(folder), "images": len(images), **result}

