"""Renders the README's results table from the latest ``fastdec bench`` result in bench/results/.

    python bench/make_readme_table.py                 # markdown to stdout
    python bench/make_readme_table.py --write         # rewrite the section between the README's markers
    python bench/make_readme_table.py results.json    # a given result instead of the latest

Results are the bench.json files that ``fastdec bench --out bench/results/<name>`` writes (bench/results/*/bench.json)
or copies of them (bench/results/*.json); other JSON files there (pytest-benchmark runs) are ignored. The latest is
the one with the newest "date". The section in README.md starts and ends with a ``<!-- bench-table -->`` line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastdec.bench import read_result, render_markdown

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MARKER = "<!-- bench-table -->"


def latest_result(directory: Path = RESULTS) -> Path:
    """The fastdec bench result with the newest date under ``directory`` (ValueError when there is none)."""
    dated = []
    for path in sorted({*directory.glob("*.json"), *directory.glob("*/bench.json")}):
        try:
            result = read_result(path)
        except ValueError:  # not JSON, or not a fastdec bench result (pytest-benchmark runs)
            continue
        dated.append((result.get("date", ""), path.stat().st_mtime, path))
    if not dated:
        raise ValueError(
            f"no fastdec bench result in {directory}: run `fastdec bench --out {directory}/<card>-<date>` first"
        )
    return max(dated)[2]


def render(result: dict, source: str) -> str:
    """The README section: bench.md without its full table (the card, the summary, goals), and where it is from."""
    return (render_markdown(result, full=False) + f"\nRendered by `python bench/make_readme_table.py` from `{source}` "
            "(every row with its spread: the bench.md beside it).\n")


def rewrite_section(readme: str, section: str) -> str:
    """``readme`` with the text between its two MARKER lines replaced by ``section``."""
    parts = readme.split(MARKER)
    if len(parts) != 3:
        raise ValueError(
            f"README needs exactly two {MARKER} lines around the results table, found {len(parts) - 1}: add them "
            "where the table goes"
        )
    return f"{parts[0]}{MARKER}\n{section}{MARKER}{parts[2]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("result", nargs="?", help="a bench.json (default: the latest in bench/results)")
    parser.add_argument("--results", default=str(RESULTS), help="folder to look in (default: bench/results)")
    parser.add_argument("--write", action="store_true", help="rewrite the section between the README's markers")
    parser.add_argument("--readme", default=str(ROOT / "README.md"), help="README to rewrite (default: README.md)")
    args = parser.parse_args(argv)
    try:
        path = Path(args.result) if args.result else latest_result(Path(args.results))
        result = read_result(path)
        source = str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path)
        section = render(result, source)
        if args.write:
            readme = Path(args.readme)
            readme.write_text(rewrite_section(readme.read_text(), section))
            print(f"rewrote the results table in {readme} from {path}")
        else:
            print(section, end="")
    except (ValueError, OSError) as error:
        print(f"make_readme_table: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
