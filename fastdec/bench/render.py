"""A result as markdown (bench.md, the README table), rich tables, a plot (bench.png) and files on disk."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from fastdec.bench.goals import find_row, goal_for_row
from fastdec.bench.settings import VARIANT_LABELS, VARIANTS
from fastdec.bench.spec import GIB, MIB
from fastdec.bench.timing import fused_backend


def format_ms(value: float | None) -> str:
    """Milliseconds with 3 significant digits (whole below 1000), "n/a" for a missing time."""
    if value is None:
        return "n/a"
    return f"{value:.3g}" if value < 1000 else f"{value:.0f}"


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MIB:.1f}"


def _psnr(row: dict) -> str:
    if row["status"] != "ok" or row["finite"] is None:
        return "n/a"
    if not row["finite"]:
        return "non-finite"
    return "identical" if row["psnr_db"] is None else f"{row['psnr_db']:.1f}"


def _speedup(row: dict) -> str:
    if row["speedup_vs_diffusers"] is None:
        return "n/a"
    if row["variant"] == "diffusers":
        return "1 (baseline)"
    other = row.get("comparison", "same model") != "same model"
    return f"{row['speedup_vs_diffusers']:.2f}x" + (f" ({row['comparison']}, not the same model)" if other else "")


def header_lines(result: dict) -> list[str]:
    device, versions = result["device"], result["versions"]
    settings = result["settings"]
    card = device["name"] + (f", driver {device['driver']}" if device.get("driver") else "")
    if device["type"] == "cpu":
        card += f" ({device['cpu_count']} cores, {device['torch_threads']} torch threads)"
    return [
        f"**{card}** · {result['date'][:10]} · torch {versions['torch']} · triton {versions['triton']} · "
        f"diffusers {versions['diffusers']} · fastdec {versions['fastdec']} · {settings['dtype']} · "
        f"weights: {'random' if settings['weights'] == 'random' else 'real'}",
        "",
        f"`{result['command']}`",
        *(["", load_line(result["load_average"])] if result.get("load_average") else []),
    ]


def load_line(load: dict) -> str:
    """The machine's load during the run, in words (busy machines give noisy times)."""
    if load["start"] is None:
        return "load average: not available on this OS"
    line = (f"load average (1 min) {load['start'][0]:.2f} at the start, {load['end'][0]:.2f} at the end, on "
            f"{load['cpu_count']} cores with {load['torch_threads']} torch threads")
    if load.get("busy_cores_at_start") is not None:
        line += f" ({load.get('threads_chosen', 'set by --threads')}; {load['busy_cores_at_start']:.1f} cores busy " \
                "with other processes at the start)"
    if load["busy"]:
        line += ": the machine was busy during the run, times are noisy (goals say inconclusive when it shows)"
    return line


