"""``fastdec eval``: decoders compared on held-out images of one latent space.

Every image of the folder (sorted; the first ``images`` of them) is turned to landscape when portrait, centre-cropped
(to ``size``, or to a multiple of the encoder's downscale) and encoded once; each decoder then decodes the same
latents. Per decoder: PSNR and SSIM against the original pixels, LPIPS when it can run here (else the reason), and
speed (median ms per image on this device, after a warm-up decode). Two baselines are always in the table: the latent
space's reference decoder when given (``reference``) and the latent preview, a least-squares linear map fitted on
training images (fastdec.models.preview). Writes report.json, report.md (a table), grid.png (rows: images; columns:
original | each decoder) and frontier.png (quality against decode time).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from fastdec.encoders import FrozenEncoder, load_encoder
from fastdec.machine import device_name
from fastdec.models.base import Decoder
from fastdec.train.data import load_samples
from fastdec.train.losses import load_lpips, lpips_unavailable_reason
from fastdec.train.scoring import load_eval_images, measure

log = logging.getLogger("fastdec.eval")
PREVIEW = "latent preview"


def fit_preview(folders: list[str], encoder: FrozenEncoder, count: int, cache_dir: str | None) -> Decoder:
    """The latent preview fitted on the first ``count`` images of the training folders (encoded or from the cache)."""
    from fastdec.models.preview import LatentPreview

    samples = []
    for folder in folders:  # encodes only the images it fits on, not the whole folders
        if len(samples) >= count:
            break
        found, _ = load_samples(folder, encoder.encode, encoder.downscale, encoder.downscale, encoder.description,
                                cache_dir=cache_dir, flips=False, limit=count - len(samples))
        samples += found
    return LatentPreview.fit([s.latents for s in samples], [s.image.float() / 255 for s in samples],
                             encoder.downscale)


def evaluate(
    decoders: dict[str, str | Decoder],
    data: str,
    encoder,
    preview_data: list[str],
    reference: str | Decoder | None = None,
    images: int | None = None,
    size: tuple[int, int] | None = None,
    preview_images: int = 60,
    speed_runs: int = 3,
    grid_images: int = 3,
    grid_crop: int | None = 192,
    output: str | Path | None = None,
    cache_dir: str | None = None,
    device: str | None = None,
    threads: int | None = None,
) -> dict:
    """Evaluates ``decoders`` ({label: name, path or Decoder}) plus the baselines; writes the report to ``output``
    when given and returns it (a dict: setup, and one row per decoder)."""
    import fastdec

    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not preview_data:
        raise ValueError("the latent preview baseline is fitted on training images: pass preview_data "
                         "(--preview-data <training image folder>)")
    frozen = encoder if isinstance(encoder, FrozenEncoder) else load_encoder(encoder, device)
    pairs = load_eval_images(data, images, size, 16)
    latents = [frozen.encode(image[None].to(device)) for _, image in pairs]
    targets = [image for _, image in pairs]
    log.info("encoded %d evaluation images from %s", len(pairs), data)

    lineup: dict[str, Decoder] = {}
    if reference is not None:
        label = type(reference).__name__ if isinstance(reference, Decoder) else Path(str(reference)).name
        lineup[f"reference ({label})"] = fastdec.load(reference, device=device, dtype=torch.float32)
    lineup[PREVIEW] = fit_preview(preview_data, frozen, preview_images, cache_dir).to(device)
    for label, decoder in decoders.items():
        lineup[label] = fastdec.load(decoder, device=device, dtype=torch.float32)
    for label, decoder in lineup.items():
        if decoder.latent_channels != frozen.latent_channels:
            raise ValueError(f"decoder {label!r} takes {decoder.latent_channels}-channel latents; the encoder "
                             f"({frozen.description}) writes {frozen.latent_channels}")

    lpips_reason = lpips_unavailable_reason()
    lpips = load_lpips(device=device) if lpips_reason is None else None
    rows, outputs = [], {}
    for label, decoder in lineup.items():
        decoder.eval()
        result, outputs[label] = measure(decoder, latents, targets, lpips, speed_runs)
        rows.append({"decoder": label, **result})
        log.info("%s", score_line(label, result))
    report = {
        "data": str(data), "images": [name for name, _ in pairs], "size": list(targets[0].shape[1:]),
        "encoder": frozen.description, "preview_fitted_on": f"first {preview_images} images of {preview_data}",
        "device": device_name(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "lpips": "alex" if lpips is not None else f"not available: {lpips_reason}",
        "rows": rows,
    }
    if output is not None:
        output = Path(output)
        output.mkdir(parents=True, exist_ok=True)
        (output / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (output / "report.md").write_text(markdown_table(report))
        save_grid(output / "grid.png", targets[:grid_images], {k: v[:grid_images] for k, v in outputs.items()},
                  grid_crop)
        plot_frontier(report, output / "frontier.png")
    return report


def plot_frontier(report: dict, png: Path) -> None:
    """PSNR and SSIM against ms per image, one labelled point per decoder, times on a log axis (the latent preview
    is about a thousand times faster than a decoder); the decoders no other one beats on both axes are joined."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no %s (pip install matplotlib)", png.name)
        return
    rows = [row for row in report["rows"] if row.get("ms_per_image")]
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for axis, metric, unit in ((axes[0], "psnr", "PSNR (dB)"), (axes[1], "ssim", "SSIM")):
        best = [row for row in rows if not any(
            other["ms_per_image"] <= row["ms_per_image"] and other[metric] > row[metric] for other in rows)]
        best.sort(key=lambda row: row["ms_per_image"])
        axis.plot([r["ms_per_image"] for r in best], [r[metric] for r in best], color="0.7", zorder=1)
        for row in rows:
            axis.scatter(row["ms_per_image"], row[metric], zorder=2)
            axis.annotate(row["decoder"], (row["ms_per_image"], row[metric]), textcoords="offset points",
                          xytext=(4, 4), fontsize=8)
        axis.set_xscale("log")
        axis.set_xlabel("ms per image (log)")
        axis.set_ylabel(unit)
        axis.grid(True, which="both", alpha=0.3)
    figure.suptitle(f"{len(report['images'])} images of {report['data']} at {report['size'][0]}x{report['size'][1]}"
                    f"; {report['device']}, {report['threads']} thread(s), {report['date']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(png, dpi=110)
    plt.close(figure)


def score_line(label: str, result: dict) -> str:
    """One decoder's scores as a progress line (the per-image numbers stay in report.json)."""
    parts = [f"PSNR {result['psnr']:.2f} dB", f"SSIM {result['ssim']:.3f}"]
    if "lpips" in result:
        parts.append(f"LPIPS {result['lpips']:.3f}")
    if result.get("ms_per_image") is not None:
        parts.append(f"{result['ms_per_image']:.1f} ms/image")
    return f"{label}: " + ", ".join(parts) + f", {format_params(result['params'])} parameters"


def format_params(count: int) -> str:
    """A parameter count for the table: 1.34M, 99 (the latent preview's), 12.5K: never "0.00M"."""
    if count >= 1e6:
        return f"{count / 1e6:.2f}M"
    return f"{count / 1e3:.1f}K" if count >= 1e4 else str(count)


def markdown_table(report: dict) -> str:
    has_lpips = any("lpips" in row for row in report["rows"])
    header = "| decoder | params | PSNR (dB) | SSIM |" + (" LPIPS |" if has_lpips else "") + " ms / image |"
    lines = [
        f"{len(report['images'])} images of {report['data']} at {report['size'][0]}x{report['size'][1]}, encoder "
        f"{report['encoder']}; {report['device']}, {report['threads']} thread(s), {report['date']}. "
        f"LPIPS: {report['lpips']}.", "",
        header, "|---" * (header.count("|") - 1) + "|",
    ]
    for row in report["rows"]:
        cells = [row["decoder"], format_params(row["params"]), f"{row['psnr']:.2f}", f"{row['ssim']:.3f}"]
        if has_lpips:
            cells.append(f"{row['lpips']:.3f}" if "lpips" in row else "-")
        ms = row.get("ms_per_image")
        cells.append("-" if ms is None else f"{ms:.1f}" if ms < 10 else f"{ms:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def save_grid(path: Path, originals: list[Tensor], outputs: dict[str, list[Tensor]], crop: int | None) -> None:
    """A labelled PNG grid; ``crop``: a centred crop of that many pixels per cell (detail at 1:1), None: whole."""
    from PIL import Image, ImageDraw

    columns = {"original": originals, **outputs}
    cells = {label: [centre_square(t, crop) for t in images] for label, images in columns.items()}
    height, width = next(iter(cells.values()))[0].shape[1:]
    label_h = 16
    grid = Image.new("RGB", (width * len(cells), (height + label_h) * len(originals)), "white")
    draw = ImageDraw.Draw(grid)
    for col, (label, images) in enumerate(cells.items()):
        for row, image in enumerate(images):
            pixels = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            grid.paste(Image.fromarray(pixels), (col * width, row * (height + label_h) + label_h))
            draw.text((col * width + 3, row * (height + label_h) + 2), label[: width // 6], fill="black")
    grid.save(path)


def centre_square(image: Tensor, crop: int | None) -> Tensor:
    if crop is None:
        return image
    height, width = image.shape[1:]
    size_h, size_w = min(crop, height), min(crop, width)
    top, left = (height - size_h) // 2, (width - size_w) // 2
    return image[:, top:top + size_h, left:left + size_w]


def _size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size takes HxW, e.g. 320x480, got {text!r}") from None
    return height, width


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("data", help="held-out image folder")
    add("--decoder", action="append", default=[], metavar="[LABEL=]SOURCE",
        help="a decoder to evaluate (name, save_pretrained folder, .pth); repeat for several")
    add("--encoder", required=True, help="the latent space's encoder: a TAESD .pth or a diffusers VAE folder / Hub id")
    add("--reference", help="the latent space's reference decoder (e.g. taef2_decoder.pth), a baseline row")
    add("--preview-data", nargs="+", required=True, help="training image folder(s) to fit the latent preview on")
    add("--preview-images", type=int, default=60, help="images the preview is fitted on (default: 60)")
    add("--images", type=int, help="evaluate the first N images (sorted); default: all")
    add("--size", type=_size, help="centre crop HxW after turning portraits to landscape, e.g. 320x480")
    add("--speed-runs", type=int, default=3, help="timed decodes per decoder (median reported)")
    add("--grid-images", type=int, default=3)
    add("--grid-crop", type=int, default=192, help="pixels of the centred crop shown per grid cell; 0: whole image")
    add("-o", "--output", default="eval", help="folder for report.json, report.md, grid.png (default: eval)")
    add("--cache-dir", help="latent cache folder (shared with fastdec train)")
    add("--device")
    add("--threads", type=int)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    decoders = {}
    for spec in args.decoder:
        label, sep, source = spec.partition("=")
        decoders[label if sep else Path(spec).name] = source if sep else spec
    try:
        report = evaluate(
            decoders, args.data, args.encoder, args.preview_data, args.reference, args.images, args.size,
            args.preview_images, args.speed_runs, args.grid_images, args.grid_crop or None, args.output,
            args.cache_dir, args.device, args.threads,
        )
    except (ValueError, FileNotFoundError, TypeError, OSError) as error:
        print(f"fastdec eval: error: {error}", file=sys.stderr)
        return 2
    print(markdown_table(report))
    return 0
