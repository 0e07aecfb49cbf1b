"""The goals a run is judged against (GPU goals come from the decoder entries) and their status."""

from __future__ import annotations

from fastdec.bench.decoders import GPU_GOALS, LIGHTWEIGHT
from fastdec.bench.spec import GIB

LIGHTWEIGHT_SPEEDUP_GOAL = 25.0
RERUN = "rerun with --threads 1 / on an idle machine"
# "Slower than diffusers" needs the whole paired-ratio IQR above 1 + this, on a machine that was not busy: two runs
# of the same code differ by a few percent on an idle CPU, and by far more under load.
CPU_NOISE_MARGIN = 0.05


def verdict(low: float, high: float, limit: float) -> str:
    """"met" / "not met" / "inconclusive" for a figure that must be <= ``limit``, from its spread [low, high]: a
    verdict only when the whole spread is on one side of the limit."""
    if high <= limit:
        return "met"
    if low > limit:
        return "not met"
    return "inconclusive"


def row_spread(row: dict, metric: str) -> tuple[float, float]:
    """The interquartile spread of a row's figure: paired-ratio quartiles, time quartiles; memory is one value."""
    if metric == "ratio_vs_diffusers":
        return row["ratio_q25"], row["ratio_q75"]
    if metric == "median_ms":
        return row["q25_ms"], row["q75_ms"]
    return row[metric], row[metric]


def find_row(rows: list[dict], decoder: str, variant: str, side: int, batch: int) -> dict | None:
    return next((r for r in rows if (r["decoder"], r["variant"], r["resolution"], r["batch"]) ==
                 (decoder, variant, side, batch) and r["median_ms"] is not None
                 and r.get("height", side) == side), None)  # goals are stated for square images


def cpu_ratio_verdict(row: dict, busy: bool) -> str:
    """"met" / "not met" / "inconclusive" for "fastdec is not slower than diffusers" on one CPU row: never "not
    met" within CPU_NOISE_MARGIN of equal times, nor on a busy machine."""
    low, high = row_spread(row, "ratio_vs_diffusers")
    status = verdict(low, high, 1.0)
    if status == "not met" and (busy or low <= 1.0 + CPU_NOISE_MARGIN):
        return "inconclusive"
    return status


def _row_key(row: dict) -> str:
    return f"{row['decoder']}/{row['resolution']}/{row['batch']}"


