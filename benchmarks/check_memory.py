"""Compare the peak GPU memory of two pytest-benchmark runs; fail when a benchmark's peak grew.

pytest-benchmark's --benchmark-compare-fail judges time statistics only. The training benchmarks
(benchmarks/test_bench_train.py) put the allocator's peak in extra_info.peak_bytes, and estimate_memory's
error against it in extra_info.peak_error_pct; this script checks those between a baseline run and the
current one, both saved by --benchmark-autosave, --benchmark-save or --benchmark-json.

Example:
    python benchmarks/check_memory.py .benchmarks/H100/Linux-CPython-3.12-64bit/0007_abc.json \\
        current.json --max-increase-pct 5 --max-estimate-error-pct 5

Exit status: 0 no regression, 1 a peak grew past --max-increase-pct (or an estimate is off by more than
--max-estimate-error-pct), 2 bad input (missing or unreadable file, not a pytest-benchmark run, or no
benchmark of the current run has a peak_bytes).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional

from tabulate import tabulate

MiB = 1024 ** 2


class InputError(Exception):
    """A file that is not a readable pytest-benchmark run."""


@dataclass(frozen=True)
class Row:
    """One benchmark's peak in both runs; bytes are None where that run has no such benchmark."""

    fullname: str
    group: Optional[str]
    baseline_bytes: Optional[int]
    current_bytes: Optional[int]
    change_pct: Optional[float]
    estimate_error_pct: Optional[float]
    grew: bool = False  # the peak grew past the allowed increase
    estimate_off: bool = False  # |estimate error| past the allowed one

    @property
    def failed(self) -> bool:
        return self.grew or self.estimate_off

    @property
    def status(self) -> str:
        if self.current_bytes is None:
            return "missing"
        flags = [flag for flag, on in (("REGRESSION", self.grew), ("ESTIMATE", self.estimate_off)) if on]
        if flags:
            return "+".join(flags)
        return "new" if self.baseline_bytes is None else "ok"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_peaks(path: str) -> Dict[str, dict]:
    """fullname -> benchmark entry, for the benchmarks of a saved run that have extra_info.peak_bytes.

    Raises:
        InputError: the file is missing, not JSON, or has no `benchmarks` list.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise InputError(f"{path} is not JSON: {exc}") from None
    benchmarks = data.get("benchmarks") if isinstance(data, dict) else None
    if not isinstance(benchmarks, list):
        raise InputError(f"{path} is not a pytest-benchmark run: no 'benchmarks' list.")
    peaks = {}
    for bench in benchmarks:
        if not isinstance(bench, dict) or "fullname" not in bench:
            raise InputError(f"{path}: a benchmark entry without 'fullname'.")
        peak = (bench.get("extra_info") or {}).get("peak_bytes")
        if peak is None:
            continue  # a timing-only benchmark (the estimation core, the CPU smoke run)
        if not _number(peak) or peak < 0:
            raise InputError(f"{path}: {bench['fullname']} has a bad peak_bytes {peak!r}.")
        error = bench["extra_info"].get("peak_error_pct")
        if error is not None and not _number(error):
            raise InputError(f"{path}: {bench['fullname']} has a bad peak_error_pct {error!r}.")
        peaks[bench["fullname"]] = bench
    return peaks


def change_pct(baseline: float, current: float) -> float:
    """Growth of current over baseline in percent (inf when a zero baseline grew)."""
    if baseline == 0:
        return 0.0 if current == 0 else math.inf
    return 100.0 * (current - baseline) / baseline


def compare(baseline: Dict[str, dict], current: Dict[str, dict], max_increase_pct: float,
            max_estimate_error_pct: Optional[float] = None) -> List[Row]:
    """One Row per benchmark in either run, current run's order first, then those only in the baseline."""
    rows = []
    for name, bench in current.items():
        now = bench["extra_info"]["peak_bytes"]
        error = bench["extra_info"].get("peak_error_pct")
        before = baseline[name]["extra_info"]["peak_bytes"] if name in baseline else None
        pct = None if before is None else change_pct(before, now)
        rows.append(Row(name, bench.get("group"), before, now, pct, error,
                        grew=pct is not None and pct > max_increase_pct,
                        estimate_off=(max_estimate_error_pct is not None and error is not None
                                      and abs(error) > max_estimate_error_pct)))
    for name, bench in baseline.items():
        if name not in current:
            rows.append(Row(name, bench.get("group"), bench["extra_info"]["peak_bytes"], None, None, None))
    return rows


def render(rows: List[Row]) -> str:
    """The rows as a table, peaks in MiB."""
    def mib(b):
        return None if b is None else b / MiB

    table = [(r.fullname.rsplit("/", 1)[-1], r.group, mib(r.baseline_bytes), mib(r.current_bytes),
              r.change_pct, r.estimate_error_pct, r.status) for r in rows]
    return tabulate(table, headers=("benchmark", "group", "baseline MiB", "current MiB", "change %",
                                    "estimate err %", "status"),
                    floatfmt=("", "", ".1f", ".1f", "+.2f", "+.2f", ""), missingval="-")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Fail when a benchmark's peak GPU memory (extra_info.peak_bytes) grew between two "
                    "pytest-benchmark runs.",
        epilog="exit status: 0 ok, 1 regression, 2 bad input")
    parser.add_argument("baseline", help="pytest-benchmark JSON of the baseline run")
    parser.add_argument("current", help="pytest-benchmark JSON of the current run")
    parser.add_argument("--max-increase-pct", type=float, default=5.0,
                        help="largest allowed growth of a peak, in percent (default 5)")
    parser.add_argument("--max-estimate-error-pct", type=float, default=None,
                        help="also fail when |extra_info.peak_error_pct| (estimate vs measured) exceeds this")
    args = parser.parse_args(argv)
    for flag in ("max_increase_pct", "max_estimate_error_pct"):
        value = getattr(args, flag)
        if value is not None and not (value >= 0 and math.isfinite(value)):
            parser.error(f"--{flag.replace('_', '-')} must be a finite number >= 0, got {value}.")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        baseline, current = load_peaks(args.baseline), load_peaks(args.current)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not current:
        print(f"error: no benchmark in {args.current} has extra_info.peak_bytes "
              f"(were the CUDA benchmarks skipped?).", file=sys.stderr)
        return 2
    rows = compare(baseline, current, args.max_increase_pct, args.max_estimate_error_pct)
    print(render(rows))
    grew, off = sum(r.grew for r in rows), sum(r.estimate_off for r in rows)
    summary = f"{len(rows)} benchmarks; {grew} peak(s) grew more than {args.max_increase_pct:g}%"
    if args.max_estimate_error_pct is not None:
        summary += f"; {off} estimate(s) off by more than {args.max_estimate_error_pct:g}%"
    print(f"\n{summary}.")
    return 1 if grew or off else 0


if __name__ == "__main__":
    sys.exit(main())
