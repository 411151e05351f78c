"""A report's text: its sections as format-neutral data, then report.md and a self-contained report.html.

Every number is formatted by lorabench.render.formats (the layer the CLI uses); this module only chooses the
columns, one unit for every byte column of a model's tables (render.bytes_unit: GiB, or MiB for a model under
1 GiB), one set of tables per model, and says what each figure shows.
The report's data is results.json's object (see lorabench.report.build); nothing here imports torch.
"""

from __future__ import annotations

import html
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

from lorabench.report import plots
from lorabench.render.formats import (PARAM_COLUMNS, _text, bytes_unit, count, fixed, gpus_needed_text, ms, pct,
                              signed_pct)


class Table(NamedTuple):
    """rows shown through columns: (key or fn(row), title, fn(value)); ids: the leading columns that name a
    row. A column empty in every row is left out, and a table with nothing but its ids is left out."""

    rows: Sequence[Dict]
    columns: Sequence
    caption: str = ""
    ids: int = 2


# Columns of text (by title) align left, numbers right; cells stay on one line but for prose (WRAP_TITLES).
TEXT_TITLES = {"model", "method", "item", "value", "status", "at", "deep dive: trained", "GPUs (FSDP)"}
WRAP_TITLES = {"value", "deep dive: trained", "GPUs (FSDP)"}


def _cell(row: Dict, key, fn) -> str:
    return key(row) if callable(key) else fn(row.get(key))


def _visible(t: Table) -> Optional[Table]:
    """t without its empty columns; None when only its ids are left."""
    cols = [c for i, c in enumerate(t.columns)
            if i < t.ids or any(_cell(r, c[0], c[2]) != "" for r in t.rows)]
    if not t.rows or len(cols) <= t.ids:
        return None
    return t._replace(columns=cols)


def markdown_table(t: Table) -> str:
    from tabulate import tabulate

    body = [[_cell(r, key, fn) for key, _, fn in t.columns] for r in t.rows]
    return tabulate(body, headers=[c[1] for c in t.columns], tablefmt="github", disable_numparse=True,
                    colalign=["left" if c[1] in TEXT_TITLES else "right" for c in t.columns])


def _classes(title: str) -> str:
    names = [name for name, titles in (("text", TEXT_TITLES), ("wrap", WRAP_TITLES)) if title in titles]
    return f' class="{" ".join(names)}"' if names else ""


def html_table(t: Table) -> str:
    """A table in its own scroll box (sticky header and first column), so that no table widens the page."""
    esc = html.escape
    cls = [_classes(c[1]) for c in t.columns]
    head = "".join(f"<th{k}>{esc(c[1])}</th>" for c, k in zip(t.columns, cls))
    body = "\n".join("<tr>" + "".join(f"<td{k}>{esc(_cell(r, c[0], c[2]))}</td>" for c, k in zip(t.columns, cls))
                     + "</tr>" for r in t.rows)
    return (f'<div class="scroll"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>'
            "</table></div>")


def _with_model(columns, rows: Sequence[Dict]):
    many = len({r["model"] for r in rows}) > 1
    return ((("model", "model", str),) if many else ()) + tuple(columns)


def _table(rows: Sequence[Dict], columns, caption: str = "") -> Table:
    cols = _with_model(columns, rows)
    return Table(rows, cols, caption, ids=len(cols) - len(columns) + 2)


def per_model(rows: Sequence[Dict], tables: Callable[[Sequence[Dict]], List[Table]]) -> List[Table]:
    """tables(rows) for each model's rows apart (each table in its model's units), captions naming the
    model when there are several."""
    groups: Dict[str, List[Dict]] = {}
    for r in rows:
        groups.setdefault(r["model"], []).append(r)
    if len(groups) == 1:
        return tables(rows)
    return [t._replace(caption=f"{model}: {t.caption[0].lower()}{t.caption[1:]}")
            for model, group in groups.items() for t in tables(group)]


# The byte counts that set a report's unit: every table of one model's rows reads in the unit of its peaks.
PEAK_KEYS = ("peak_bytes", "measured_peak_bytes", "bench_estimated_peak_bytes")