def summary_table(result: dict) -> list[str]:
    """One line per decoder, size and batch: the median ms of each variant, fastdec's speed-up, memory, PSNR."""
    rows, goals = result["rows"], result["goals"]
    present = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    head = ["decoder", "image", "batch", *(f"{VARIANT_LABELS[v]} ms" for v in present),
            "fastdec speed-up vs diffusers eager", "peak MiB fastdec / diffusers", "fastdec PSNR dB", "goal"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = list(dict.fromkeys((r["decoder"], r["resolution"], r["batch"]) for r in rows))
    for decoder, side, batch in keys:
        case = {r["variant"]: r for r in rows if (r["decoder"], r["resolution"], r["batch"]) == (decoder, side, batch)}
        fused, eager = case.get("fastdec"), case.get("diffusers")
        times = [format_ms(case[v]["median_ms"]) if v in case else "n/a" for v in present]
        memory = f"{_mib(fused and fused['peak_memory_bytes'])} / {_mib(eager and eager['peak_memory_bytes'])}"
        goal_marks = "; ".join(mark for mark in (goal_for_row(case[v], goals) for v in case) if mark)
        lines.append("| " + " | ".join([decoder, image_label(next(iter(case.values()))), str(batch), *times,
                                        _speedup(fused) if fused else "n/a",
                                        memory, _psnr(fused) if fused else "n/a", goal_marks or "–"]) + " |")
    return lines


def image_label(row: dict) -> str:
    """"1024²" for a square image, "480x832" (height x width) otherwise."""
    side, height = row["resolution"], row.get("height", row["resolution"])
    return f"{side}²" if height == side else f"{height}x{side}"


def _measured_cells(row: dict, error_digits: int) -> list[str]:
    error = "n/a" if row["max_abs_error"] is None else f"{row['max_abs_error']:.{error_digits}e}"
    return [format_ms(row["median_ms"]), format_ms(row["iqr_ms"]),
            "–" if row["compile_s"] is None else f"{row['compile_s']:.1f}", _mib(row["peak_memory_bytes"]), error,
            _psnr(row), _speedup(row)]


def full_table(result: dict) -> list[str]:
    head = ["decoder", "image", "batch", "variant", "backend", "median ms", "IQR ms", "min–max ms", "compile s",
            "peak MiB", "max abs err", "PSNR dB", "vs diffusers", "goal"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["rows"]:
        if row["status"] == "ok":
            cells = _measured_cells(row, 2)
            cells.insert(2, f"{format_ms(row['min_ms'])}–{format_ms(row['max_ms'])}")
        else:
            cells = [f"{row['status']}: {row['reason']}", *["–"] * 7]
        lines.append("| " + " | ".join([row["decoder"], image_label(row), str(row["batch"]), row["label"],
                                        row["backend"] or "–", *cells, goal_for_row(row, result["goals"]) or "–"])
                     + " |")
    return lines


def goals_table(result: dict) -> list[str]:
    lines = ["| goal | set against | measured | status |", "|---|---|---|---|"]
    for goal in result["goals"]:
        value = goal["value"]
        if value is None:
            measured = "–"
        elif goal["metric"] == "peak_memory_bytes":
            measured = f"{value / GIB:.2f} GiB"
        elif goal["metric"] == "median_ms":
            measured = f"{value:.3g} ms"
        elif goal["metric"] == "speedup_vs_sd_vae_eager":
            measured = f"{value:.1f}x ({goal['decoder']})"
        else:
            measured = f"worst x{value:.2f} of diffusers time ({goal['decoder']})"
        status = goal["status"] + (f" ({goal['why']})" if goal.get("why") else "")
        lines.append(f"| {goal['goal']} | {goal['baseline']} | {measured} | {status} |")
    return lines


def pipeline_lines(result: dict) -> list[str]:
    lines = []
    for share in result.get("pipeline_share") or []:
        unet = share["unet_step"]
        lines += ["", f"Pipeline share, {share['resolution']}² batch {share['batch']}: one UNet step "
                      f"{format_ms(unet['median_ms'])} ms (IQR {format_ms(unet['iqr_ms'])}); {share['unet_label']}; "
                      "a run is steps x UNet step + one decode; speed-up is against the same run with diffusers' "
                      "SD-VAE", ""]
        labels = list(share["decoders"])
        head = ["steps", *(f"{label}: decode share / total ms / speed-up" for label in labels)]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for entry in share["steps"]:
            cells = [f"{entry['decode_share'][label]:.1%} / {format_ms(entry['total_ms'][label])} / "
                     f"{entry['speedup_vs_diffusers'].get(label, float('nan')):.2f}x" for label in labels]
            lines.append("| " + " | ".join([str(entry["steps"]), *cells]) + " |")
    return lines


def render_markdown(result: dict, full: bool = True) -> str:
    """bench.md: header, summary table, goals, pipeline share and (full=True) every row with its spread."""
    lines = [*header_lines(result), "", *summary_table(result), "", *goals_table(result), *pipeline_lines(result)]
    if full:
        lines += ["", "All rows (median over interleaved rounds; IQR and min–max show the spread; PSNR against the "
                      "fp32 reference-ops output):", "", *full_table(result)]
    return "\n".join(lines) + "\n"


def print_rich(result: dict) -> None:
    """The result as rich tables on a terminal."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print("\n".join(header_lines(result)).replace("**", ""))
    table = Table(show_lines=False)
    for column in ("decoder", "image", "batch", "variant", "median ms", "IQR ms", "compile s", "peak MiB",
                   "max abs err", "PSNR dB", "vs diffusers", "goal"):
        table.add_column(column, justify="right" if column not in ("decoder", "variant", "goal") else "left")
    for row in result["rows"]:
        if row["status"] == "ok":
            cells = _measured_cells(row, 1)
        else:
            cells = [row["status"], *[""] * 6]
        table.add_row(row["decoder"], str(row["resolution"]), str(row["batch"]), row["label"], *cells,
                      goal_for_row(row, result["goals"]))
    console.print(table)
    console.print("\n".join(goals_table(result) + pipeline_lines(result)))
    console.print(f"fastdec backend here: {fused_backend(torch.device(result['device']['type']))}")


def log_ticks(low: float, high: float) -> list[float]:
    """1-2-5 ticks for a log axis from below ``low`` to above ``high``: at least three, at most about a dozen."""
    steps = [mantissa * 10.0**exponent for exponent in range(math.floor(math.log10(low)) - 2,
                                                             math.ceil(math.log10(high)) + 2)
             for mantissa in (1, 2, 5)]
    first = max(index for index, step in enumerate(steps) if step <= low * (1 + 1e-9))
    last = min(index for index, step in enumerate(steps) if step >= high * (1 - 1e-9))
    first = min(first, last - 2)  # three labelled ticks even when all values sit between two steps
    ticks = steps[first:last + 1]
    if len(ticks) <= 12:
        return ticks
    return [10.0**exponent for exponent in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)]


PLOT_DPI = 110
MAX_PLOT_INCHES = 14.5  # 1595 px at PLOT_DPI: a normal screen's width


def _legend_label(rows: list[dict], variant: str) -> str:
    """The label of a variant's bars: its rows' label (fastdec's names the backend that ran) when they agree."""
    labels = list(dict.fromkeys(r["label"] for r in rows if r["variant"] == variant))
    return labels[0] if len(labels) == 1 else VARIANT_LABELS[variant]


def _tick_label(rows: list[dict], decoder: str) -> str:
    comparison = next((r.get("comparison") for r in rows if r["decoder"] == decoder), "same model")
    return decoder if comparison in (None, "same model") else f"{decoder}\n(diffusers bar: {comparison})"


def _plot_title(result: dict) -> str:
    device = result["device"]
    title = f"fastdec bench on {device['name']}"
    if device["type"] == "cpu":
        title += f" ({device['cpu_count']} cores)"
    title += f", {result['date'][:10]}"
    load = result.get("load_average")
    if load and load.get("start") is not None:
        threads = load["torch_threads"]
        title += (f"\nload average {load['start'][0]:.2f} at the start, {load['end'][0]:.2f} at the end; "
                  f"{threads} torch thread{'s' if threads != 1 else ''}"
                  + ("\nbusy machine: noisy times" if load["busy"] else ""))
    return title


def figure_of(result: dict):
    """The bench.png figure: per size/batch, median time per decoder and variant (log scale, IQR error bars) above
    peak memory; every log axis labelled at 1-2-5 steps. Panels stack vertically and the width is capped at
    MAX_PLOT_INCHES, so it fits a normal screen whatever the number of decoders."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    rows = result["rows"]
    configs = list(dict.fromkeys((r["resolution"], r["batch"]) for r in rows))
    decoders = list(dict.fromkeys(r["decoder"] for r in rows))
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    width_inches = min(MAX_PLOT_INCHES, max(7.5, 3.0 + 1.1 * len(decoders)))
    figure, axes = plt.subplots(2 * len(configs), 1, figsize=(width_inches, 1.2 + 3.4 * 2 * len(configs)),
                                squeeze=False)
    width = 0.8 / len(variants)
    for config_index, (side, batch) in enumerate(configs):
        time_axis, memory_axis = axes[2 * config_index, 0], axes[2 * config_index + 1, 0]
        shown: tuple[list[float], list[float]] = ([], [])  # every plotted value (error bars too), per panel
        for index, variant in enumerate(variants):
            xs, times, low, high, memory_xs, memory = [], [], [], [], [], []
            for position, decoder in enumerate(decoders):
                row = find_row(rows, decoder, variant, side, batch)
                if row is None:
                    continue
                x = position + (index - (len(variants) - 1) / 2) * width
                xs.append(x)
                times.append(row["median_ms"])
                low.append(row["median_ms"] - row["q25_ms"])
                high.append(row["q75_ms"] - row["median_ms"])
                shown[0].extend((row["q25_ms"], row["q75_ms"]))
                if row["peak_memory_bytes"] is not None:
                    memory_xs.append(x)
                    memory.append(max(row["peak_memory_bytes"] / MIB, 1e-3))
                    shown[1].append(memory[-1])
            label = _legend_label(rows, variant)
            time_axis.bar(xs, times, width, yerr=[low, high], capsize=2, label=label)
            memory_axis.bar(memory_xs, memory, width, label=label)
        for axis, values, ylabel in ((time_axis, shown[0], "time per call, ms\n(median, IQR)"),
                                     (memory_axis, shown[1], "peak extra memory, MiB")):
            axis.set_yscale("log")
            values = [value for value in values if value > 0]
            if values:
                ticks = log_ticks(min(values), max(values))
                axis.set_ylim(ticks[0], ticks[-1])
                axis.set_yticks(ticks, [f"{tick:g}" for tick in ticks])
                axis.yaxis.set_minor_formatter(NullFormatter())
            axis.set_xticks(range(len(decoders)), [_tick_label(rows, d) for d in decoders], rotation=20, ha="right",
                            fontsize="small")
            axis.set_ylabel(ylabel)
            axis.grid(axis="y", which="both", alpha=0.3)
        time_axis.set_title(f"{side}x{side}, batch {batch}, {result['settings']['dtype']}")
    axes[0, 0].legend(fontsize="small")
    figure.suptitle(_plot_title(result))
    figure.tight_layout()
    return figure


def plot(result: dict, path: Path) -> None:
    """Writes bench.png (figure_of)."""
    import matplotlib.pyplot as plt

    figure = figure_of(result)
    figure.savefig(path, dpi=PLOT_DPI)
    plt.close(figure)


def write_outputs(result: dict, directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / "bench.json", directory / "bench.png", directory / "bench.md"]
    paths[0].write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    plot(result, paths[1])
    paths[2].write_text(render_markdown(result))
    return paths