def evaluate_goals(rows: list[dict], device: str, dtype: str, busy: bool = False) -> list[dict]:
    """Every goal with status "met", "not met", "inconclusive" (the spread straddles the limit, or the machine was
    ``busy``) or "not measured here" (and why)."""
    on_gpu = device == "cuda" and dtype == "bfloat16"
    goals = []
    for goal in GPU_GOALS:
        entry = {"goal": f"{goal.text} {goal.short()}", "decoder": goal.decoder, "variant": goal.variant,
                 "resolution": goal.resolution, "batch": goal.batch, "limit": goal.limit, "metric": goal.metric,
                 "baseline": goal.baseline, "value": None}
        row = find_row(rows, goal.decoder, goal.variant, goal.resolution, goal.batch)
        if not on_gpu:
            entry.update(status="not measured here", why=f"a CUDA bf16 goal; this run: {device} {dtype}")
        elif row is None or row[goal.metric] is None:
            entry.update(status="not measured here",
                         why=f"{goal.decoder} {goal.resolution}px batch {goal.batch} is not in this run")
        else:
            low, high = row_spread(row, goal.metric)
            status = verdict(low, high, goal.limit)
            entry.update(value=row[goal.metric], status=status)
            if status == "inconclusive":
                entry["why"] = f"noisy: the IQR {low:.3g}-{high:.3g} includes the limit; {RERUN}"
        goals.append(entry)
    configs = sorted({(r["resolution"], r["batch"]) for r in rows})
    for side, batch in configs:
        entry = {"goal": f"best lightweight decoder >= {LIGHTWEIGHT_SPEEDUP_GOAL:g}x faster than diffusers SD-VAE "
                         f"eager, {side}px batch {batch}", "decoder": None, "variant": "fastdec", "resolution": side,
                 "batch": batch, "limit": LIGHTWEIGHT_SPEEDUP_GOAL, "metric": "speedup_vs_sd_vae_eager",
                 "baseline": "diffusers AutoencoderKL eager, same run", "value": None}
        sd_eager = find_row(rows, "sd-vae", "diffusers", side, batch)
        best = min((r for r in (find_row(rows, name, "fastdec", side, batch) for name in LIGHTWEIGHT) if r),
                   key=lambda r: r["median_ms"], default=None)
        if not on_gpu:
            entry.update(status="not measured here", why=f"a CUDA bf16 goal; this run: {device} {dtype}")
        elif sd_eager is None or best is None:
            entry.update(status="not measured here", why="needs sd-vae and a lightweight decoder in the run")
        else:
            speedup = sd_eager["median_ms"] / best["median_ms"]
            # Two decoders are not timed in the same rounds: the spread is the quartiles' worst and best pairing.
            low, high = sd_eager["q25_ms"] / best["q75_ms"], sd_eager["q75_ms"] / best["q25_ms"]
            status = verdict(1 / high, 1 / low, 1 / LIGHTWEIGHT_SPEEDUP_GOAL)
            entry.update(decoder=best["decoder"], value=speedup, status=status)
            if status == "inconclusive":
                entry["why"] = f"noisy: x{low:.1f}-x{high:.1f} from the quartiles includes the goal; {RERUN}"
        goals.append(entry)
    cpu_goal = {"goal": "CPU: no fastdec decoder slower than the same architecture in diffusers eager",
                "decoder": None, "variant": "fastdec", "resolution": None, "batch": None, "limit": 1.0,
                "metric": "ratio_vs_diffusers", "baseline": "diffusers eager, same run, interleaved", "value": None}
    compared = [r for r in rows if r["variant"] == "fastdec" and r["ratio_vs_diffusers"] is not None
                and r.get("comparison", "same model") == "same model"]  # not taew2_1 vs AutoencoderKLWan
    if device != "cpu":
        cpu_goal.update(status="not measured here", why=f"a CPU goal; this run: {device}")
    elif any("interpreter" in r["backend"] for r in compared):
        cpu_goal.update(status="not measured here",
                        why="fastdec's Triton ops ran in Triton's interpreter (FASTDEC_TRITON_INTERPRET=1): no speed "
                            "figure; run without it")
    elif not compared:
        cpu_goal.update(status="not measured here", why="no decoder with a diffusers equivalent in the run")
    else:
        def described(r: dict) -> str:
            return (f"{r['decoder']} {r['resolution']}px b{r['batch']} x{r['ratio_vs_diffusers']:.2f} "
                    f"(IQR x{r['ratio_q25']:.2f}-x{r['ratio_q75']:.2f})")

        verdicts = {id(r): cpu_ratio_verdict(r, busy) for r in compared}
        cpu_goal["row_status"] = {_row_key(r): verdicts[id(r)] for r in compared}
        slower = [described(r) for r in compared if verdicts[id(r)] == "not met"]
        unsure = [described(r) for r in compared if verdicts[id(r)] == "inconclusive"]
        worst = max(compared, key=lambda r: r["ratio_vs_diffusers"])
        cpu_goal.update(value=worst["ratio_vs_diffusers"], decoder=worst["decoder"], why=None, status="met")
        if slower:
            cpu_goal.update(status="not met", why="slower: " + ", ".join(slower)
                            + (f"; inconclusive: {', '.join(unsure)}" if unsure else ""))
        elif unsure:
            cpu_goal.update(status="inconclusive", why=f"noisy: {', '.join(unsure)}: the paired ratio's IQR "
                                                       f"includes 1 (+{CPU_NOISE_MARGIN:.0%})"
                                                       f"{' or the machine was busy' if busy else ''}; {RERUN}")
    goals.append(cpu_goal)
    return goals


def goal_for_row(row: dict, goals: list[dict]) -> str:
    """The goal column of a result row: the goals that name this row's figure, with their status."""
    marks = []
    for goal in goals:
        if goal["status"] == "not measured here" or goal["variant"] != row["variant"]:
            continue
        if goal["metric"] == "ratio_vs_diffusers":
            status = goal.get("row_status", {}).get(_row_key(row))
            if status is not None:
                marks.append(f"not slower than diffusers: {status}" + (" (noisy)" if status == "inconclusive" else ""))
        elif (goal["decoder"], goal["resolution"], goal["batch"], goal["resolution"]) == (
                row["decoder"], row["resolution"], row["batch"], row.get("height", row["resolution"])):
            if goal["metric"] == "speedup_vs_sd_vae_eager":
                marks.append(f">= {goal['limit']:g}x vs SD-VAE eager: {goal['status']} ({goal['value']:.1f}x)")
            else:
                memory = goal["metric"] == "peak_memory_bytes"
                limit = f"{goal['limit'] / GIB:g} GiB" if memory else f"{goal['limit']:g} ms"
                marks.append(f"<= {limit}: {goal['status']}")
    return "; ".join(marks)