def _unit(rows: Sequence[Dict]):
    """One unit for every byte column of these rows' tables (render.bytes_unit of their peaks): GiB, or MiB
    for models under 1 GiB; small values keep three significant digits."""
    return bytes_unit(r.get(k) for r in rows for k in PEAK_KEYS)


def _bytes(rows: Sequence[Dict], key: str, title: str):
    """A column of byte counts in the rows' unit, named in its title."""
    fmt, unit = _unit(rows)
    return key, f"{title} {unit}", fmt


def _pair(rows: Sequence[Dict], est_key: str, meas_key: str, title: str):
    """A column of estimate / measured in one cell and the rows' unit; empty without an estimate (older reports
    lack some)."""
    fmt, unit = _unit(rows)

    def cell(r: Dict) -> str:
        est = r.get(est_key)
        return "" if est is None else f"{fmt(est)} / {fmt(r.get(meas_key)) or '-'}"
    cell.pair = (est_key, meas_key)
    return cell, f"{title} {unit}", None


# --------------------------------------------------------------------------------------------------
# The tables.


def memory_tables(rows: Sequence[Dict], gpu: Optional[str]) -> List[Table]:
    """The estimate in two tables: what one step holds (components), and whether it fits the chosen GPU."""
    def col(key, title):
        return _bytes(rows, key, title)

    components = (
        ("method", "method", str), ("rank", "rank", _text), ("trainable_params", "trainable", count),
        col("weights_bytes", "weights"), col("adapter_bytes", "adapter"), col("gradients_bytes", "grads"),
        col("optimizer_bytes", "optim"), col("master_bytes", "master"), col("method_state_bytes", "state"),
        col("activations_bytes", "activ."), col("logits_bytes", "logits"), col("peak_bytes", "peak"),
        ("peak_phase", "at", str),
    )
    fit = (
        ("method", "method", str), ("rank", "rank", _text), col("peak_bytes", "peak"), ("peak_phase", "at", str),
        col("overhead_bytes", "+runtime"), col("allowance_bytes", "+allocator"), col("spare_bytes", "spare"),
        ("fits", "fits 1 GPU", _text), (gpus_needed_text, "GPUs (FSDP)", None), ("step_ms", "step ms", ms),
    )
    on = f" on one {gpu}" if gpu else ""
    return [_table(rows, components, "Components per GPU without sharding (estimated)"),
            _table(rows, fit, f"Fit{on} (estimated)")]


def bench_tables(benched: Sequence[Dict]) -> List[Table]:
    """Measured vs estimated: the peak and time, the components held, and the peak of each phase."""
    def col(key, title):
        return _bytes(benched, key, title)

    def pair(what, title):
        return _pair(benched, f"bench_estimated_{what}", f"measured_{what}", title)

    fmt, unit = _unit(benched)
    main = (
        ("method", "method", str), ("rank", "rank", _text), ("bench_layers", "layers", _text),
        ("bench_status", "status", _text), ("bench_estimated_peak_bytes", f"est. peak {unit}", fmt),
        ("measured_peak_bytes", f"measured peak {unit}", fmt), ("peak_error_pct", "error %", signed_pct),
        ("within_tolerance", "within tol.", _text), col("measured_reserved_bytes", "allocator reserved"),
        col("measured_device_bytes", "NVML device"), ("bench_estimated_step_ms", "est. step ms", ms),
        ("measured_step_ms", "measured step ms", ms), ("measured_tokens_per_s", "tokens/s", fixed(0)),
        ("achieved_tflops", "TFLOP/s", fixed(1)),
    )
    held = (
        ("method", "method", str), ("rank", "rank", _text),
        pair("weights_bytes", "weights"), pair("adapter_bytes", "adapter"), pair("gradients_bytes", "grads"),
        pair("optimizer_bytes", "optim"), pair("method_state_bytes", "state"),
        # what forward leaves alive: saved activations and the logits/loss tensors (bench.py's pairing)
        _pair(benched, "bench_estimated_after_forward_bytes", "measured_activations_bytes", "after forward"),
        ("activations_error_pct", "after forward error %", signed_pct),
    )
    phases = (("method", "method", str), ("rank", "rank", _text)) + tuple(
        pair(f"{p}_peak_bytes", f"{p} peak") for p in ("forward", "backward", "optimizer"))
    return [_table(benched, main, "Peak and step time"),
            _table(benched, held, "What the step holds: estimate / measured"),
            _table(benched, phases, "Peak of each phase: estimate / measured")]


