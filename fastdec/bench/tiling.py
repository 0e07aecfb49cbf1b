"""Tiled decoding in numbers: peak memory vs image size (untiled vs tiled), the max error of tiled vs untiled, and a
seam measure, for fastdec's exact tiling and diffusers' ``enable_tiling()`` on the same weights.

    fastdec bench --tiling [--resolution 256,512] [--out DIR]
    python -m fastdec.bench.tiling [--sizes 256,512] [--taef2-sizes 512,1024] [--width-divisor 4] [--out DIR]

Decoders: the SD VAE architecture (diffusers ``AutoencoderKL`` with sd-vae-ft-mse's config, ``--width-divisor``
divides its widths and groups for a short CPU run; seeded random weights, loaded into fastdec with
``fastdec.load(vae)`` so both run the same weights; seeded random latents), and TAEF2 with its real weights on the
latents of a real photo (no diffusers counterpart). Modes: fastdec untiled, fastdec exact tiled, diffusers untiled,
diffusers ``enable_tiling()`` (on CUDA its own 512-px tiles; on CPU 128 px, so that images that fit a CPU run are
tiled at all; 25% overlap, blended), fastdec's slabs given the same stride (384 px; 96 px on CPU).

Memory: every (decoder, mode, size) runs in a fresh subprocess, after a warm-up decode of an 8x8 latent. On CPU the
peak is the process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs just before the
decode) minus the resident set before the decode: what the decode added, whatever allocated it. On CUDA it is
torch.cuda.max_memory_allocated() minus the memory allocated before. For fastdec's tiled mode the largest slab moved
to the compute device at once (input rows with halo plus output) is reported too: that is the device-memory bound;
on a CPU-only machine the host is the device, so the slabs held in host memory count towards the CPU peak.

Seam measure: the mean absolute vertical gradient across the mode's horizontal tile borders and horizontal gradient
across its vertical borders, divided by the same mean over all other rows / columns (1.0: no seam), for the tiled
output and, at the same borders, for the untiled output (what the image itself gives there).

Writes DIR/tiling.json and DIR/tiling.md (default bench/results/<date>-<machine>-tiling).
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fastdec.bench.settings import DTYPES, dtype_name
from fastdec.bench.timing import call_peak_memory, synchronize
from fastdec.machine import device_name

ROOT = Path(__file__).resolve().parents[2]  # the repository (results go to bench/results, TAEF2 is in ../shared)
TAEF2 = ROOT / ".." / "shared" / "weights" / "taef2"
MODES = ("fastdec", "fastdec-tiled", "diffusers", "diffusers-tiled")
DIFFUSERS_TILE = {"cuda": 512, "cpu": 128}  # pixels (512: diffusers' default for the SD VAE); 25% of it blends


def diffusers_tile(device: str) -> int:
    return DIFFUSERS_TILE["cuda" if device.startswith("cuda") else "cpu"]


def tile_stride(diffusers_tile: int) -> int:
    """diffusers' row_limit: the pixels each tile keeps; fastdec's slabs get the same height."""
    return diffusers_tile - diffusers_tile // 4


# --- worker: one decode in a fresh process -------------------------------------------------------------------------


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _sd_vae(width_divisor: int):
    """The SD 1.x VAE architecture (stabilityai/sd-vae-ft-mse's config), its widths divided by ``width_divisor``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=tuple(w // width_divisor for w in (128, 256, 512, 512)),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
        latent_channels=4, sample_size=512, norm_num_groups=32 // width_divisor,
    ).eval()


