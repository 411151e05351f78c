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
    """(formatter, unit) for byte counts shown together: GiB, or MiB when all are under 1 GiB or some are
    under 0.1 GiB (a 1.6 MiB adapter would read 0.00 GiB; 15 GiB reads 15,360.00 MiB beside it)."""
    sizes = [abs(v) for v in values if v]
    return (gib, "GiB") if sizes and max(sizes) >= GIB and min(sizes) >= GIB / 10 else (mib, "MiB")


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
    ("layers", "layers", str), ("status", "status", str),
    ("peak_bytes", "est. peak", gib), ("measured_peak_bytes", "measured", gib),
    ("peak_error_pct", "error %", lambda v: "" if v is None else f"{v:+.2f}"),
    ("within_tolerance", "ok", lambda v: "" if v is None else ("yes" if v else "NO")),
    ("estimated_after_forward_bytes", "est. activ.", gib), ("measured_activations_bytes", "measured", gib),
    ("estimated_step_ms", "est. ms", lambda v: "" if v is None else f"{v:,.1f}"),
    ("measured_step_ms", "step ms", lambda v: "" if v is None else f"{v:,.1f}"),
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


def bench_text(rows: List[Dict], model: str, setup, fmt: str, width: Optional[int] = None) -> str:
    """The bench's rows as text: the table with its title and notes, or every field in csv/json. With a
    width, the table keeps the columns that fit it and names the others."""
    cut = f"{rows[0]['layers']} of {rows[0]['full_layers']} layers" if rows else ""
    title = (f"{model} ({cut}), {setup.impl} layers on {rows[0]['device_name'] if rows else setup.device}: "
             f"batch {setup.batch_size} x {setup.seq_len}, {setup.dtype}; GiB, ms")
    projected = any(r.get("full_projected_peak_bytes") is not None for r in rows)
    columns = BENCH_COLUMNS + (FULL_DEPTH_COLUMNS if projected else ())
    if all((r.get("peak_bytes") or 0) < 2 ** 30 for r in rows):  # small models read better in MiB
        columns = tuple((k, t, mib) if f is gib else (k, t, f) for k, t, f in columns)
        title = title.replace("; GiB", "; MiB")
    hidden: List[str] = []
    if fmt == "table" and width and rows:
        columns, hidden = fit_width(rows, columns, width, keep=4)
    out = render(rows, fmt, columns, title=title)
    if fmt not in ("table", "markdown") or not rows:
        return out
    if hidden:
        out += "\n" + wrap(f"not shown at {width} columns: {', '.join(hidden)} (-f json or -o carry every field).",
                           width)
    r0 = rows[0]
    if r0.get("matmul_tflops"):
        out += f"\nmatmul ceiling measured here: {r0['matmul_tflops']:,.1f} TFLOP/s ({setup.dtype})"
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


def verdict_line(row: Dict, fix: Optional[Dict], alternative: Optional[Dict], width: int) -> str:
    """One case's answer on its GPU, as a sentence: fits or not, the memory to spare or missing (allocator
    allowance included), the phase of the peak; for a "no" the largest component and the cheapest change
    that fits (fix, and an alternative of another kind: fit.Fix as dicts), as the options to add."""
    who = _who(row)
    need = row["device_bytes"] + row["allowance_bytes"]
    where = f"{who} on one {row['gpu']} ({size(row['gpu_memory_bytes'])})"
    if row["fits"]:
        tight = ", tight" if row["spare_bytes"] < 0.05 * row["gpu_memory_bytes"] else ""
        return wrap(f"{where}: fits, {size(row['spare_bytes'])} spare{tight} (needs {size(need)}; peak in "
                    f"{row['peak_phase']}).", width, "  ")
    text = f"{where}: does NOT fit, needs {size(need)} (peak in {row['peak_phase']})"
    name, big = row.get("largest_component"), row.get("largest_component_bytes")
    if name:
        text += f"; {name} {size(big)}" + (" alone exceed the GPU" if big > row["gpu_memory_bytes"] else "")
    if fix is None:
        text += ". Nothing within reach fits: no saver, batch, sequence or GPU count."
    else:
        text += f". {_fix_text(fix, 'Fits')}"
        if alternative is not None:
            text += f"; or {_fix_text(alternative, 'fits')}"
        text += "."
    return wrap(text, width, "  ")