def seed_columns(seed: Sequence[Dict]):
    """The deep dive's table's columns, headed with the matrix and model the rows were computed for."""
    matrix, model = seed[0]["matrix"], seed[0]["model"]
    return (
        ("method", "method", str), ("seed_trained", "deep dive: trained", _text),
        ("seed_w_updated", "deep dive: W updated", _text), ("seed_pct", "deep dive: % of full", _text),
        ("matrix_trainable_params", f"ours: {matrix} trainable", count),
        ("matrix_pct_of_full", "% of W", pct),
        ("model_qv_trainable_params", f"{model} q,v", count),
        ("model_qv_pct_of_full", "% (q,v)", pct),
        ("model_all_linear_trainable_params", f"{model} all-linear", count),
        ("model_all_linear_pct_of_full", "% (all-linear)", pct),
        ("updates_base_weights", "ours: W updated", _text),
    )


# --------------------------------------------------------------------------------------------------
# The sections.


def bench_devices(rows: Sequence[Dict]) -> List[str]:
    """The devices the bench ran on, as named in its rows."""
    return sorted({str(r.get("bench_device_name") or r.get("bench_device")) for r in rows
                   if r.get("bench_status") is not None})


def _cuda_benched(rows: Sequence[Dict]) -> bool:
    return any(r.get("bench_device") == "cuda" for r in rows if r.get("bench_status") is not None)


def _settings(report: Dict) -> List[tuple]:
    """(item, value) rows: what was estimated for which device, and where the bench ran."""
    st, rows = report["settings"], report["rows"]
    setup = st["setup"]
    step = (f"batch {setup['batch_size']} x {setup['seq_len']} tokens, {setup['dtype']} base, "
            f"{setup['adapter_dtype']} adapters, {setup['optimizer']}"
            f"{', grad checkpointing' if setup['grad_checkpointing'] else ''}, {setup['attention']} attention"
            + (f", {setup['impl']} layers" if setup.get("impl") else ""))
    out = [("models", ", ".join(st["models"])), ("methods", ", ".join(st["methods"])),
           ("ranks", ", ".join(str(r) for r in st["ranks"])), ("targets", st["targets"] or "PEFT's default"),
           ("step", step)]
    if st["gpu"]:
        runtime = " (its CUDA runtime, foreach AdamW)" if setup["device"] == "cuda" else ""
        how = (f"at {st['mfu']:.0%} MFU" if st.get("mfu") is not None
               else "by the roofline model (lorabench.estimator.compute: matrix products and memory-bound ops)")
        out.append(("estimates", f"for one {st['gpu']}{runtime}; step time {how}"))
    else:
        out.append(("estimates", f"on {setup['device']}, no GPU chosen: no fit or step time"))
    if st["bench"]:
        b = st["bench"]
        devices = bench_devices(rows)
        probe = ("CUDA caching allocator and NVML" if _cuda_benched(rows)
                 else "live-tensor tracker (no CUDA runtime, allocator or NVML)")
        where = ", ".join(devices) if devices else "nothing measured"
        out.append(("bench ran on", f"{where}; memory from the {probe}"))
        out.append(("bench", f"{b['steps']} steps after {b['warmup']} warm-up, layers {b['layers'] or 'all'}"))
    return out


def _memory_paragraphs(report: Dict) -> List[str]:
    st, rows = report["settings"], report["rows"]
    out = ["Estimates, not measurements. 'peak' is the largest of the step's phases ('at'), what "
           "torch.cuda.max_memory_allocated() should read. '+runtime' (CUDA context, cuBLAS workspace) comes on "
           "top and counts for 'fits'; 'GPUs (FSDP)' is the fewest GPUs that hold the step fully sharded "
           "(weights, adapters, gradients and optimizer state split; activations and logits whole on each)."]
    if st["bench"] and not _cuda_benched(rows) and bench_devices(rows):
        out.append(f"The bench ran on {', '.join(bench_devices(rows))}, not on a GPU: the fit, '+runtime' and "
                   f"step time here are the estimate for {st['gpu'] or 'the chosen GPU'}, measured nowhere. "
                   "What was measured is in 'Measured vs estimated'.")
    return out


