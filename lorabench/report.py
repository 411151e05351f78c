"""`lorabench report`: a sweep of methods x ranks x models written as one folder, atomically.

The folder holds results.json, results.csv, report.md and a self-contained report.html (inline CSS,
figures as base64 PNG). results.json is

    {"environment": {...},        # lorabench.envinfo.capture_environment()
     "command": "lorabench ...",  # sys.argv, shell-quoted (envinfo.command_line)
     "settings": {...},           # models, methods, ranks, targets, setup, gpu, mfu, bench options
     "rows": [...],               # one per (model, method, rank): params + memory rows, + bench keys
     "seed_comparison": [...]}    # lorabench.seed.seed_rows()

Numbers stay numbers (bytes, counts, ms); only report.md and report.html format them.
The estimate path never imports torch; the bench (lorabench.bench) is imported only when asked for.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from lorabench import plots, reportfolder, signals
from lorabench.envinfo import capture_environment, utc_now
from lorabench.errors import LorabenchError
from lorabench.estimate import memory_rows, param_rows
from lorabench.gpus import GPU
from lorabench.memory import TrainingSetup
from lorabench.methods import Method
from lorabench.render import GPU_COLUMNS, MEMORY_COLUMNS, PARAM_COLUMNS, _text, count, finite, render
from lorabench.render import gib as _gib
from lorabench.seed import seed_rows
from lorabench.specs import ModelSpec

FILES = ("results.json", "results.csv", "report.md", "report.html")

# A bench row's own fields, renamed so they cannot collide with the estimate's.
BENCH_RENAMES = {"layers": "bench_layers", "impl": "bench_impl", "device": "bench_device",
                 "device_name": "bench_device_name", "status": "bench_status", "error": "bench_error"}
# The bench's estimate for the model it measured (cut to --layers), kept beside the measurement.
BENCH_ESTIMATES = ("weights_bytes", "adapter_bytes", "gradients_bytes", "optimizer_bytes",
                   "activations_bytes", "peak_bytes", "device_bytes", "step_ms")
BENCH_RESULTS = ("peak_error_pct", "within_tolerance", "achieved_tflops", "matmul_tflops",
                 "activations_error_pct")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


# --------------------------------------------------------------------------------------------------
# Rows.



def gib(n) -> str:
    """GiB with two decimals, four below 1 GiB (small models and CPU benches read as 0.00 otherwise)."""
    if n is not None and abs(n) < 2 ** 30:
        return f"{n / 2 ** 30:.4f}"
    return _gib(n)

def _key(row: Dict):
    return row["method"], row["rank"]


def sweep_rows(specs: Sequence[ModelSpec], methods: Sequence[Method], ranks: Sequence[int],
               targets, setup: TrainingSetup, gpu: Optional[GPU], mfu: float) -> List[Dict]:
    """Parameter and memory rows merged per (model, method, rank), models in the order given."""
    rows = []
    for spec in specs:
        own = None if spec.single_matrix else targets  # a --d matrix is its own one target
        mem = {_key(r): r for r in memory_rows(spec, methods, ranks, own, setup, gpu, mfu)}
        for prow in param_rows(spec, methods, ranks, own):
            row = dict(prow)
            row.update(mem[_key(prow)])
            rows.append(row)
    return rows


def distinct_specs(entries: Sequence[Tuple[object, str, ModelSpec]]) -> List[ModelSpec]:
    """The models of a report, each once and each under its own name.

    entries are (key, label, spec): entries with the same key (a preset named twice, one config file
    reached by two paths) are one model. Specs that share a name but not a key (two config folders
    called my-model, or a config folder called llama-3-8b beside the preset) take their label as name,
    so that rows, bench results and the folder name never mix them.
    """
    seen: Dict[object, Tuple[str, ModelSpec]] = {}
    for key, label, spec in entries:
        seen.setdefault(key, (label, spec))
    names = [spec.name for _, spec in seen.values()]
    return [replace(spec, name=label) if names.count(spec.name) > 1 and label != spec.name else spec
            for label, spec in seen.values()]


def bench_fields(bench_row: Dict, estimate_keys) -> Dict:
    """The fields a bench row adds to a report row (see lorabench.bench.run_bench).

    The bench's own fields become bench_*, its estimate for the model as built (cut to --layers)
    bench_estimated_*, measured_* and the verdicts keep their names; its other copies of estimate
    fields (estimate_keys, already in the report row for the whole model) are dropped.
    """
    out: Dict = dict.fromkeys([*BENCH_RENAMES.values(), *(f"bench_estimated_{k}" for k in BENCH_ESTIMATES),
                               *BENCH_RESULTS])
    for key, value in bench_row.items():
        if key in BENCH_RENAMES:
            out[BENCH_RENAMES[key]] = value
        elif key in BENCH_ESTIMATES:
            out[f"bench_estimated_{key}"] = value
        elif key.startswith("measured_") or key in BENCH_RESULTS:
            out[key] = value
        elif key not in estimate_keys:
            out[f"bench_{key}"] = value
    return out


def run_benches(specs: Sequence[ModelSpec], methods: Sequence[Method], ranks: Sequence[int], targets,
                setup: TrainingSetup, *, layers: Optional[int], steps: int, warmup: int,
                into: Optional[Dict[str, List[Dict]]] = None) -> Dict[str, List[Dict]]:
    """lorabench.bench.run_bench for every model (not for --d matrices); rows by model name.

    Rows land in `into` as each case finishes, so a caller that catches an interrupt keeps them.

    Raises:
        LorabenchError: the bench cannot run here (no torch, no lorabench.bench).
    """
    try:
        with signals.signals_deferred():  # a Ctrl-C inside torch's import can abort the process or be lost
            from lorabench.bench import run_bench
    except ImportError as exc:
        raise LorabenchError(f"--bench cannot run: {exc}.") from exc
    out = {} if into is None else into
    for spec in specs:
        if spec.single_matrix:
            continue
        # gpu=None: the bench estimates for the GPU it runs on, not for the one the sweep is about.
        run_bench(spec, methods, ranks, targets, setup, layers=layers, steps=steps, warmup=warmup,
                  impl=setup.impl, progress=True, gpu=None, on_row=out.setdefault(spec.name, []).append)
    return out


def merge_bench(rows: List[Dict], benched: Dict[str, List[Dict]]) -> List[Dict]:
    """rows with each measured (model, method, rank) given its bench fields."""
    index = {(model, *_key(b)): b for model, brows in benched.items() for b in brows}
    out = []
    for row in rows:
        match = index.get((row["model"], *_key(row)))
        out.append({**row, **bench_fields(match, row)} if match is not None else dict(row))
    return out


def build_report(specs: Sequence[ModelSpec], methods: Sequence[Method], ranks: Sequence[int], targets,
                 setup: TrainingSetup, gpu: Optional[GPU], mfu: float, *, command: str,
                 bench: Optional[Dict] = None) -> Dict:
    """The whole report as plain data (what results.json holds).

    Args:
        bench: None for estimates only, else run_bench's options {"layers", "steps", "warmup"}.
    """
    started = utc_now()
    rows = sweep_rows(specs, methods, ranks, targets, setup, gpu, mfu)
    interrupted = None
    if bench is not None:
        benched: Dict[str, List[Dict]] = {}
        try:
            run_benches(specs, methods, ranks, targets, setup, into=benched, **bench)
        except KeyboardInterrupt:
            interrupted = "SIGINT"
        except signals.Terminated:
            interrupted = "SIGTERM"
        rows = merge_bench(rows, benched)
    return {
        # Captured after the bench, so that torch's own answers are in it when the bench loaded torch.
        "environment": capture_environment(date=started),
        "command": command,
        "settings": {
            "models": [s.name for s in specs], "methods": [m.name for m in methods], "ranks": list(ranks),
            "targets": targets, "setup": asdict(setup), "gpu": gpu.name if gpu else None, "mfu": mfu,
            "bench": dict(bench) if bench is not None else None,
            "not_benched": [s.name for s in specs if s.single_matrix] if bench is not None else [],
            # the bench was stopped by this signal; rows measured before it are in, the rest estimates only
            "interrupted": interrupted,
        },
        "rows": rows,
        "seed_comparison": seed_rows(),
    }


# --------------------------------------------------------------------------------------------------
# Text: markdown and HTML.


def _fmt_pct_err(v) -> str:
    return "" if v is None else f"{v:+.1f}"


def _ms(v) -> str:
    if v is None:
        return ""
    return f"{v:,.0f}" if v >= 10 else f"{v:.3g}"


def _pair(est_key: str, meas_key: str):
    return lambda r: f"{gib(r.get(est_key)) or '-'} / {gib(r.get(meas_key)) or '-'}"


def _pct_of_full(v) -> str:
    return "" if v is None else (f"{v:.4f}" if v < 1 else f"{v:.2f}")


# (key or function of the row, title) tables; a function gets the whole row.
BENCH_COLUMNS = (
    ("method", "method", str), ("rank", "rank", _text), ("bench_layers", "layers", _text),
    ("bench_status", "status", _text), ("bench_estimated_peak_bytes", "est. peak", gib),
    ("measured_peak_bytes", "measured peak", gib), ("peak_error_pct", "error %", _fmt_pct_err),
    ("within_tolerance", "within tol.", _text), ("measured_device_bytes", "NVML device", gib),
    ("bench_estimated_step_ms", "est. step ms", _ms), ("measured_step_ms", "measured step ms", _ms),
    ("measured_tokens_per_s", "tokens/s", lambda v: "" if v is None else f"{v:,.0f}"),
    ("achieved_tflops", "TFLOP/s", lambda v: "" if v is None else f"{v:,.1f}"),
)

BENCH_COMPONENT_COLUMNS = (
    ("method", "method", str), ("rank", "rank", _text),
    (_pair("bench_estimated_weights_bytes", "measured_weights_bytes"), "weights", None),
    (_pair("bench_estimated_adapter_bytes", "measured_adapter_bytes"), "adapter", None),
    (_pair("bench_estimated_gradients_bytes", "measured_gradients_bytes"), "grads", None),
    (_pair("bench_estimated_optimizer_bytes", "measured_optimizer_bytes"), "optim", None),
    (_pair("bench_estimated_activations_bytes", "measured_activations_bytes"), "activ.", None),
    (_pair("bench_estimated_peak_bytes", "measured_peak_bytes"), "peak", None),
)


def seed_columns(seed: Sequence[Dict]):
    """The seed table's columns, headed with the matrix and model the rows were computed for."""
    matrix, model = seed[0]["matrix"], seed[0]["model"]
    return (
        ("method", "method", str), ("seed_trained", "deep dive: trained", _text),
        ("seed_w_updated", "deep dive: W updated", _text), ("seed_pct", "deep dive: % of full", _text),
        ("matrix_trainable_params", f"ours: {matrix} trainable", count),
        ("matrix_pct_of_full", "% of W", _pct_of_full),
        ("model_qv_trainable_params", f"{model} q,v", count),
        ("model_qv_pct_of_full", "% (q,v)", _pct_of_full),
        ("model_all_linear_trainable_params", f"{model} all-linear", count),
        ("model_all_linear_pct_of_full", "% (all-linear)", _pct_of_full),
        ("updates_base_weights", "ours: W updated", _text),
    )


