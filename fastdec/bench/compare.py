"""``--compare``: new/old median per row of two runs."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from fastdec.bench.render import format_ms


def read_result(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} not found: pass a bench.json written by `fastdec bench --out DIR`")
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from error
    if not isinstance(result, dict) or result.get("kind") != "fastdec-bench":
        raise ValueError(f"{path} is not a fastdec bench result (no \"kind\": \"fastdec-bench\")")
    return result


def compare(old: dict, new: dict) -> str:
    """Markdown: new/old median per decoder/variant/size/batch/dtype, and the geometric mean per variant."""
    def key(row: dict) -> tuple:
        return row["decoder"], row["variant"], row["resolution"], row["batch"], row["dtype"]

    old_rows = {key(r): r for r in old["rows"] if r["median_ms"] is not None}
    new_rows = {key(r): r for r in new["rows"] if r["median_ms"] is not None}
    lines = [f"old: {old['device']['name']} {old['date']} `{old['command']}`",
             f"new: {new['device']['name']} {new['date']} `{new['command']}`"]
    if old["device"]["name"] != new["device"]["name"]:
        lines.append("warning: the runs are from different devices; ratios mix hardware and code changes")
    lines += ["", "| decoder | variant | image | batch | dtype | old ms | new ms | new/old |", "|" + "---|" * 8]
    ratios: dict[str, list[float]] = {}
    for row_key, new_row in new_rows.items():
        if row_key not in old_rows:
            continue
        ratio = new_row["median_ms"] / old_rows[row_key]["median_ms"]
        ratios.setdefault(row_key[1], []).append(ratio)
        decoder, variant, side, batch, dtype = row_key
        lines.append(f"| {decoder} | {variant} | {side}² | {batch} | {dtype} | "
                     f"{format_ms(old_rows[row_key]['median_ms'])} | {format_ms(new_row['median_ms'])} | {ratio:.3f} |")
    lines.append("")
    for variant, values in ratios.items():
        lines.append(f"geometric mean new/old, {variant}: {math.exp(statistics.fmean(map(math.log, values))):.3f} "
                     f"over {len(values)} rows")
    only_old, only_new = sorted(set(old_rows) - set(new_rows)), sorted(set(new_rows) - set(old_rows))
    if only_old:
        lines.append(f"only in old: {len(only_old)} rows, e.g. {only_old[:3]}")
    if only_new:
        lines.append(f"only in new: {len(only_new)} rows, e.g. {only_new[:3]}")
    if not ratios:
        lines.append("no row is in both runs (same decoder, variant, size, batch and dtype)")
    return "\n".join(lines)

