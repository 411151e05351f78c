"""Rendering rows of numbers as table, markdown, csv or json. The only place numbers become text."""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Dict, List, Sequence, Tuple

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

GPU_COLUMNS: Sequence[Column] = (
    ("fits", "fits 1 GPU", _text), ("gpus_needed", "GPUs (FSDP)", _text),
    ("step_ms", "step ms", lambda v: f"{v:,.0f}"),
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