# Columns of text, aligned left; numbers align right.
LEFT = {"model", "method", "k", "v", "seed_trained", "peak_phase", "bench_status"}
# The report's memory table: the library's, with step times below 10 ms kept readable.
REPORT_MEMORY_COLUMNS = tuple((k, t, gib if f is _gib else f) for k, t, f in MEMORY_COLUMNS) + tuple(
    (k, t, _ms) if k == "step_ms" else (k, t, f) for k, t, f in GPU_COLUMNS)


def table(rows: Sequence[Dict], columns, fmt: str) -> str:
    """rows as a markdown ("github") or "html" table; a column is (key or fn(row), title, fn(value))."""
    from tabulate import tabulate

    def cell(r, key, fn):
        return key(r) if callable(key) else fn(r.get(key))

    body = [[cell(r, key, fn) for key, _, fn in columns] for r in rows]
    return tabulate(body, headers=[c[1] for c in columns], tablefmt="github" if fmt == "markdown" else "html",
                    disable_numparse=True,
                    colalign=["left" if c[0] in LEFT else "right" for c in columns])


def _with_model(columns, rows: Sequence[Dict]):
    many = len({r["model"] for r in rows}) > 1
    return ((("model", "model", str),) if many else ()) + tuple(columns)


def _sections(report: Dict) -> List[Dict]:
    """The report's content, format-neutral: a list of sections {title, paragraphs, tables, bullets}."""
    env, st, rows = report["environment"], report["settings"], report["rows"]
    setup = st["setup"]
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
    setup_text = (f"batch {setup['batch_size']} x {setup['seq_len']} tokens, {setup['dtype']} base, "
                  f"{setup['adapter_dtype']} adapters, {setup['optimizer']}"
                  f"{', grad checkpointing' if setup['grad_checkpointing'] else ''}, "
                  f"{setup['attention']} attention, on {setup['device']}")
    settings = [
        ("models", ", ".join(st["models"])), ("methods", ", ".join(st["methods"])),
        ("ranks", ", ".join(str(r) for r in st["ranks"])), ("targets", st["targets"] or "PEFT's default"),
        ("step", setup_text), ("GPU for fit and step time", f"{st['gpu']} at {st['mfu']:.0%} MFU"),
    ]
    if st["bench"]:
        b = st["bench"]
        settings.append(("bench", f"{b['steps']} steps after {b['warmup']} warm-up, "
                                  f"layers {b['layers'] or 'all'}"))
    kv = [{"k": k, "v": "" if v is None else str(v)} for k, v in env_rows + settings]
    kv_cols = (("k", "item", str), ("v", "value", str))

    sections = [{"title": "Environment and settings", "tables": [(kv, kv_cols)]}]
    sections.append({"title": "Parameters", "tables": [(rows, _with_model(PARAM_COLUMNS, rows))]})
    notes = sorted({n for r in rows for n in r.get("notes", [])})
    sections.append({
        "title": "Memory and fit",
        "paragraphs": ["GiB per GPU without sharding. 'peak' is the largest of the step's phases, what "
                       "torch.cuda.max_memory_allocated() should read; '+runtime' (CUDA context, cuBLAS "
                       "workspace) comes on top and counts for 'fits'."],
        "tables": [(rows, _with_model(REPORT_MEMORY_COLUMNS, rows))],
        "bullets": [f"note: {n}" for n in notes],
    })
    benched = [r for r in rows if r.get("bench_status") is not None]
    stopped = st.get("interrupted")
    if stopped:
        waiting = len([r for r in rows if r.get("bench_status") is None]) - len(
            [r for r in rows if r["model"] in st.get("not_benched", [])])
        cut = (f"The bench was interrupted ({stopped}) after {len(benched)} measured case(s); "
               f"{waiting} case(s) after it are estimates only.")
    if benched:
        failed = [f"{r['model']} {plots.label(r)}: {r['bench_status']}"
                  f"{': ' + str(r['bench_error']) if r.get('bench_error') else ''}"
                  for r in benched if r["bench_status"] != "ok"]
        devices = sorted({str(r.get("bench_device_name") or r.get("bench_device")) for r in benched})
        impls = sorted({str(r.get("bench_impl")) for r in benched})
        skipped = [f"{m}: one matrix, not a model; not benched." for m in st.get("not_benched", [])]
        sections.append({
            "title": "Measured vs estimated",
            "paragraphs": ([cut] if stopped else []) + [
                f"Measured on {', '.join(devices)} ({', '.join(impls)} implementation). Estimates "
                "here are for the model as measured (cut to the bench's layers) on that device. "
                "error % = 100 x (estimate - measured) / measured. Components: estimate / measured, GiB."],
            "tables": [(benched, _with_model(BENCH_COLUMNS, benched)),
                       (benched, _with_model(BENCH_COMPONENT_COLUMNS, benched))],
            "bullets": failed + skipped,
        })
    else:
        sections.append({"title": "Measured vs estimated",
                         "paragraphs": [cut if stopped else
                                        "Not measured: run with --bench to add measurements on this machine's GPU."]})
    seed = report["seed_comparison"]
    seed_rank = next(r["rank"] for r in seed if r["rank"] is not None)
    sections.append({
        "title": "The deep dive's table, recomputed",
        "paragraphs": [f"The 'Neurons, Weights & Fine-Tuning' deep dive's 'Parameter efficiency' bars and technique "
                       f"table (d=4096, r=8) beside "
                       f"exact counts at r={seed_rank} for one {seed[0]['matrix']} matrix and for "
                       f"{seed[0]['model']} (PEFT's default targets q,v, and all-linear). Percentages are "
                       f"trainable / the base's parameters."],
        "tables": [(seed, seed_columns(seed))],
        "bullets": [f"{r['method']}: {r['why']}" for r in seed],
    })
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
        for rows, cols in s.get("tables", []):
            out += ["", table(rows, cols, "markdown")]
        if s.get("bullets"):
            out += [""] + [f"- {b}" for b in s["bullets"]]
    return "\n".join(out) + "\n"


CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
pre { background: #f6f8fa; padding: .6em; overflow-x: auto; }
table { border-collapse: collapse; margin: .8em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
th { background: #f6f8fa; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: .95em; }
img { max-width: 100%; height: auto; }
.note { color: #777; font-style: italic; }
"""


def report_html(report: Dict, figures: Dict[str, Optional[str]]) -> str:
    """report.html: self-contained (inline CSS, figures as data URIs, no external reference)."""
    esc = html.escape
    title = f"lorabench report: {', '.join(report['settings']['models'])}"
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
           f"<h1>{esc(title)}</h1>", f"<pre>{esc(report['command'])}</pre>"]
    for s in _sections(report):
        out.append(f"<h2>{esc(s['title'])}</h2>")
        out += [f"<p>{esc(p)}</p>" for p in s.get("paragraphs", [])]
        out += [table(rows, cols, "html") for rows, cols in s.get("tables", [])]
        if s.get("bullets"):
            out.append("<ul>" + "".join(f"<li>{esc(b)}</li>" for b in s["bullets"]) + "</ul>")
    out.append("<h2>Figures</h2>")
    for key, caption in plots.CAPTIONS.items():
        uri = figures.get(key)
        if uri:
            out.append(f'<figure><img alt="{esc(caption)}" src="{uri}"><figcaption>{esc(caption)}'
                       f"</figcaption></figure>")
        elif key == "measured_vs_estimated":
            out.append(f'<figure><p class="note">{esc(caption)}: not measured; run with --bench.</p></figure>')
        else:
            out.append(f'<figure><p class="note">{esc(caption)}: nothing to show.</p></figure>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------
# The folder, written atomically.


def default_name(specs: Sequence[ModelSpec]) -> str:
    """A folder name from the models: llama-3-8b, or llama-3-8b_d-4096 for several."""
    parts = [re.sub(r"[^A-Za-z0-9._+-]+", "-", s.name).strip("-.") for s in specs]
    return "_".join(p for p in parts if p)[:100] or "report"


def check_name(name: str) -> str:
    """name if it is a plain folder name.

    Raises:
        LorabenchError: a path, a hidden name, or characters outside letters, digits and ._+-.
    """
    if len(name) > 200:
        raise LorabenchError(f"report name is {len(name)} characters long; keep it to 200.")
    if not NAME_RE.match(name):
        raise LorabenchError(f"report name '{name}' must be a plain folder name: letters, digits and . _ + -, "
                             f"not starting with '.' or '-'.")
    return name


def write_files(report: Dict, folder: Path) -> None:
    """The four files of a report into an existing folder."""
    def write(name: str, text: str) -> None:
        (folder / name).write_text(text, encoding="utf-8")

    write("results.json", json.dumps(finite(report), indent=2, allow_nan=False) + "\n")
    write("results.csv", render(report["rows"], "csv", ()) + "\n")
    write("report.md", report_markdown(report))
    write("report.html", report_html(report, plots.render_plots(report["rows"])))


def has_measurements(report: Dict) -> bool:
    """Some case of the report was measured (its bench ran to the end)."""
    return any(r.get("bench_status") == "ok" for r in report["rows"])


def write_report(report: Dict, out_dir: os.PathLike | str, name: str, force: bool = False) -> Tuple[Path, Optional[Path]]:
    """Write the report to out_dir/name all at once; returns that path and, with force, where a folder
    lorabench did not write was moved (else None).

    The files are built in a hidden temporary folder beside the target (same filesystem), marked as
    lorabench's, then swapped with the old report in one atomic exchange (lorabench.reportfolder). Any
    failure, KeyboardInterrupt and SIGTERM included, leaves the old report (or none) and no temporary
    folder; a SIGKILL's leftovers are cleaned by the next run.

    Raises:
        LorabenchError: a bad name, a target that is not lorabench's (without force), or an unwritable place.
    """
    measured = has_measurements(report)
    target = reportfolder.check_report_target(str(out_dir), check_name(name), FILES, force, measured)
    made = reportfolder.missing_folders(target.parent)
    tmp = None
    try:
        tmp = reportfolder.new_report_folder(target.parent, name)
        write_files(report, tmp)
        reportfolder.write_marker(tmp, FILES, measured)
        moved = reportfolder.publish_report(tmp, target, force, measured)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # our own temporary folder
        reportfolder.remove_empty_folders(made)  # and the --out-dir folders this run made
        raise
    return target, moved
