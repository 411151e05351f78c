"""The answers of `memory` and `fit` as people read them: a verdict sentence per case first, then the setup,
then tables cut to the terminal. The rows stay numbers (estimate.memory_rows, plus the verdict fields added
here); only the functions below turn them into text.
"""

from __future__ import annotations

import difflib
from dataclasses import replace

from typing import Dict, List, Optional

from lorabench.errors import LorabenchError
from lorabench.estimator.memory import ALLOWANCE_SOURCE
from lorabench.render.formats import (GIB, GPU_COLUMNS, MEMORY_COLUMNS, MEMORY_SUMMARY_COLUMNS, SHARD_COLUMNS, _text,
                              fit_width, gib, ms, render, size, wrap)
from lorabench.estimator.sharding import STRATEGIES


def memory_text(spec, rows, setup, chosen, targets, fmt, wide, columns, allowance, width):
    """One model's answer as text: a verdict line per case, the setup, the table, the notes. columns: the
    table's columns (pick_columns), or None for the default set cut to width (or every one, with wide)."""
    if chosen is not None:  # the answer first: one sentence per case
        lines = [verdict_line(r, r.get("fix"), r.get("fix_alternative"), width) for r in rows]
    else:
        lines = [wrap(smallest_gpu_sentence(r), width, "  ") for r in rows]
    lines += ["", wrap(setup_sentence(spec, rows, setup, targets), width, "  ")]
    if rows and _shared(rows[0]):
        lines += [wrap(comm_sentence(r), width, "  ") for r in rows]
    if chosen is not None:
        lines.append(wrap(f"'fits' leaves {allowance:.1%} of the peak to the allocator (--headroom; "
                          f"{ALLOWANCE_SOURCE}).", width, "  "))
    if columns:
        cols = columns
    elif wide:
        cols = tuple(MEMORY_COLUMNS) + (tuple(SHARD_COLUMNS) if rows and _shared(rows[0]) else ()) + \
            (tuple(GPU_COLUMNS) if chosen else ())
    else:
        cols = MEMORY_SUMMARY_COLUMNS
    if rows and _shared(rows[0]):  # 'fits' is each of the GPUs' verdict, not one GPU's; the step is theirs,
        # communication overlapped, as the training time takes it (comm_sentence gives both)
        shared = {"fits": ("fits", "fits", next((c[2] for c in cols if c[0] == "fits"), _text)),
                  "step_ms": ("step_ms_overlap", "step ms", lambda v: "" if v is None else f"{v:,.0f}")}
        cols = tuple(shared.get(c[0], c) for c in cols)
    hidden: list = []
    if fmt == "table" and not wide and not columns:
        cols, hidden = fit_width(rows, cols, width, keep=4)
    table = render(rows, fmt, cols, title="Per GPU, GiB:" if fmt == "table" else "")
    lines += ["", table]
    if hidden:
        lines.append(wrap(f"not shown at {width} columns: {', '.join(hidden)} (--wide shows every component, "
                          "--columns chooses).", width))
    costs = cost_text(rows, fmt) if "train_tokens" in rows[0] else ""
    if costs:
        lines += ["", wrap(costs.split("\n", 1)[0], width, "  "), costs.split("\n", 1)[1]]
    notes = sorted({n for r in rows for n in r["notes"]})
    lines += [wrap(f"note: {n}", width, "  ") for n in notes]
    return "\n".join(lines)


def smallest_gpu_sentence(row) -> str:
    who = _who(row)
    gpu = row.get("smallest_gpu")
    if _shared(row):
        who += f", one of {_how(row)}"
        where = (f"each share fits one {gpu}, the smallest catalog GPU that holds it" if gpu
                 else "no catalog GPU holds one GPU's share (--gpu shows what makes it fit)")
    else:
        where = (f"fits one {gpu}, the smallest catalog GPU that holds it" if gpu
                 else "fits no single catalog GPU (--gpu shows what makes it fit)")
    return f"{who}: peak {size(row['peak_bytes'])} in {row['peak_phase']}, {size(row['device_bytes'])} with " \
           f"the runtime; {where}."


def _shared(row) -> bool:
    """The step is spread over GPUs (or offloaded): the row's memory is one GPU's share."""
    return row.get("gpus", 1) > 1 or row.get("sharding", "none") != "none" or bool(row.get("cpu_offload"))


def _strategy(row) -> str:
    """'fsdp' (+ ', CPU offload')."""
    return row["sharding"] + (", CPU offload" if row.get("cpu_offload") else "")