def _sections(report: Dict) -> List[Dict]:
    """The report's content, format-neutral: a list of sections {title, paragraphs, tables, bullets}."""
    env, st, rows = report["environment"], report["settings"], report["rows"]
    gpu_line = env.get("gpu_name") or "none found (NVML unavailable)"
    if env.get("gpu_count") and env["gpu_count"] > 1:
        gpu_line += f" (x{env['gpu_count']})"
    commit = env.get("git_commit") or "not a git checkout"
    if env.get("git_dirty"):
        commit += " (with uncommitted changes)"
    env_rows = [
        ("date (UTC)", env.get("date")), ("lorabench", f"{env.get('lorabench_version')}, commit {commit}"),
        ("GPU (NVML)", gpu_line), ("driver", env.get("driver_version")),
        ("CUDA (driver)", env.get("cuda_driver_version")), ("torch", env.get("torch_version")),
        ("CUDA (torch build)", env.get("torch_cuda_version")), ("python", env.get("python_version")),
        ("platform", env.get("platform")),
    ]
    kv = [{"k": k, "v": "" if v is None else str(v)} for k, v in env_rows + _settings(report)]
    left_out = [f"{x['model']}: {x['method']} left out: {x['why']}" for x in st.get("left_out", [])]
    sections = [{"title": "Environment and settings",
                 "tables": [Table(kv, (("k", "item", str), ("v", "value", str)), ids=1)], "bullets": left_out}]
    sections.append({"title": "Parameters", "tables": [_table(rows, PARAM_COLUMNS)]})
    notes = sorted({n for r in rows for n in r.get("notes", [])})
    on = f", estimated for one {st['gpu']}" if st["gpu"] else ""
    sections.append({"title": f"Memory and fit{on}", "paragraphs": _memory_paragraphs(report),
                     "tables": per_model(rows, lambda g: memory_tables(g, st["gpu"])),
                     "bullets": [f"note: {n}" for n in notes]})
    benched = [r for r in rows if r.get("bench_status") is not None]
    stopped = st.get("interrupted")
    cut = ""
    if stopped:
        waiting = len([r for r in rows if r.get("bench_status") is None]) - len(
            [r for r in rows if r["model"] in st.get("not_benched", [])])
        cut = (f"The bench was interrupted ({stopped}) after {len(benched)} measured case(s); "
               f"{waiting} case(s) after it are estimates only.")
    if benched:
        failed = [f"{r['model']} {plots.label(r)}: {r['bench_status']}"
                  f"{': ' + str(r['bench_error']) if r.get('bench_error') else ''}"
                  for r in benched if r["bench_status"] != "ok"]
        impls = sorted({str(r.get("bench_impl")) for r in benched})
        skipped = [f"{m}: one matrix, not a model; not benched." for m in st.get("not_benched", [])]
        sections.append({
            "title": "Measured vs estimated",
            "paragraphs": ([cut] if cut else []) + [
                f"Measured on {', '.join(bench_devices(benched))} ({', '.join(impls)} implementation). Estimates "
                "here are for the model as measured (cut to the bench's layers) on that device. "
                "error % = 100 x (estimate - measured) / measured. 'after forward' is what forward leaves "
                "alive: the saved activations with the logits and loss tensors."],
            "tables": per_model(benched, bench_tables),
            "bullets": failed + skipped,
        })
    else:
        sections.append({"title": "Measured vs estimated",
                         "paragraphs": [cut or "Not measured: run with --bench to add measurements on this "
                                               "machine's GPU."]})
    seed = report["seed_comparison"]
    seed_rank = next(r["rank"] for r in seed if r["rank"] is not None)
    sections.append({
        "title": "The deep dive's table, recomputed",
        "paragraphs": [f"The 'Neurons, Weights & Fine-Tuning' deep dive's 'Parameter efficiency' bars and technique "
                       f"table (d=4096, r=8) beside exact counts at r={seed_rank} for one {seed[0]['matrix']} "
                       f"matrix and for {seed[0]['model']} (PEFT's default targets q,v, and all-linear). "
                       "Percentages are trainable / the base's parameters."],
        "tables": [Table(seed, seed_columns(seed), ids=1)],
        "bullets": [f"{r['method']}: {r['why']}" for r in seed],
    })
    for s in sections:
        s["tables"] = [v for v in map(_visible, s.get("tables", [])) if v is not None]
    return sections