def _fix_text(fix: Dict, lead: str) -> str:
    """'Fits with --grad-checkpointing on 2 GPUs (FSDP) (40.1 GiB, 30.2 GiB spare)'."""
    args = " ".join(fix["args"])
    gpus = next((k for k in fix["kinds"] if k.endswith("GPUs (FSDP)")), None)
    how = " ".join(p for p in (f"with {args}" if args else "", f"on {gpus}" if gpus else "") if p)
    return f"{lead} {how} ({size(fix['required_bytes'])}, {size(fix['spare_bytes'])} spare)"


def setup_sentence(spec, rows: List[Dict], setup, targets) -> str:
    """The title of an answer: the model and every setting that changes it, defaults included (the targets,
    whose layers, the loop, the precision, the optimizer, checkpointing, attention)."""
    setup = setup.for_spec(spec)
    adapted = next((r["targets"] for r in rows if r.get("rank")), None)
    parts = [f"{spec.name}, batch {setup.batch_size} x {setup.seq_len:,} tokens"]
    if adapted is not None and not spec.single_matrix:
        how = ("PEFT's default for the family" if targets is None
               else targets if isinstance(targets, str) and targets == "all-linear" else "")
        parts.append(f"targets {adapted}" + (f" ({how})" if how else ""))
    if not spec.single_matrix:
        parts.append("transformers + PEFT layers" if setup.impl == "peft" else "lorabench's own layers")
        parts.append("plain loop (model output kept through backward)")
    precision = f"{setup.dtype} weights"
    if adapted is not None:
        precision += f", {setup.adapter_dtype} adapters"
    if setup.master_weights:
        precision += ", fp32 master weights"
    parts.append(precision)
    parts.append({"adamw": "AdamW", "adamw-8bit": "8-bit AdamW", "sgd": "SGD",
                  "sgd-momentum": "SGD with momentum"}.get(setup.optimizer, setup.optimizer)
                 + (" (foreach)" if setup.optimizer == "adamw" and setup.device == "cuda" else ""))
    parts.append("gradient checkpointing" if setup.grad_checkpointing else "no checkpointing")
    if not spec.single_matrix:
        parts.append(f"{setup.attention} attention")
    if setup.dropout:
        parts.append(f"dropout {setup.dropout:g}")
    if setup.device != "cuda":
        parts.append(f"on {setup.device}")
    return "; ".join(parts) + "."


def _who(row: Dict) -> str:
    return row["method"] + (f" r={row['rank']}" if row.get("rank") else "")


# `lorabench fit`'s column titles for the savers (fit.savers' kinds), short enough for 80 columns.
SHORT_CHANGES = {"as given": "given", "checkpointing": "ckpt", "8-bit AdamW": "8bit", "nf4 base (QLoRA)": "nf4",
                 "checkpointing + 8-bit AdamW": "ckpt+8bit", "checkpointing + nf4 base (QLoRA)": "ckpt+nf4"}