def _how(row) -> str:
    """'8 GPUs, fsdp' (+ ', CPU offload')."""
    n = row["gpus"]
    return f"{n} GPU{'s' if n > 1 else ''}, {_strategy(row)}"


def comm_sentence(row) -> str:
    """What one GPU sends per step and how long it takes on its link, with and without overlap."""
    parts = [f"{name} {row[key] / 1e9:,.2f} GB" for key, name in (
        ("comm_all_gather_bytes", "all-gather"), ("comm_reduce_scatter_bytes", "reduce-scatter"),
        ("comm_all_reduce_bytes", "all-reduce")) if row.get(key)]
    text = f"{_who(row)}: each GPU sends " + (", ".join(parts) if parts else "nothing") + " per step"
    if row.get("link"):
        text += (f" over {row['link']} at {row['link_bytes_s'] / 1e9:,.1f} GB/s each way: {ms(row['comm_ms'])} ms; "
                 f"step {ms(row['step_ms_overlap'])} ms overlapped, {ms(row['step_ms_no_overlap'])} ms not")
    elif parts and "gpu" in row:
        text += f" (no network figure for {row['gpu']} across servers: no time)"
    return text + "."


def pick_columns(text: str):
    """--columns: row keys or column titles, comma-separated, in that order."""
    known = {}
    for c in (*MEMORY_COLUMNS, *SHARD_COLUMNS, *GPU_COLUMNS, *MEMORY_SUMMARY_COLUMNS):
        known.setdefault(c[0], c)
        known.setdefault(c[1], c)
    out = []
    for name in (n.strip() for n in text.split(",") if n.strip()):
        if name not in known:  # one short line: the near names, not all 60
            near = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(near)}? " if near else ""
            raise LorabenchError(f"--columns: unknown column {name!r}; {hint}the names are the row keys of -f json "
                                 "or the table's titles (method,rank,peak,fits,spare,...).")
        out.append(known[name])
    return tuple(dict.fromkeys(out))


def verdict_line(row: Dict, fix: Optional[Dict], alternative: Optional[Dict], width: int) -> str:
    """One case's answer on its GPU, as a sentence: fits or not, the memory to spare or missing (allocator
    allowance included), the phase of the peak; for a "no" the largest component and the cheapest change
    that fits (fix, and an alternative of another kind: fit.Fix as dicts), as the options to add."""
    who = _who(row)
    need = row["device_bytes"] + row["allowance_bytes"]
    if _shared(row):
        where = f"{who} on {row['gpus']} x {row['gpu']} ({size(row['gpu_memory_bytes'])} each; {_strategy(row)})"
        each = " each"
    else:
        where, each = f"{who} on one {row['gpu']} ({size(row['gpu_memory_bytes'])})", ""
    host = f", {size(row['cpu_offload_bytes'])} each in host memory" if row.get("cpu_offload") else ""
    if row["fits"]:
        tight = ", tight" if row["spare_bytes"] < 0.05 * row["gpu_memory_bytes"] else ""
        return wrap(f"{where}: fits, {size(row['spare_bytes'])} spare{each}{tight} (needs {size(need)}{each}"
                    f"{host}; peak in {row['peak_phase']}).", width, "  ")
    text = f"{where}: does NOT fit, needs {size(need)}{each} (peak in {row['peak_phase']})"
    name, big = row.get("largest_component"), row.get("largest_component_bytes")
    if name:
        text += f"; {name} {size(big)}" + (" alone exceed the GPU" if big > row["gpu_memory_bytes"] else "")
    if fix is None:
        text += ". Nothing within reach fits: no saver, batch, sequence or GPU count."
    else:
        text += f". {_fix_text(fix, 'Fits', bool(each))}"
        if alternative is not None:
            text += f"; or {_fix_text(alternative, 'fits', bool(each))}"
        text += "."
    return wrap(text, width, "  ")


def _fix_text(fix: Dict, lead: str, shared: bool = False) -> str:
    """'Fits with --grad-checkpointing --gpus 2 --sharding fsdp (40.1 GiB each, 30.2 GiB spare)'; shared: the
    step was already on several GPUs (or offloaded), so the bytes are each GPU's too."""
    each = " each" if shared or "--gpus" in fix["args"] else ""
    need, spare = size(fix["required_bytes"]), size(fix["spare_bytes"])
    return f"{lead} with {' '.join(fix['args'])} ({need}{each}, {spare} spare)"


# how rows are padded, in words (setup.padding)
PADDED = {"longest": "padded to the batch's longest", "max": "padded to the longest allowed"}


