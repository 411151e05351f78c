"""The analytic model held to the trace at full width (issue 23, item 6): every preset, every method PEFT has,
cut to a few layers, traced (transformers + PEFT on fake tensors) and estimated; the worst phase's difference
per case, worst first.

    python scripts/audit_analytic.py [--layers N] [--seq-len 512] [--json out.json] [PRESET ...]

At full depth by default: the trace sums a cut of one or two layers per layer kind, so depth costs it nothing.

A difference over 1% is a finding: one of the two is wrong, and the fix goes where the real step says.
"""

import argparse
import json
import sys
import time
import warnings

import lorabench
from lorabench.errors import LorabenchError
from lorabench.models.presets import PRESETS

METHODS = ("full", "lora", "dora", "lora-fa", "lora-plus", "vera")  # delta-lora has no PEFT implementation
PHASES = ("forward", "backward", "optimizer")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("presets", nargs="*", help="presets to audit (default: all)")
    ap.add_argument("--layers", type=int, default=None, help="cut every model to N layers (default: full depth)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--targets", default="all-linear")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a setup keyword of lorabench.estimate (grad_checkpointing=true, loop=plain, dtype=fp32...)")
    args = ap.parse_args()
    warnings.simplefilter("ignore", lorabench.LorabenchNote)
    setup = {k: {"true": True, "false": False}.get(v.lower(), v)
             for k, v in (item.split("=", 1) for item in args.set)}
    rows = []
    for name in args.presets or sorted(PRESETS):
        for method in METHODS:
            kw = dict(model=name, method=method, rank=16, targets=None if method == "full" else args.targets,
                      layers=args.layers, seq_len=args.seq_len, batch_size=1, impl="peft", **setup)
            started = time.perf_counter()
            try:
                analytic = lorabench.estimate(engine="analytic", **kw)[0]
                traced = lorabench.estimate(engine="trace", **kw)[0]
            except LorabenchError as exc:
                print(f"{name:24} {method:10} refused: {exc}", flush=True)
                continue
            diffs = {p: (analytic[f"{p}_peak_bytes"] - traced[f"{p}_peak_bytes"]) / traced[f"{p}_peak_bytes"]
                     for p in PHASES}
            worst = max(diffs, key=lambda p: abs(diffs[p]))
            rows.append({"model": name, "method": method, "worst_phase": worst, "worst_pct": 100 * diffs[worst],
                         **{f"{p}_pct": 100 * d for p, d in diffs.items()},
                         "traced_peak_bytes": traced["peak_bytes"], "analytic_peak_bytes": analytic["peak_bytes"],
                         "trainable_equal": analytic["trainable_params"] == traced["trainable_params"],
                         "seconds": round(time.perf_counter() - started, 1)})
            r = rows[-1]
            print(f"{name:24} {method:10} {r['worst_phase']:9} {r['worst_pct']:+7.2f}%  counts "
                  f"{'equal' if r['trainable_equal'] else 'DIFFER'}  ({r['seconds']} s)", flush=True)
    rows.sort(key=lambda r: -abs(r["worst_pct"]))
    off = [r for r in rows if abs(r["worst_pct"]) > 1 or not r["trainable_equal"]]
    print(f"\n{len(rows)} cases; {len(off)} over 1% or with counts that differ:")
    for r in off:
        print(f"  {r['model']:24} {r['method']:10} {r['worst_phase']:9} {r['worst_pct']:+7.2f}%")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