def fit_text(limits: List[Dict], knobs: List[Dict], setup, width: int, fmt: str = "table") -> str:
    """`lorabench fit` for people: per model, the limits table, then which savers make the setup fit (one
    column per method, split into several tables where the terminal is too narrow)."""
    from tabulate import tabulate

    tablefmt = "github" if fmt == "markdown" else "simple"
    out = []
    for model in dict.fromkeys(r["model"] for r in limits):
        mine = [r for r in limits if r["model"] == model]
        r0 = mine[0]
        shape = f"batch {r0['batch_size']} x {r0['seq_len']:,} tokens"
        out.append(wrap(f"{model} on one {r0['gpu']} ({gib(r0['gpu_memory_bytes'])} GiB), {shape}; 'fits' leaves "
                        f"{r0['allowance_fraction']:.1%} of the peak to the allocator:", width, "  "))
        out.append("")

        def limit(v, row):
            if v is None:
                return "none"
            beyond = row.get("max_positions") and v == row["max_seq_len"] and v > row["max_positions"]
            return f"{v:,}" + ("*" if beyond else "")

        body = [[r["method"], _text(r["rank"]), _text(r["fits"]), gib(r["spare_bytes"]),
                 limit(r["max_batch_size"], r), limit(r["max_seq_len"], r),
                 "" if r["rank"] is None else limit(r["max_rank"], r)] for r in mine]
        out.append(tabulate(body, headers=["method", "rank", "fits", "spare GiB", "max batch", "max seq",
                                           "max rank"], tablefmt=tablefmt, disable_numparse=True,
                            colalign=["left"] + ["right"] * 6))
        out.append(wrap(f"max batch at {r0['seq_len']:,} tokens, max seq at batch {r0['batch_size']}, max rank at "
                        "both; 'none': not even 1 fits.", width))
        if any(limit(r["max_seq_len"], r).endswith("*") for r in mine):
            out.append(f"* longer than the model's {r0['max_positions']:,} positions.")
        mine_knobs = [k for k in knobs if k["model"] == model]
        changes = list(dict.fromkeys(k["change"] for k in mine_knobs))
        short = {c: SHORT_CHANGES.get(c, c) for c in changes}
        cell = {(_who(k), k["change"]): k for k in mine_knobs}
        out.append("")
        out.append(wrap(f"Which savers make {shape} fit: GiB to spare (fits), or missing (-):", width))

        def show(k):
            return "" if k is None else f"{k['spare_bytes'] / GIB:,.1f}"

        cases = list(dict.fromkeys(_who(k) for k in mine_knobs))
        body = [[w] + [show(cell.get((w, c))) for c in changes] for w in cases]
        out.append(tabulate(body, headers=["method"] + [short[c] for c in changes], tablefmt=tablefmt,
                            disable_numparse=True, colalign=["left"] + ["right"] * len(changes)))
        first = {k["change"]: k for k in reversed(mine_knobs)}
        legend = [f"{short[c]}: {' '.join(first[c]['args'])}" for c in changes if first[c]["args"] and " + " not in c]
        if legend:
            out.append(wrap("; ".join(legend) + ".", width, "  "))
        out.append("")
    return "\n".join(out).rstrip()


def cost_text(rows: List[Dict], fmt: str = "table") -> str:
    """With --tokens: the training time and cost of each case, on the GPUs it needs (1, or the fewest that
    hold it fully sharded); a case no GPU count holds has no time."""
    from tabulate import tabulate

    priced = [r for r in rows if r.get("train_steps") is not None]
    if not rows or "train_tokens" not in rows[0] and not priced:
        return ""
    r0 = priced[0] if priced else rows[0]
    head = f"Training {r0['train_tokens']:,} tokens on {r0['gpu']}" if priced else "Training"
    price = next((r for r in priced if r.get("price_per_gpu_hour") is not None), None)
    head += (f" at ${price['price_per_gpu_hour']:,.2f} per GPU-hour ({price['price_source']}):" if price
             else " (no price: --price USD per GPU-hour):")
    body = [[_who(r), _text(r.get("train_gpus")) or "none", ms(r.get("step_ms")),
             f"{r['train_steps']:,}" if r.get("train_steps") is not None else "",
             f"{r['train_hours']:,.1f}" if r.get("train_hours") is not None else "",
             f"{r['gpu_hours']:,.1f}" if r.get("gpu_hours") is not None else "",
             f"{r['cost_usd']:,.0f}" if r.get("cost_usd") is not None else ""] for r in rows]
    table = tabulate(body, headers=["method", "GPUs", "step ms", "steps", "hours", "GPU-hours", "USD"],
                     tablefmt="github" if fmt == "markdown" else "simple", disable_numparse=True,
                     colalign=["left"] + ["right"] * 6)
    return f"{head}\n\n{table}"
