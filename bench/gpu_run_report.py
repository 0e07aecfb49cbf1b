"""The last step of bench/gpu_run.sh: one JSON and one markdown file for the whole run.

    python bench/gpu_run_report.py OUT_DIR [--smoke]

Reads what the steps left in OUT_DIR (steps.tsv, tests.xml, gpu_check/*.json, decoders/, video/ and tiling/ from
fastdec bench, attention_table.py from --tune) and writes OUT_DIR/gpu_run.json (every report embedded, so the one
file holds the whole run) and OUT_DIR/gpu_run.md (the environment, the steps, then each report's own markdown).
Exit status 1 when a step failed or timed out, a test failed or a gpu_check row is wrong.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent


def read_steps(out: Path) -> list[dict]:
    steps = []
    for line in (out / "steps.tsv").read_text().splitlines() if (out / "steps.tsv").exists() else []:
        name, status, seconds = line.split("\t")
        steps.append({"step": name, "status": status, "seconds": int(seconds)})
    return steps


def read_tests(out: Path) -> dict | None:
    """pytest's junit counts and the failed tests' names."""
    path = out / "tests.xml"
    if not path.exists():
        return None
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    keys = ("tests", "failures", "errors", "skipped")
    counts = {key: sum(int(suite.get(key, 0)) for suite in suites) for key in keys}
    failed = [f"{case.get('classname')}::{case.get('name')}" for suite in suites for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {**counts, "failed": failed}


def read_reports(out: Path) -> dict:
    """{name: (json, markdown)} of every report a step wrote."""
    found = {}
    paths = [("gpu_check", path) for path in sorted(out.glob("gpu_check/*.json"))]
    paths += [(path.parent.name, path) for path in sorted(out.glob("*/bench.json"))]  # one per fastdec bench step
    paths += [("tiling", path) for path in sorted(out.glob("tiling/tiling.json"))]
    for name, path in paths:
        markdown = path.with_suffix(".md")
        found[name] = (json.loads(path.read_text()), markdown.read_text() if markdown.exists() else "")
    return found


def build(out: Path, smoke: bool) -> tuple[dict, str]:
    environment = runpy.run_path(str(BENCH / "gpu_check.py"))["environment"]  # the environment gpu_check reports
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    steps, tests, reports = read_steps(out), read_tests(out), read_reports(out)
    table = out / "attention_table.py"
    rows = reports.get("gpu_check", ({}, ""))[0].get("rows", [])
    problems = [f"step {s['step']}: {s['status']}" for s in steps if s["status"] != "ok"]
    if tests is not None and (tests["failures"] or tests["errors"]):
        problems.append(f"tests: {tests['failures']} failed, {tests['errors']} errors: {', '.join(tests['failed'])}")
    problems += [f"gpu_check: {r['op']} {r['shape']} {r['dtype']} error {r['rel_error']:.2e} > {r['error_limit']}"
                 for r in rows if not r["correct"]]
    problems += [f"gpu_check: {error}" for error in reports.get("gpu_check", ({}, ""))[0].get("errors", [])]
    report = {"environment": environment(device), "smoke": smoke, "steps": steps, "tests": tests,
              "reports": {name: data for name, (data, _) in reports.items()}, "problems": problems,
              "attention_table": table.read_text() if table.exists() else None}
    env = report["environment"]
    lines = [f"# fastdec GPU run — {env['device']}, {env['date']}{' (smoke, CPU)' if smoke else ''}", "",
             f"torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, fastdec {env['fastdec']}, driver "
             f"{env.get('driver')}, python {env['python']}", "", "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in steps]
    if tests is not None:
        lines += ["", f"Tests: {tests['tests']} run, {tests['failures']} failed, {tests['errors']} errors, "
                      f"{tests['skipped']} skipped" + (f": {', '.join(tests['failed'])}" if tests["failed"] else "")]
    lines += ["", "Problems: " + ("; ".join(problems) if problems else "none")]
    for name, (_, markdown) in reports.items():
        body = markdown.split("\n", 1)[1] if markdown.startswith("# ") else markdown  # one title per file
        lines += ["", f"## {name}", "", body.strip()]
    probe = out / "attention_probe.json"  # bench/attention_key_tail_probe.py
    if probe.exists():
        report["attention_probe"] = json.loads(probe.read_text())
        lines += ["", "## attention_probe", "",
                  "| call | keys | D split | key tail peeled | tile (m, n, dv, warps, stages) | key tail | max error | "
                  "correct |", "|---|---|---|---|---|---|---|---|"]
        for r in report["attention_probe"]["rows"]:
            tile = ", ".join(str(r.get(name, "?")) for name in ("block_m", "block_n", "block_dv", "num_warps",
                                                                "num_stages"))
            lines.append(f"| {r['call']} | {r['keys']} | {r['split']} | {r.get('peel', True)} | {tile} | "
                         f"{r.get('key_tail', '?')} | "
                         f"{r.get('max_abs_error', r.get('error'))} | {r['correct']} |")
    if report["attention_table"] is not None:
        lines += ["", "## attention table (--tune): copy to kernels/support/attention_table.py", "", "```python",
                  report["attention_table"].strip(), "```"]
    return report, "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="bench/gpu_run.sh's output folder")
    parser.add_argument("--smoke", action="store_true", help="the run was gpu_run.sh --smoke (CPU)")
    args = parser.parse_args(argv)
    report, markdown = build(args.out, args.smoke)
    (args.out / "gpu_run.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (args.out / "gpu_run.md").write_text(markdown)
    print(markdown)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