def report_markdown(report: Dict) -> str:
    """report.md: every table of the report; the figures live in report.html."""
    out = [f"# lorabench report: {', '.join(report['settings']['models'])}", "",
           f"```\n{report['command']}\n```", "",
           "Figures: report.html. Every number: results.json, results.csv."]
    for s in _sections(report):
        out += ["", f"## {s['title']}"]
        for p in s.get("paragraphs", []):
            out += ["", p]
        for t in s["tables"]:
            out += (["", f"**{t.caption}**"] if t.caption else []) + ["", markdown_table(t)]
        if s.get("bullets"):
            out += [""] + [f"- {b}" for b in s["bullets"]]
    return "\n".join(out) + "\n"


CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
pre { background: #f6f8fa; padding: .6em; white-space: pre-wrap; overflow-wrap: anywhere; }
.caption { font-weight: 600; margin: 1em 0 .3em; }
.scroll { overflow: auto; max-width: 100%; max-height: 80vh; margin: .3em 0 1em; width: fit-content;
          border: 1px solid #ddd; }
table { border-collapse: separate; border-spacing: 0; font-variant-numeric: tabular-nums; }
th, td { border-right: 1px solid #ddd; border-bottom: 1px solid #ddd; padding: 4px 9px; line-height: 20px;
         text-align: right; white-space: nowrap; background: #fff; }  /* whole-pixel rows: sticky cells align */
th { background: #f6f8fa; position: sticky; top: 0; z-index: 1; white-space: normal; vertical-align: bottom; }
th:first-child, td:first-child { position: sticky; left: 0; z-index: 1; }
th:first-child { z-index: 2; }
.text { text-align: left; } .wrap { white-space: normal; min-width: 6em; }
figure { margin: 1.5em 0; } figcaption { color: #444; font-size: .95em; max-width: 60em; }
img { max-width: 100%; height: auto; }
.note { color: #777; font-style: italic; }
"""


def report_html(report: Dict, figures: Dict[str, Optional["plots.Image"]]) -> str:
    """report.html: self-contained (inline CSS, figures as data URIs, no external reference)."""
    esc = html.escape
    title = f"lorabench report: {', '.join(report['settings']['models'])}"
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
           f"<h1>{esc(title)}</h1>", f"<pre>{esc(report['command'])}</pre>"]
    for s in _sections(report):
        out.append(f"<h2>{esc(s['title'])}</h2>")
        out += [f"<p>{esc(p)}</p>" for p in s.get("paragraphs", [])]
        for t in s["tables"]:
            out += ([f'<p class="caption">{esc(t.caption)}</p>'] if t.caption else []) + [html_table(t)]
        if s.get("bullets"):
            out.append("<ul>" + "".join(f"<li>{esc(b)}</li>" for b in s["bullets"]) + "</ul>")
    out.append("<h2>Figures</h2>")
    for key, (name, caption) in plots.CAPTIONS.items():
        image = figures.get(key)
        if image:
            out.append(f'<figure><img alt="{esc(name)}" src="{image.uri}" width="{image.width}" '
                       f'height="{image.height}"><figcaption><b>{esc(name)}.</b> {esc(caption)}'
                       "</figcaption></figure>")
        elif key == "measured_vs_estimated":
            out.append(f'<figure><p class="note">{esc(name)}: not measured; run with --bench.</p></figure>')
        else:
            out.append(f'<figure><p class="note">{esc(name)}: nothing to show.</p></figure>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"
