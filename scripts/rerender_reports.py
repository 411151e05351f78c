#!/usr/bin/env python3
"""Rebuild report folders (report.md, report.html, results.csv) from their own results.json.

Nothing is estimated or measured again: rows, environment, command and settings stay as recorded, so a
report measured on a GPU can be re-rendered anywhere. The one exception, with --refresh-deep-dive: the
deep dive's comparison table (seed_comparison), which is lorabench's own hand-checked counts and prose, is
replaced by this version's when every count in it is unchanged (only the wording moved on); a count that
differs is an error.

Example:
    python scripts/rerender_reports.py reports/h100-llama-3-8b
    python scripts/rerender_reports.py --refresh-deep-dive reports/*/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lorabench.errors import LorabenchError
from lorabench.report.build import read_results, render_folder
from lorabench.report.deepdive import seed_rows

WORDS = {"seed_trained", "seed_w_updated", "why"}  # prose; every other field is a number or a name


def refreshed_deep_dive(old: list) -> list:
    """This version's seed_comparison rows, provided they agree with old on every count.

    Raises:
        LorabenchError: a count differs (the report would then not be a re-rendering).
    """
    new = seed_rows()
    strip = lambda rows: [{k: v for k, v in r.items() if k not in WORDS} for r in rows]  # noqa: E731
    if strip(new) != strip(old):
        raise LorabenchError("the deep dive's counts differ from the recorded ones; not refreshed.")
    return new


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="report folders holding results.json")
    parser.add_argument("--refresh-deep-dive", action="store_true",
                        help="take this version's wording of the deep dive's table (counts must agree)")
    args = parser.parse_args(argv)
    failed = 0
    for folder in args.folders:
        try:
            report = read_results(folder)
            if args.refresh_deep_dive and report.get("seed_comparison"):
                report["seed_comparison"] = refreshed_deep_dive(report["seed_comparison"])
            print(f"wrote {render_folder(folder, report)}")
        except LorabenchError as exc:
            print(f"{folder}: {exc}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
