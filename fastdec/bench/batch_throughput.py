"""Batch-throughput benchmark of ``fastdec batch``: items/s of the local and the Ray engine per decoder (random
weights, random latents written as Parquet), and a projection of the time to decode 100K images from a measured
per-device throughput.

    python -m fastdec.bench.batch_throughput --out bench/results/<date>-batch-<machine>

Writes bench.json (every report, the machine, versions, date) and bench.md (the tables). Wall times include each
job's start-up (loading the decoder; for Ray, starting the actors), as a user pays it; the Ray instance itself is
started once, before the runs, and not counted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from fastdec.batch import decode_dataset, write_parquet

DEFAULT_ITEMS = {"taesd": 8, "tae-192": 4, "sd-vae": 2}
PROJECTED_COUNT, PROJECTED_SIDE = 100_000, 1024


def _counts(text: str | None, default: dict[str, int], decoders: list[str]) -> dict[str, int]:
    counts = dict(default)
    for part in filter(None, (text or "").split(",")):
        name, _, count = part.partition("=")
        counts[name] = int(count)
    missing = [name for name in decoders if name not in counts]
    if missing:
        raise ValueError(f"no item count for {missing}: pass --items {missing[0]}=<count>")
    return counts


def _decoder_folder(name: str, root: Path) -> Path:
    from fastdec.bench.contenders import fastdec_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fastdec_model(name)  # random weights: the throughput of the architecture
    folder = root / f"decoder-{name}"
    model.save_pretrained(folder)
    return folder


def _dataset(root: Path, name: str, count: int, side: int, channels: int) -> Path:
    generator = torch.Generator().manual_seed(0)
    latents = {f"{name}-{i:05d}": torch.randn(channels, side // 8, side // 8, generator=generator)
               for i in range(count)}
    return write_parquet(root / f"{name}-{side}.parquet", latents, row_group_size=max(1, count // 4))


def run(args: argparse.Namespace) -> dict:
    decoders = [name.strip() for name in args.decoders.split(",") if name.strip()]
    engines = [name.strip() for name in args.engines.split(",") if name.strip()]
    counts = _counts(args.items, DEFAULT_ITEMS, decoders)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    started_ray = False
    if "ray" in engines:
        from fastdec.batch.ray_engine import init_ray

        started_ray = init_ray(args.address, args.num_cpus)
    try:
        with tempfile.TemporaryDirectory(prefix="fastdec-batch-bench-") as scratch:
            root = Path(scratch)
            for name in decoders:
                folder = _decoder_folder(name, root)
                channels = json.loads((folder / "config.json").read_text()).get("latent_channels", 4)
                data = _dataset(root, name, counts[name], args.side, channels)
                for engine in engines:
                    out = root / f"out-{name}-{engine}"
                    options = {"actors": args.actors} if engine == "ray" else {}
                    report = decode_dataset(data, out, str(folder), engine=engine, batch_size=args.batch_size,
                                            progress=False, **options)
                    row = {"decoder": name, "side": args.side, "engine": engine, **report.to_json()}
                    row["decoder"] = name
                    rows.append(row)
                    print(_row_line(row), flush=True)
                    if args.out:  # after every row: a slow run that is stopped keeps what it measured
                        _write(Path(args.out), _result(args, rows))
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    result = _result(args, rows)
    if args.out:
        _write(Path(args.out), result)
        print(f"wrote {args.out}/bench.json and bench.md")
    return result


def _result(args: argparse.Namespace, rows: list[dict]) -> dict:
    from fastdec.bench.environment import environment, load_average

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {"date": datetime.date.today().isoformat(), "command": args.command_line, "side": args.side,
            "batch_size": args.batch_size, "rows": rows, "projection": projection(rows),
            "load_average": load_average(), **environment(device)}


def _write(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(result))


def projection(rows: list[dict]) -> list[dict]:
    """Time to decode 100K images at 1024^2 on one device of this kind, from each decoder's measured local-engine
    throughput (wall clock, read and encode+write included) scaled by the pixel count (1024^2 / side^2). A
    projection: convolution cost grows with the pixels; SD-VAE's mid-block attention grows faster (its row is a
    lower bound), and PNG encoding is not measured at 1024^2."""
    out = []
    for row in rows:
        if row["engine"] != "local" or not row["items_per_second"]:
            continue
        scale = (PROJECTED_SIDE / row["side"]) ** 2
        seconds = PROJECTED_COUNT * scale / row["items_per_second"]
        out.append({"decoder": row["decoder"], "measured_side": row["side"],
                    "measured_items_per_second": row["items_per_second"], "pixel_scale": scale,
                    "side": PROJECTED_SIDE, "count": PROJECTED_COUNT, "projected_seconds": seconds})
    return out


def _row_line(row: dict) -> str:
    return (f"{row['decoder']} {row['side']}^2 {row['engine']}: {row['done']} items, {row['items_per_second']:.3f} "
            f"items/s, {_number(row['steady_items_per_second'])} after the first (wall {row['wall_seconds']:.1f} s; "
            f"busy read {row['read_seconds']:.1f} s, decode "
            f"{row['decode_seconds']:.1f} s, encode+write {row['write_seconds']:.1f} s)")


def _number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def markdown(result: dict) -> str:
    device = result["device"]
    lines = [f"**{device['name']} ({device['cpu_count']} cores, {device['torch_threads']} torch threads)** · "
             f"{result['date']} · torch {result['versions']['torch']} · fastdec {result['versions']['fastdec']} · "
             f"float32 · weights: random · load average (1/5/15 min) at the end "
             f"{'/'.join(f'{x:.1f}' for x in result.get('load_average') or []) or 'n/a'} on "
             f"{device['cpu_count']} cores: a shared machine, the times are as slow as its load made them", "",
             f"`{result['command']}`", "",
             "| decoder | image | engine | items | items/s | items/s after the first | first output s | wall s | "
             "read s | decode s | encode+write s | workers |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['decoder']} | {row['side']}² | {row['engine']} | {row['done']} | "
                     f"{row['items_per_second']:.3f} | {_number(row['steady_items_per_second'])} | "
                     f"{_number(row['first_output_seconds'], 1)} | {row['wall_seconds']:.1f} | "
                     f"{row['read_seconds']:.2f} | "
                     f"{row['decode_seconds']:.1f} | {row['write_seconds']:.2f} | {', '.join(row['workers'])} |")
    if result["projection"]:
        lines += ["", projection_table(result)]
    return "\n".join(lines) + "\n"


def projection_table(result: dict) -> str:
    """The README table: time to decode 100K 1024^2 images per decoder, projected from this run."""
    device = result["device"]
    where = f"{device['name']}, {device['torch_threads']} torch thread(s)"
    lines = [f"| decoder | measured (local engine, {where}) | 100K × 1024² on this device (projection) |",
             "|---|---|---|"]
    for row in result["projection"]:
        lines.append(f"| {row['decoder']} | {row['measured_items_per_second']:.3f} items/s at "
                     f"{row['measured_side']}² | {_duration(row['projected_seconds'])} |")
    return "\n".join(lines)


def run_from_bench_args(bench_args: argparse.Namespace) -> int:
    """``fastdec bench --batch-throughput``: this benchmark with the options fastdec bench shares (--resolution,
    --threads, --out; --decoders when it names a subset of taesd, tae-192, sd-vae)."""
    argv = []
    if bench_args.resolution:
        argv += ["--side", str(bench_args.resolution[0])]
    if bench_args.threads:
        argv += ["--threads", str(bench_args.threads)]
    if bench_args.out:
        argv += ["--out", bench_args.out]
    chosen = [name.strip() for name in (bench_args.decoders or "").split(",") if name.strip()]
    if chosen and set(chosen) <= set(DEFAULT_ITEMS):
        argv += ["--decoders", ",".join(chosen)]
    return main(argv)


def main(argv: list[str] | None = None) -> int:
    prog = "python -m fastdec.bench.batch_throughput"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--decoders", default="taesd,tae-192,sd-vae")
    parser.add_argument("--engines", default="local,ray")
    parser.add_argument("--side", type=int, default=512, help="image side (default 512)")
    parser.add_argument("--items", help=f"items per decoder, e.g. taesd=16,sd-vae=3 (defaults: {DEFAULT_ITEMS})")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, help="torch threads of the local engine")
    parser.add_argument("--actors", type=int, help="Ray decoder actors (default: fastdec batch's)")
    parser.add_argument("--address", help="Ray cluster (default: a local instance)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance")
    parser.add_argument("--out", help="folder for bench.json and bench.md")
    args = parser.parse_args(argv)
    args.command_line = f"{prog} " + " ".join(argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    run(args)
    print(f"bench took {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
