"""`lorabench report`: a sweep of methods x ranks x models written as one folder, atomically.

The folder holds results.json, results.csv, report.md and a self-contained report.html (inline CSS,
figures as base64 PNG). results.json is

    {"environment": {...},        # lorabench.measure.envinfo.capture_environment()
     "command": "lorabench ...",  # sys.argv, shell-quoted (envinfo.command_line)
     "settings": {...},           # models, methods, ranks, targets, setup, gpu, mfu, bench options,
                                  # left_out: [{model, method, why}] (a method a model refuses)
     "rows": [...],               # one per (model, method, rank): params + memory rows, + bench keys
     "seed_comparison": [...]}    # lorabench.report.deepdive.seed_rows()

Numbers stay numbers (bytes, counts, ms); only report.md and report.html (lorabench.report.text) format
them, and render_folder rebuilds both (and the figures) from a results.json.
The estimate path never imports torch; the bench (lorabench.measure.bench) is imported only when asked for.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from lorabench.report import folder as reportfolder, plots
from lorabench.safety import signals
from lorabench.measure.envinfo import capture_environment, utc_now
from lorabench.errors import LorabenchError
from lorabench.estimator.rows import memory_rows, param_rows, usable_methods
from lorabench.gpus import GPU
from lorabench.estimator.setup import TrainingSetup
from lorabench.methods import Method
from lorabench.render.formats import finite, render
from lorabench.report.text import report_html, report_markdown
from lorabench.report.deepdive import seed_rows
from lorabench.models.spec import ModelSpec

FILES = ("results.json", "results.csv", "report.md", "report.html")

# A bench row's own fields, renamed so they cannot collide with the estimate's.
BENCH_RENAMES = {"layers": "bench_layers", "impl": "bench_impl", "device": "bench_device",
                 "device_name": "bench_device_name", "status": "bench_status", "error": "bench_error"}
# The bench's estimate for the model it measured (cut to --layers), kept beside the measurement.
BENCH_ESTIMATES = ("weights_bytes", "adapter_bytes", "gradients_bytes", "optimizer_bytes", "method_state_bytes",
                   "activations_bytes", "forward_peak_bytes", "backward_peak_bytes", "optimizer_peak_bytes",
                   "peak_bytes", "device_bytes", "step_ms")
BENCH_RESULTS = ("peak_error_pct", "within_tolerance", "achieved_tflops", "matmul_tflops",
                 "activations_error_pct")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


# --------------------------------------------------------------------------------------------------
# Rows.


def _key(row: Dict):
    return row["method"], row["rank"]


def _own_targets(spec: ModelSpec, targets):
    return None if spec.single_matrix else targets  # a --d matrix is its own one target


def sweep_rows(plan: Sequence[Tuple[ModelSpec, Sequence[Method]]], ranks: Sequence[int], targets,
               setup: TrainingSetup, gpu: Optional[GPU], mfu: float) -> List[Dict]:
    """Parameter and memory rows merged per (model, method, rank), models in the order given; plan is
    (model, its methods) pairs."""
    rows = []
    for spec, methods in plan:
        own = _own_targets(spec, targets)
        mem = {_key(r): r for r in memory_rows(spec, methods, ranks, own, setup, gpu, mfu)}
        for prow in param_rows(spec, methods, ranks, own):
            row = dict(prow)
            row.update(mem[_key(prow)])
            rows.append(row)
    return rows


def bench_fields(bench_row: Dict, estimate_keys) -> Dict:
    """The fields a bench row adds to a report row (see lorabench.measure.bench.run_bench).

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


def run_benches(plan: Sequence[Tuple[ModelSpec, Sequence[Method]]], ranks: Sequence[int], targets,
                setup: TrainingSetup, *, layers: Optional[int], steps: int, warmup: int,
                into: Optional[Dict[str, List[Dict]]] = None) -> Dict[str, List[Dict]]:
    """lorabench.measure.bench.run_bench for every model of plan (not for --d matrices); rows by model name.

    Rows land in `into` as each case finishes, so a caller that catches an interrupt keeps them.

    Raises:
        LorabenchError: the bench cannot run here (no torch, no lorabench.measure.bench).
    """
    try:
        with signals.signals_deferred():  # a Ctrl-C inside torch's import can abort the process or be lost
            from lorabench.measure.bench import run_bench
    except ImportError as exc:
        raise LorabenchError(f"--bench cannot run: {exc}.") from exc
    out = {} if into is None else into
    for spec, methods in plan:
        if spec.single_matrix or not methods:
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


def stderr_note(text: str) -> None:
    print(f"lorabench: note: {text}", file=sys.stderr)