def _batch_words(setup, row: Dict) -> str:
    """How the batch is made, in words: its padding, packing or rows, the examples' mean, the typical batch."""
    mean = f"examples of {row['mean_len']:,.0f} tokens on average"
    if setup.padding_free:
        how = f"padding-free ({setup.batch_size} examples end to end in one row{', packed' if setup.packing else ''})"
    elif setup.packing:
        how = "packed rows"
    else:
        how = PADDED[setup.padding]
        how += f" (typical batch {setup.batch_size} x {row['typical_seq_len']:,}; {row['padding_pct']:g}% padding)"
    return f"{how}, {mean}"


def _batch_short(row: Dict) -> str:
    """A fit row's batch, when it is not rows of one example each: padded, packed or padding-free."""
    if row.get("padding_free"):
        return " (padding-free" + (", packed)" if row.get("packing") else ")")
    if row.get("packing"):
        return " (packed)"
    padding = row.get("padding", "none")
    return "" if padding == "none" else f" ({PADDED[padding]})"


def setup_sentence(spec, rows: List[Dict], setup, targets) -> str:
    """The title of an answer: the model and every setting that changes it, defaults included (the targets,
    whose layers, the loop, the precision, the optimizer, checkpointing, attention)."""
    traced = bool(rows) and rows[0].get("engine") == "trace"
    setup = replace(setup, attention=rows[0]["attention"]) if traced else setup.for_spec(spec)
    adapted = next((r["targets"] for r in rows if r.get("rank")), None)
    parts = [f"{spec.name}, batch {setup.batch_size} x {setup.seq_len:,} tokens"]
    if rows and _shared(rows[0]):
        parts[0] += f" per GPU on {_how(rows[0])} ({STRATEGIES[rows[0]['sharding']].label})"
    if setup.batched and rows and "mean_len" in rows[0]:
        parts.append(_batch_words(setup, rows[0]))
    if adapted is not None and not spec.single_matrix:
        how = ("PEFT's default for the family" if targets is None
               else targets if isinstance(targets, str) and targets == "all-linear" else "")
        parts.append(f"targets {adapted}" + (f" ({how})" if how else ""))
    if not spec.single_matrix:
        parts.append("transformers + PEFT, traced" if traced else
                     "transformers + PEFT layers" if setup.impl == "peft" else "lorabench's own layers")
        parts.append("plain loop (model output kept through backward)" if setup.loop == "plain"
                     else "Trainer's training_step (output dropped before backward)")
        if setup.grad_accum > 1:
            parts.append(f"{setup.grad_accum} micro-batches per step")
    precision = f"{setup.dtype} weights"
    if setup.autocast:
        precision += f" under {setup.autocast} autocast"
    if adapted is not None:
        precision += f", {setup.adapter_dtype} adapters"
    if setup.master_weights:
        precision += ", fp32 master weights"
    parts.append(precision)
    parts.append({"adamw": "AdamW", "adamw-8bit": "8-bit AdamW", "paged-adamw-8bit": "paged 8-bit AdamW",
                  "paged-adamw": "paged AdamW", "sgd": "SGD",
                  "sgd-momentum": "SGD with momentum"}.get(setup.optimizer, setup.optimizer)
                 + (" (foreach)" if setup.optimizer == "adamw" and setup.device == "cuda" else ""))
    parts.append(("gradient checkpointing, each layer's input offloaded to host memory" if setup.offload ==
                  "checkpoints" else "gradient checkpointing") if setup.grad_checkpointing else "no checkpointing")
    if not spec.single_matrix:
        parts.append(f"{setup.attention} attention")
    if setup.dropout:
        parts.append(f"dropout {setup.dropout:g}")
    if setup.loss == "chunked":
        parts.append(f"chunked loss ({min(setup.loss_chunk, setup.tokens):,} tokens a chunk)")
    elif setup.loss == "fused-linear":
        parts.append("Liger's fused linear cross-entropy")
    if setup.device != "cuda":
        parts.append(f"on {setup.device}")
    return "; ".join(parts) + "."


def _who(row: Dict) -> str:
    return row["method"] + (f" r={row['rank']}" if row.get("rank") else "")


# `lorabench fit`'s column titles for the savers (fit.SAVERS' kinds, joined by "+"), short for 80 columns.
SHORT_CHANGES = {"as given": "given", "checkpointing": "ckpt", "fused loss": "fused", "chunked loss": "chunked",
                 "8-bit AdamW": "8bit", "offloaded checkpoints": "offload", "nf4 base (QLoRA)": "nf4"}


