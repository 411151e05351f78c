"""Rendering rows of numbers as table, markdown, csv or json. The only place numbers become text."""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Dict, List, Optional, Sequence, Tuple

FORMATS = ("table", "markdown", "csv", "json")
GIB = 1024 ** 3


def gib(n) -> str:
    return "" if n is None else f"{n / GIB:,.2f}"


def count(n) -> str:
    return "" if n is None else f"{n:,}"


def pct(x) -> str:
    if x is None:
        return ""
    return f"{x:.4f}" if x < 1 else f"{x:.2f}"


def mib(n) -> str:
    return "" if n is None else f"{n / 2 ** 20:,.2f}"


def bytes_unit(values) -> Tuple[object, str]:
    """(formatter, unit) for byte counts shown together, one unit for all: GiB, or MiB when all are under
    1 GiB. Two decimals, and three significant digits under a tenth of the unit, so that a 13 MiB adapter beside
    15 GiB of weights reads 0.0127 GiB, not 0.01, nor 13.00 MiB in a column of its own."""
    sizes = [abs(v) for v in values if v]
    unit, name = (GIB, "GiB") if sizes and max(sizes) >= GIB else (2 ** 20, "MiB")

    def fmt(n) -> str:
        if n is None:
            return ""
        x = n / unit
        return f"{x:,.2f}" if x == 0 or abs(x) >= 0.1 else f"{x:.3g}"
    return fmt, name


def ms(v) -> str:
    """Milliseconds: whole above 10 ms, three significant digits below (a tiny model's 0.0327 ms)."""
    if v is None:
        return ""
    return f"{v:,.0f}" if v >= 10 else f"{v:.3g}"


def fixed(digits: int):
    """A formatter with `digits` decimals and thousands separators (tokens/s, TFLOP/s)."""
    return lambda v: "" if v is None else f"{v:,.{digits}f}"


def signed_pct(v) -> str:
    """An error in percent, signed: +0.04."""
    return "" if v is None else f"{v:+.2f}"