def build_report(specs: Sequence[ModelSpec], methods: Sequence[Method], ranks: Sequence[int], targets,
                 setup: TrainingSetup, gpu: Optional[GPU], mfu: float, *, command: str,
                 bench: Optional[Dict] = None, note: Callable[[str], None] = stderr_note) -> Dict:
    """The whole report as plain data (what results.json holds).

    Args:
        bench: None for estimates only, else run_bench's options {"layers", "steps", "warmup"}.
        note: told of each model x method left out (see usable_methods), before any work.

    Raises:
        LorabenchError: bad input for a model (see usable_methods), or the bench cannot run here.
    """
    started = utc_now()
    plan, left_out = [], []
    for spec in specs:
        kept, refused = usable_methods(spec, methods, ranks, _own_targets(spec, targets))
        plan.append((spec, kept))
        left_out += [{"model": spec.name, "method": m.name, "why": str(exc)} for m, exc in refused]
    for x in left_out:
        note(f"{x['model']}: {x['method']} left out: {x['why']}")
    rows = sweep_rows(plan, ranks, targets, setup, gpu, mfu)
    interrupted = None
    if bench is not None:
        benched: Dict[str, List[Dict]] = {}
        try:
            run_benches(plan, ranks, targets, setup, into=benched, **bench)
        except KeyboardInterrupt:
            interrupted = "SIGINT"
        except signals.Terminated:
            interrupted = "SIGTERM"
        rows = merge_bench(rows, benched)
    try:  # with --bench, a signal now would throw away what was measured: it ends the report instead
        with signals.signals_deferred() if bench is not None else contextlib.nullcontext():
            # Captured after the bench, so that torch's own answers are in it when the bench loaded torch.
            environment = capture_environment(date=started)
            seeds = seed_rows()
    except KeyboardInterrupt:
        if bench is None:
            raise
        interrupted = interrupted or "SIGINT"
    except signals.Terminated:
        if bench is None:
            raise
        interrupted = interrupted or "SIGTERM"
    return {
        "environment": environment,
        "command": command,
        "settings": {
            "models": [s.name for s in specs], "methods": [m.name for m in methods], "ranks": list(ranks),
            "targets": targets, "setup": asdict(setup), "gpu": gpu.name if gpu else None, "mfu": mfu,
            "bench": dict(bench) if bench is not None else None,
            "not_benched": [s.name for s in specs if s.single_matrix] if bench is not None else [],
            # the bench was stopped by this signal; rows measured before it are in, the rest estimates only
            "interrupted": interrupted,
            "left_out": left_out,
        },
        "rows": rows,
        "seed_comparison": seeds,
    }


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


def write_report(report: Dict, out_dir: os.PathLike | str, name: str,
                 force: bool = False) -> Tuple[Path, Optional[Path]]:
    """Write the report to out_dir/name all at once; returns that path and, with force, where a folder
    lorabench did not write was moved (else None).

    The files are built in a hidden temporary folder beside the target (same filesystem), marked as
    lorabench's, then swapped with the old report in one atomic exchange (lorabench.report.folder). Any
    failure, KeyboardInterrupt and SIGTERM included, leaves the old report (or none) and no temporary
    folder; one that arrives during the swap itself takes effect once it is done (the new report is then
    in place); a SIGKILL's leftovers are cleaned by the next run.

    Raises:
        LorabenchError: a bad name, a target that is not lorabench's (or, with force, one that force may not
            touch), or an unwritable place.
    """
    measured = has_measurements(report)
    target = reportfolder.check_report_target(str(out_dir), check_name(name), FILES, force, measured)
    made = reportfolder.missing_folders(target.parent)
    tmp = None
    try:
        with signals.signals_deferred():  # tmp is named here before a signal can end the run
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


def read_results(folder: os.PathLike | str) -> Dict:
    """A report folder's results.json.

    Raises:
        LorabenchError: no readable results.json there, or not a report's.
    """
    path = Path(folder) / "results.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LorabenchError(f"cannot read {path}: {exc}") from None
    if not isinstance(report, dict) or not {"environment", "command", "settings", "rows"} <= set(report):
        raise LorabenchError(f"{path} is not a lorabench report's results.json.")
    return report


def render_folder(folder: os.PathLike | str, report: Optional[Dict] = None) -> Path:
    """Rebuild a report folder's files (tables, figures, CSV) from a report, by default its own
    results.json, without estimating or measuring anything again: what was recorded stays as recorded.
    The folder is replaced atomically, as write_report does (and only a folder lorabench wrote).

    Raises:
        LorabenchError: see read_results and write_report.
    """
    folder = Path(folder)
    target, _ = write_report(read_results(folder) if report is None else report, folder.parent, folder.name)
    return target