def _short_change(change: str) -> str:
    return "+".join(SHORT_CHANGES.get(kind, kind) for kind in change.split(" + "))


def fit_text(limits: List[Dict], knobs: List[Dict], setup, width: int, fmt: str = "table") -> str:
    """`lorabench fit` for people: per model, the limits table, then which savers make the setup fit (one
    column per method, split into several tables where the terminal is too narrow)."""
    from tabulate import tabulate

    tablefmt = "github" if fmt == "markdown" else "simple"
    out = []
    for model in dict.fromkeys(r["model"] for r in limits):
        mine = [r for r in limits if r["model"] == model]
        r0 = mine[0]
        shape = f"batch {r0['batch_size']} x {r0['seq_len']:,} tokens" + _batch_short(r0)
        on = (f"{r0['gpus']} x {r0['gpu']} ({gib(r0['gpu_memory_bytes'])} GiB each; {_strategy(r0)}), {shape} per GPU"
              if _shared(r0) else f"one {r0['gpu']} ({gib(r0['gpu_memory_bytes'])} GiB), {shape}")
        out.append(wrap(f"{model} on {on}; 'fits' leaves {r0['allowance_fraction']:.1%} of the peak to the "
                        "allocator:", width, "  "))
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
        out += [wrap(f"note: {n}", width, "  ") for n in dict.fromkeys(n for r in mine for n in r.get("notes", ()))]
        mine_knobs = [k for k in knobs if k["model"] == model]
        # the table: as given, each saver alone, and every saver that applies to the case together ("all"); the
        # json has every combination
        changes = [c for c in dict.fromkeys(k["change"] for k in mine_knobs) if " + " not in c]
        cell = {(_who(k), k["change"]): k for k in mine_knobs}
        for k in mine_knobs:  # a case's knobs end with all its savers together
            cell[(_who(k), "all")] = k if " + " in k["change"] else None
        together = any(cell[(w, c)] for w, c in cell if c == "all")
        out.append("")
        out.append(wrap(f"Which savers make {shape} fit: GiB to spare (fits), or missing (-):", width))

        def show(k):
            return "" if k is None else f"{k['spare_bytes'] / GIB:,.1f}"

        columns = changes + (["all"] if together else [])
        cases = list(dict.fromkeys(_who(k) for k in mine_knobs))
        body = [[w] + [show(cell.get((w, c))) for c in columns] for w in cases]
        out.append(tabulate(body, headers=["method"] + [_short_change(c) for c in columns], tablefmt=tablefmt,
                            disable_numparse=True, colalign=["left"] + ["right"] * len(columns)))
        first = {k["change"]: k for k in reversed(mine_knobs)}
        legend = [f"{_short_change(c)}: {' '.join(first[c]['args'])}" for c in changes if first[c]["args"]]
        if together:
            legend.append("all: every saver that applies to the method")
        if legend:
            out.append(wrap("; ".join(legend) + ".", width, "  "))
        if any(k.get("max_seq_len") is not None for k in mine_knobs):  # (a traced model's are not searched)
            out.append("")
            out.append(wrap(f"The longest context that fits at batch {r0['batch_size']} with them, tokens:", width))

            def longest(k):
                return "" if k is None else limit(k["max_seq_len"], k)

            body = [[w] + [longest(cell.get((w, c))) for c in columns] for w in cases]
            out.append(tabulate(body, headers=["method"] + [_short_change(c) for c in columns], tablefmt=tablefmt,
                                disable_numparse=True, colalign=["left"] + ["right"] * len(columns)))
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
    body = [[_who(r), _text(r.get("train_gpus")) or "none", ms(r.get("train_step_ms")),
             f"{r['train_steps']:,}" if r.get("train_steps") is not None else "",
             f"{r['train_hours']:,.1f}" if r.get("train_hours") is not None else "",
             f"{r['gpu_hours']:,.1f}" if r.get("gpu_hours") is not None else "",
             f"{r['cost_usd']:,.0f}" if r.get("cost_usd") is not None else ""] for r in rows]
    table = tabulate(body, headers=["method", "GPUs", "step ms", "steps", "hours", "GPU-hours", "USD"],
                     tablefmt="github" if fmt == "markdown" else "simple", disable_numparse=True,
                     colalign=["left"] + ["right"] * 6)
    if any(r.get("train_gpus") and r.get("train_sharding") != "none" for r in priced):
        table += "\nstep ms: one GPU's step with its communication overlapped, which the hours are made of."
    return f"{head}\n\n{table}"