def gpus_needed_text(row: Dict) -> str:
    """A memory row's "GPUs (FSDP)": the count, or why none: sharding splits weights, adapters, gradients
    and optimizer state, never the activations, logits and runtime each GPU holds whole."""
    n = row.get("gpus_needed")
    if n is not None:
        return f"{n:,}"
    if row.get("fits") is None:  # no GPU asked for
        return ""
    if (row.get("activations_bytes") or 0) > row.get("gpu_memory_bytes", 0):
        return "none: activations alone exceed one GPU"
    return "none: activations, logits and runtime exceed one GPU"


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:,.1f}" if value >= 100 else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def finite(value):
    """value with every inf or NaN float made None: JSON has neither (json.dumps would write NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


# (row key, column title, formatter) for human-readable tables.
Column = Tuple[str, str, object]

PARAM_COLUMNS: Sequence[Column] = (
    ("method", "method", str), ("rank", "rank", _text), ("trainable_params", "trainable", count),
    ("total_params", "total", count), ("trainable_pct", "trainable %", pct),
    ("pct_of_full", "% of full", pct), ("reduction", "reduction x", _text),
    ("updates_base_weights", "W updated", _text),
)

MEMORY_COLUMNS: Sequence[Column] = (
    ("method", "method", str), ("rank", "rank", _text), ("trainable_params", "trainable", count),
    ("weights_bytes", "weights", gib), ("adapter_bytes", "adapter", gib),
    ("gradients_bytes", "grads", gib), ("optimizer_bytes", "optim", gib),
    ("master_bytes", "master", gib), ("method_state_bytes", "state", gib),
    ("activations_bytes", "activ.", gib), ("logits_bytes", "logits", gib),
    ("peak_bytes", "peak", gib), ("peak_phase", "at", str), ("overhead_bytes", "+runtime", gib),
)

# One GPU's share of a step spread over several (--gpus, --sharding): what --wide adds.
SHARD_COLUMNS: Sequence[Column] = (
    ("gather_bytes", "gathered", gib), ("reduce_scatter_bytes", "reduce-scatter", gib),
    ("bucket_bytes", "buckets", gib), ("cpu_offload_bytes", "host", gib),
)


def gpus_text(n) -> str:
    """GPUs needed fully sharded; "none" when no count holds the step (what sharding cannot split, the
    activations and logits, exceeds one GPU)."""
    return "none" if n is None else f"{n:,}"


GPU_COLUMNS: Sequence[Column] = (
    ("fits", "fits 1 GPU", _text), ("spare_bytes", "spare", gib), ("gpus_needed", "GPUs (FSDP)", gpus_text),
    ("step_ms", "step ms", lambda v: f"{v:,.0f}"),
)

# `memory`'s default table: what answers "does it fit"; --wide adds every component.
MEMORY_SUMMARY_COLUMNS: Sequence[Column] = (
    ("method", "method", str), ("rank", "rank", _text), ("peak_bytes", "peak", gib), ("peak_phase", "at", str),
    ("device_bytes", "w/ runtime", gib), ("fits", "fits", _text), ("spare_bytes", "spare", gib),
    ("gpus_needed", "GPUs (FSDP)", gpus_text), ("step_ms", "step ms", lambda v: f"{v:,.0f}"),
    ("trainable_params", "trainable", count), ("activations_bytes", "activ.", gib), ("logits_bytes", "logits", gib),
    ("weights_bytes", "weights", gib),
)


def render(rows: List[Dict], fmt: str, columns: Sequence[Column], title: str = "") -> str:
    """rows as text in fmt. table/markdown show the human columns with units; csv/json every field."""
    if fmt == "json":
        return json.dumps(finite(rows), indent=2, allow_nan=False)
    if fmt == "csv":
        buf = io.StringIO()
        keys: List[str] = []
        for row in rows:
            keys += [k for k in row if k not in keys]
        writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (";".join(v) if isinstance(v, list) else v) for k, v in row.items()})
        return buf.getvalue().rstrip("\n")
    from tabulate import tabulate

    cols = [c for c in columns if any(c[0] in r for r in rows)]
    body = [[fn(r.get(key)) for key, _, fn in cols] for r in rows]
    table = tabulate(body, headers=[c[1] for c in cols], tablefmt="github" if fmt == "markdown" else "simple",
                     disable_numparse=True, colalign=["left"] + ["right"] * (len(cols) - 1))
    return f"{title}\n\n{table}" if title else table


# `lorabench bench`'s rows: (key, title, formatter) as above; the full-depth columns when projected.
BENCH_COLUMNS = (
    ("method", "method", str), ("rank", "rank", lambda v: "" if v is None else str(v)),
    ("status", "status", str),
    ("peak_bytes", "est. peak", gib), ("measured_peak_bytes", "measured", gib),
    ("peak_error_pct", "error %", lambda v: "" if v is None else f"{v:+.2f}"),
    ("within_tolerance", "ok", lambda v: "" if v is None else ("yes" if v else "NO")),
    ("measured_step_ms", "step ms", lambda v: "" if v is None else f"{v:,.1f}"),
    ("estimated_step_ms", "est. ms", lambda v: "" if v is None else f"{v:,.1f}"),
    ("step_error_pct", "err %", lambda v: "" if v is None else f"{v:+.0f}"),
    ("layers", "layers", str),
    ("estimated_after_forward_bytes", "est. activ.", gib), ("measured_activations_bytes", "measured", gib),
    ("measured_step_ms_iqr", "iqr", lambda v: "" if v is None else f"{v:,.1f}"),
    ("measured_forward_ms", "fwd", lambda v: "" if v is None else f"{v:,.1f}"),
    ("measured_backward_ms", "bwd", lambda v: "" if v is None else f"{v:,.1f}"),
    ("measured_optimizer_ms", "optim", lambda v: "" if v is None else f"{v:,.1f}"),
    ("measured_tokens_per_s", "tokens/s", lambda v: "" if v is None else f"{v:,.0f}"),
    ("achieved_tflops", "TFLOP/s", lambda v: "" if v is None else f"{v:,.1f}"),
    ("fraction_of_matmul", "of matmul", lambda v: "" if v is None else f"{v:.0%}"),
)
FULL_DEPTH_COLUMNS = (
    ("full_peak_bytes", "full depth: est.", gib), ("full_projected_peak_bytes", "projected", gib),
    ("full_projected_step_ms", "step ms", lambda v: "" if v is None else f"{v:,.0f}"),
)


def _bench_table(rows: List[Dict], fmt: str, columns, title: str, width: Optional[int]) -> str:
    """A bench table in MiB when every peak is under 1 GiB, cut to the columns that fit `width` (the others
    named below it), or every field in csv/json."""
    if all((r.get("peak_bytes") or 0) < 2 ** 30 for r in rows):  # small models read better in MiB
        columns = tuple((k, t, mib) if f is gib else (k, t, f) for k, t, f in columns)
        title = title.replace("; GiB", "; MiB")
    return fitted_table(rows, fmt, columns, width, keep=4, title=title, carried="-f json or -o carry every field")


def fitted_table(rows: List[Dict], fmt: str, columns, width: Optional[int], keep: int, title: str = "",
                 carried: str = "-f json carries every field") -> str:
    """rows as a table of the columns that fit `width` (the first `keep` always), the others named below it
    with where they are carried; other formats (or no width) with every column."""
    hidden: List[str] = []
    if fmt == "table" and width and rows:
        columns, hidden = fit_width(rows, columns, width, keep=keep)
    out = render(rows, fmt, columns, title=title)
    if hidden and fmt == "table":
        out += "\n" + wrap(f"not shown at {width} columns: {', '.join(hidden)} ({carried}).", width)
    return out


def flops_text(flops: float, gflops_decimals: int = 1) -> str:
    """A rate in the unit that shows it: TFLOP/s, or GFLOP/s under 1 TFLOP/s (a CPU's), with gflops_decimals
    (0.29 GFLOP/s needs two)."""
    return f"{flops / 1e12:,.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:,.{gflops_decimals}f} GFLOP/s"


def bench_text(rows: List[Dict], model: str, setup, fmt: str, width: Optional[int] = None) -> str:
    """The bench's rows as text: the table with its title and notes, or every field in csv/json. With a
    width, the table keeps the columns that fit it and names the others."""
    cut = f"{rows[0]['layers']} of {rows[0]['full_layers']} layers" if rows else ""
    title = (f"{model} ({cut}), {setup.impl} layers on {rows[0]['device_name'] if rows else setup.device}: "
             f"batch {setup.batch_size} x {setup.seq_len}, {setup.dtype}; GiB, ms")
    projected = any(r.get("full_projected_peak_bytes") is not None for r in rows)
    out = _bench_table(rows, fmt, BENCH_COLUMNS + (FULL_DEPTH_COLUMNS if projected else ()), title, width)
    if fmt not in ("table", "markdown") or not rows:
        return out
    r0 = rows[0]
    if r0.get("matmul_tflops"):
        out += f"\nmatmul ceiling measured here: {flops_text(r0['matmul_tflops'] * 1e12)} ({r0.get('matmul_dtype', setup.dtype)})"
        if r0.get("matmul_bf16_tflops") and r0.get("matmul_fp32_tflops"):
            out += (f"; bf16 {flops_text(r0['matmul_bf16_tflops'] * 1e12)}, "
                    f"fp32 {flops_text(r0['matmul_fp32_tflops'] * 1e12)}")
    if r0.get("catalog_tflops"):
        out += f"; catalog peak {r0['gpu']}: {r0['catalog_tflops']:,.0f} TFLOP/s"
    for r in rows:
        if r["status"] != "ok":
            out += f"\n{r['method']} r={r['rank']}: {r['status']}: {r['error']}"
            if r["status"] == "oom":
                said = r.get("estimated_fits")
                out += (" (the estimate said it would not fit)" if said is False
                        else " (the estimate said it would fit)" if said else "")
    if projected:
        out += ("\nfull depth: measured at the layers built + the estimate's per-layer terms for the "
                "rest; time scaled by FLOPs.")
    return out


# `bench --nproc N`: a row per rank, its shard and communication beside the estimate.
DIST_COLUMNS = (
    ("method", "method", str), ("rank", "rank", lambda v: "" if v is None else str(v)),
    ("gpu_rank", "proc", str), ("status", "status", str),
    ("peak_bytes", "est. peak", gib), ("measured_peak_bytes", "measured", gib),
    ("peak_error_pct", "error %", signed_pct),
    ("within_tolerance", "ok", lambda v: "" if v is None else ("yes" if v else "NO")),
    ("weights_bytes", "est. weights", gib), ("measured_weights_bytes", "measured", gib),
    ("gradients_bytes", "est. grads", gib), ("measured_gradients_bytes", "measured", gib),
    ("comm_bytes", "est. sent", gib), ("measured_comm_bytes", "measured", gib),
    ("measured_step_ms", "step ms", lambda v: "" if v is None else f"{v:,.1f}"),
)


def distributed_bench_text(rows: List[Dict], model: str, setup, fmt: str, width: Optional[int] = None) -> str:
    """`bench --nproc`'s rows as text: the table, then per case the largest rank error (the verdict) and why
    any rank did not finish."""
    r0 = rows[0] if rows else {}
    title = (f"{model} ({r0.get('layers', '')} of {r0.get('full_layers', '')} layers), {setup.impl} layers, "
             f"{r0.get('nproc', '')} processes, sharding {r0.get('sharding', '')}, on {r0.get('device_name', setup.device)}: "
             f"batch {setup.batch_size} x {setup.seq_len} per process, {setup.dtype}; GiB, ms")
    out = _bench_table(rows, fmt, DIST_COLUMNS, title, width)
    if fmt not in ("table", "markdown") or not rows:
        return out
    cases: Dict[tuple, List[Dict]] = {}
    for r in rows:
        cases.setdefault((r["method"], r["rank"]), []).append(r)
    for (method, rank), mine in cases.items():
        name = method + (f" r={rank}" if rank else "")
        worst = mine[0].get("largest_rank_error_pct")
        if worst is not None:
            at = next(r["gpu_rank"] for r in mine if r["peak_error_pct"] == worst)
            out += f"\n{name}: largest rank error {worst:+.2f}% (rank {at} of {len(mine)})"
        for r in mine:
            if r["status"] != "ok":
                out += f"\n{name} rank {r['gpu_rank']}: {r['status']}: {r['error']}"
    out += ("\nsent: bytes each rank sends per step with ring algorithms, from the collectives torch dispatched "
            "(measured) and lorabench.estimator.comms (estimated).")
    return out


# --------------------------------------------------------------------------------------------------
# Answers that fit a terminal: the setup as one sentence, a verdict line per case, tables cut to width.


def size(n) -> str:
    """Bytes for a sentence: MiB under 1 GiB (a "40 MiB spare" must not read "0.04 GiB"), else GiB."""
    if n is None:
        return ""
    return f"{n / 2 ** 20:,.0f} MiB" if abs(n) < GIB else f"{n / GIB:,.2f} GiB"


def wrap(text: str, width: int, indent: str = "") -> str:
    """text wrapped to width, continuation lines indented; words (a long command) never broken."""
    import textwrap

    return textwrap.fill(text, width=max(width, 40), subsequent_indent=indent, break_long_words=False,
                         break_on_hyphens=False)


def fit_width(rows: List[Dict], columns: Sequence[Column], width: int, keep: int) -> Tuple[Sequence[Column], List[str]]:
    """The columns whose table fits width characters: the first `keep` always, then as many of the rest as
    fit, in order. Returns (columns, titles of the columns left out)."""
    from tabulate import tabulate

    def text_width(cols) -> int:
        body = [[fn(r.get(key)) for key, _, fn in cols] for r in rows]
        table = tabulate(body, headers=[c[1] for c in cols], tablefmt="simple", disable_numparse=True)
        return max(len(line) for line in table.splitlines())

    cols = [c for c in columns if any(c[0] in r for r in rows)]
    chosen = list(cols[:keep])
    dropped = []
    for c in cols[keep:]:
        if text_width(chosen + [c]) <= width:
            chosen.append(c)
        else:
            dropped.append(c[1])
    return chosen, dropped