def worker(spec: dict) -> dict:
    """Decodes once as ``spec`` says, saves the image to spec["image"], returns the measurements."""
    import warnings

    warnings.simplefilter("ignore")
    import fastdec
    from fastdec import ops
    from fastdec.tiling import HostTiles, TiledRun, even_bounds, latent_tile_rows, run_decode

    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    latents = torch.load(spec["latents"], weights_only=True).to(device, dtype)
    if spec["decoder"] == "sd-vae":
        vae = _sd_vae(spec["width_divisor"])
        scale = vae.config.scaling_factor
        if spec["mode"].startswith("diffusers"):
            vae = vae.to(device, dtype)
            if spec["mode"] == "diffusers-tiled":
                vae.enable_tiling()
                vae.tile_sample_min_size = spec["diffusers_tile"]
                vae.tile_latent_min_size = spec["diffusers_tile"] // 8

            def decode():
                return (vae.decode(latents / scale).sample * 0.5 + 0.5).clamp(0, 1)
        else:
            decoder = fastdec.load(vae, device=device, dtype=dtype)
            del vae
    else:
        from fastdec.models.taesd import TAESDDecoder

        decoder = TAESDDecoder.from_pth(TAEF2 / "taef2_decoder.pth", "taef2", device=device).to(dtype=dtype)
    result = {}
    if spec["mode"] == "fastdec":
        def decode():
            return decoder.decode(latents)
    elif spec["mode"] == "fastdec-tiled":
        rows, h = latent_tile_rows(decoder, latents, spec["tile"]), latents.shape[-2]
        run = TiledRun(HostTiles(device), h, even_bounds(h, -(-h // rows)))

        def decode():
            image = run.executor.gather(run_decode(decoder, latents, run))
            result["slab_device_bytes"] = run.executor.peak_slab_bytes
            result["row_borders"] = [b * image.shape[-2] // h for b in run.latent_bounds[1:-1]]
            return image
    with torch.no_grad(), ops.reference_ops() if device.type == "cpu" else torch.no_grad():
        warm = latents[..., :8, :8]  # first-call work (lazy init, folded-kernel caches) is not the decode's
        (vae.decode(warm / scale) if spec["mode"].startswith("diffusers") else decoder.decode(warm))
        if device.type == "cuda":
            synchronize(device)  # the warm-up's kernels finish before the clock starts
            start = time.perf_counter()
            image, peak = call_peak_memory(decode, device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
            before = _rss_bytes("VmRSS")
            start = time.perf_counter()
            image = decode()
            peak = _rss_bytes("VmHWM") - before
        result["seconds"] = time.perf_counter() - start
    result["peak_bytes"] = peak
    torch.save(image.float().cpu(), spec["image"])
    return result


# --- analysis ------------------------------------------------------------------------------------------------------


def seam_ratio(image: torch.Tensor, row_borders: list[int], col_borders: list[int]) -> float:
    """Mean |gradient| across the tile borders / the same across all other rows and columns (1.0: no seam)."""
    image = image.double()
    border, other = [], []
    for axis, borders in ((-2, row_borders), (-1, col_borders)):
        if not borders:
            continue
        grad = image.diff(dim=axis).abs()  # index i: between i and i + 1
        at = torch.zeros(grad.shape[axis], dtype=torch.bool)
        at[[b - 1 for b in borders]] = True
        border.append(grad.index_select(axis, at.nonzero().flatten()).flatten())
        other.append(grad.index_select(axis, (~at).nonzero().flatten()).flatten())
    return (torch.cat(border).mean() / torch.cat(other).mean()).item()


def diffusers_borders(size: int, diffusers_tile: int = DIFFUSERS_TILE["cpu"]) -> list[int]:
    stride = tile_stride(diffusers_tile)
    return list(range(stride, size, stride))


def make_latents(decoder: str, size: int, path: Path) -> None:
    if decoder == "sd-vae":
        latents = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(size))
    else:  # a real photo's latent: scikit-image's astronaut at size x size through the real TAEF2 encoder
        import skimage.data
        import torch.nn.functional as F

        from fastdec import ops
        from fastdec.models.taesd import TAESDEncoder

        encoder = TAESDEncoder.from_pth(TAEF2 / "taef2_encoder.pth", "taef2")
        image = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad(), ops.reference_ops():
            latents = encoder.encode(F.interpolate(image, size=(size, size), mode="bilinear"))
    torch.save(latents, path)


def measure(decoder: str, size: int, modes: tuple[str, ...], device: str, tmp: Path, width_divisor: int = 1,
            dtype: str = "float32") -> list[dict]:
    latents = tmp / f"{decoder}-{size}-latents.pt"
    make_latents(decoder, size, latents)
    rows, images = [], {}
    tile = diffusers_tile(device)
    for mode in modes:
        spec = {"decoder": decoder, "mode": mode, "size": size, "device": device, "dtype": dtype,
                "diffusers_tile": tile, "tile": tile_stride(tile), "width_divisor": width_divisor,
                "latents": str(latents), "image": str(tmp / f"{decoder}-{size}-{mode}.pt")}
        done = subprocess.run([sys.executable, "-m", "fastdec.bench.tiling", "--worker", json.dumps(spec)],
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{decoder} {mode} {size}: worker failed\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        images[mode] = torch.load(spec["image"], weights_only=True)
        name = decoder if width_divisor == 1 or decoder != "sd-vae" else f"sd-vae/{width_divisor}"
        rows.append({"decoder": name, "size": size, "mode": mode, **result})
        print(f"{decoder} {size} {mode}: peak {result['peak_bytes'] / 2**20:.0f} MiB, {result['seconds']:.1f} s",
              flush=True)
    for row in rows:
        mode, image = row["mode"], images[row["mode"]]
        reference = images["fastdec" if mode.startswith("fastdec") else "diffusers"]
        error = image.double() - reference.double()
        row["max_abs_error_vs_untiled"] = error.abs().max().item()
        mse = error.square().mean().item()
        row["psnr_vs_untiled_db"] = float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1 / mse)).item()
        borders = {"fastdec-tiled": (row.get("row_borders", []), []),
                   "diffusers-tiled": (diffusers_borders(size, tile),) * 2}.get(mode)
        if borders and any(borders):  # an image no larger than one tile has no borders to measure
            row["seam_ratio"] = seam_ratio(image, *borders)
            row["seam_ratio_untiled_same_borders"] = seam_ratio(reference, *borders)
    if "diffusers" in images:
        rows[0]["max_abs_error_vs_diffusers_untiled"] = (images["fastdec"] - images["diffusers"]).abs().max().item()
    return rows


def report(rows: list[dict], meta: dict) -> str:
    lines = [f"**{meta['machine']}** · {meta['date']} · torch {meta['torch']} · device {meta['device']} · "
             f"{meta['dtype']} · diffusers tiles {meta['diffusers_tile_px']} px, fastdec slabs "
             f"{tile_stride(meta['diffusers_tile_px'])} px",
             "", f"`{meta['command']}`", "",
             "| decoder | image | mode | peak extra memory MiB | slab on device MiB | time s | max abs error vs "
             "untiled | PSNR vs untiled dB | seam ratio (untiled at same borders) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        slab = f"{row['slab_device_bytes'] / 2**20:.1f}" if "slab_device_bytes" in row else "–"
        tiled = row["mode"].endswith("tiled")
        error = f"{row['max_abs_error_vs_untiled']:.1e}" if tiled else "–"
        quality = ("identical" if row["psnr_vs_untiled_db"] == float("inf") else f"{row['psnr_vs_untiled_db']:.1f}")
        seam = (f"{row['seam_ratio']:.3f} ({row['seam_ratio_untiled_same_borders']:.3f})" if "seam_ratio" in row
                else "–")
        lines.append(f"| {row['decoder']} | {row['size']}² | {row['mode']} | {row['peak_bytes'] / 2**20:.0f} | "
                     f"{slab} | {row['seconds']:.1f} | {error} | {quality if tiled else '–'} | {seam} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="256,512", help="SD-VAE image sizes (default 256,512)")
    parser.add_argument("--taef2-sizes", default="512,1024", help="TAEF2 image sizes (default 512,1024; '' skips)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width-divisor", type=int, default=1,
                        help="SD VAE widths / this (and groups / this): 4 keeps a CPU run short (default 1)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="weights and latents (default fp32; bf16/fp16 convolutions are very slow on CPUs)")
    parser.add_argument("--out", help="output folder (default bench/results/<date>-<machine>-tiling)")
    args = parser.parse_args(argv)
    dtype = dtype_name(DTYPES[args.dtype])
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    sizes = [int(s) for s in args.sizes.split(",") if s]
    taef2_sizes = [int(s) for s in args.taef2_sizes.split(",") if s] if (TAEF2 / "taef2_decoder.pth").is_file() else []
    date = datetime.date.today().isoformat()
    meta = {"date": date, "machine": device_name(torch.device(args.device)), "torch": torch.__version__,
            "device": args.device, "dtype": dtype,
            "diffusers_tile_px": diffusers_tile(args.device),
            "command": "python -m fastdec.bench.tiling " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = Path(args.out or ROOT / "bench" / "results" / f"{date}-{args.device}-tiling")
    plan = [("sd-vae", size, MODES) for size in sizes] + [("taef2", size, MODES[:2]) for size in taef2_sizes]
    plan.sort(key=lambda item: item[1])  # small sizes first; results are written after each, so a cut run keeps them
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for decoder, size, modes in plan:
            rows += measure(decoder, size, modes, args.device, Path(tmp), args.width_divisor, dtype)
            out.mkdir(parents=True, exist_ok=True)
            (out / "tiling.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
            (out / "tiling.md").write_text(report(rows, meta))
    print(report(rows, meta))
    return 0


def run_from_bench_args(args: argparse.Namespace) -> int:
    """``fastdec bench --tiling``: --resolution are the SD-VAE sizes, --device, --dtype and --out apply."""
    argv = ["--sizes", ",".join(str(r) for r in (args.resolution or (512, 1024, 2048, 4096)))]
    for option in ("device", "dtype", "out"):
        if getattr(args, option):
            argv += [f"--{option}", getattr(args, option)]
    return main(argv)


if __name__ == "__main__":
    sys.exit(main())
