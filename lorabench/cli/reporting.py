"""`lorabench report`: a sweep as a report folder (lorabench.report), estimates and, with --bench, measurements."""

from __future__ import annotations

import contextlib
import os

import click

from lorabench.cli.main import CONTEXT, cli, note, one_line, pick_gpu
from lorabench.cli.options import DEFAULT_MODEL, LAYERS, MFU, STEPS, BoundedInt, Text, method_options, setup_options
from lorabench.errors import LorabenchError
from lorabench.estimator.compute import MATMUL_EFFICIENCY
from lorabench.models.keys import MAX_WIDTH
from lorabench.models.hub import is_local_model, resolve_specs
from lorabench.models.presets import from_name
from lorabench.models.spec import from_dimension
from lorabench.report import folder as reportfolder
from lorabench.safety import signals


def _report_specs(models, configs, dims):
    """The report's models: configs, presets and --d matrices, each once and each under its own name."""
    # the report's order: presets and Hub ids, then config files and model folders
    local = [m for m in models if is_local_model(m)]
    specs = resolve_specs([m for m in models if m not in local], [*configs, *local], configs_first=False)
    seen = {s.name for s in specs}
    specs += [s for s in map(from_dimension, dict.fromkeys(dims)) if s.name not in seen]
    return specs or [from_name(DEFAULT_MODEL)]


@cli.command(context_settings=CONTEXT)
@click.option("--model", "-m", "models", type=Text("NAME"), multiple=True,
              help=f"A preset, Hub id (ORG/NAME) or model folder; repeat for several models. Default: "
                   f"{DEFAULT_MODEL} (when no --config/--d).")
@click.option("--config", "configs", type=Text("PATH"), multiple=True,
              help="A Hugging Face config.json (or its folder); repeatable.")
@click.option("--d", "dims", type=BoundedInt(1, MAX_WIDTH), multiple=True,
              help="One d x d matrix (the deep dive's worked example); repeatable. Estimated, never benched.")
@method_options
@setup_options
@click.option("--gpu", type=Text("GPU"), default="H100-80GB", show_default=True,
              help="GPU for fit and estimated step time.")
@click.option("--mfu", type=MFU, default=None,
              help="Fraction of the GPU's dense peak its large matrix products reach, in [0.01, 1]. Default: "
                   f"{MATMUL_EFFICIENCY:.2f} (measured on an H100); the rows' mfu is what the whole step achieves.")
@click.option("--bench", is_flag=True, help="Also measure every case on this machine (needs torch).")
@click.option("--steps", type=STEPS, default=5, show_default=True, help="With --bench: timed steps per case.")
@click.option("--warmup", type=STEPS, default=2, show_default=True, help="With --bench: untimed steps first.")
@click.option("--layers", type=LAYERS, default=None,
              help="With --bench: build only this many layers of each model (estimates follow).")
@click.option("--name", type=Text("NAME"), default=None,
              help="Folder name. Default: from the models (llama-3-8b_mistral-7b).")
@click.option("--out-dir", type=Text("DIR"), default="reports", show_default=True,
              help="Where the report folder goes (made if missing).")
@click.option("--force", is_flag=True,
              help="If OUT_DIR/NAME is a report lorabench wrote that would be kept (files of yours in it, or "
                   "measurements this run lacks), move it aside (NAME.replaced-DATE); if it is an empty folder, "
                   "replace it. Any other folder is refused all the same. Nothing is ever deleted.")
def report(models, configs, dims, methods, methods_from_all, ranks, targets, setup, gpu, mfu, bench, steps,
           warmup, layers, name, out_dir, force):
    """A sweep of models x methods x ranks as a report folder: md, html, csv, json.

    Writes OUT_DIR/NAME/ with results.json (environment, command, settings,
    rows), results.csv, report.md (tables) and report.html (tables and figures,
    self-contained). The folder appears whole or not at all, and replaces only a
    report lorabench wrote (marked by a hidden .lorabench-report.json); any other
    folder of that name is refused before anything runs (--force: see below).
    Interrupted, an estimate-only report leaves the old folder as it was;
    --bench adds measurements on this machine's device, and interrupted (Ctrl-C,
    SIGTERM) the report keeps the cases measured so far; both exit 130/143.

    \b
    Example:
        lorabench report --model llama-3-8b --rank 8 --rank 64
        lorabench report -m llama-3-8b -m mistral-7b --method lora,vera,full --gpu A100-80GB
        lorabench report -m tiny-llama --bench --steps 3 --name tiny-bench
    """
    from lorabench import api, extras
    from lorabench.measure.envinfo import command_line
    from lorabench.report.build import FILES, build_report, check_name, default_name, report_markdown, write_report

    ctx = click.get_current_context()
    if not bench:
        given = [f"--{p}" for p in ("steps", "warmup", "layers")
                 if ctx.get_parameter_source(p) is not click.core.ParameterSource.DEFAULT]
        if given:
            raise click.UsageError(f"{', '.join(given)} only apply with --bench.")
    extras.require("report", "lorabench report")
    if bench:
        extras.require("bench", "lorabench report --bench")
    specs = _report_specs(models, configs, dims)
    shallow = [s.name for s in specs if layers and not s.single_matrix and s.num_layers <= layers]
    name = check_name(name) if name is not None else default_name(specs)
    chosen = pick_gpu(gpu)
    methods = api.quantized_methods(methods, methods_from_all, setup, lambda _: None)  # without a note, as before
    # before any work: refuse now, not after an hour of benchmarks
    reportfolder.check_report_target(out_dir, name, FILES, force, measured=bench)
    data = build_report(specs, methods, ranks, targets, setup, chosen, mfu, command=command_line(),
                        bench={"layers": layers, "steps": steps, "warmup": warmup} if bench else None)
    # With --bench a Ctrl-C now would throw away what was measured: it waits for the report. Estimates
    # are seconds to redo: it stops the run, and the old report stays (write_report holds it only
    # through the swap itself).
    with signals.signals_deferred() if bench else contextlib.nullcontext():
        try:
            path, moved = write_report(data, out_dir, name, force)
        except (OSError, LorabenchError) as exc:  # a full disk, or the folder changed: print, don't lose
            click.echo(report_markdown(data))
            why = exc if isinstance(exc, LorabenchError) else exc.strerror or exc
            where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
            click.echo(one_line(f"lorabench: error: cannot write the report: {why}{where}; its tables are on "
                                "stdout above."), err=True)
            path = None
        else:
            if moved is not None:
                note(f"the folder that was at {path} is now {moved}.")
            click.echo(f"wrote {path}{os.sep} ({', '.join(sorted(FILES))})")
    if path is None:
        ctx.exit(1)
    note(api.targets_note(methods, targets))
    if shallow:
        note(f"--layers {layers} is not fewer than the layers of {', '.join(shallow)}: measured whole.")
    if targets is not None and any(s.single_matrix for s in specs):
        note("--targets does not apply to the --d matrices (each is its own one target).")
    stopped = data["settings"]["interrupted"]
    if stopped:
        measured = sum(1 for r in data["rows"] if r.get("bench_status") is not None)
        click.echo(f"lorabench: interrupted ({stopped}) after {measured} measured case(s); the report holds "
                   "those and estimates for the rest.", err=True)
        ctx.exit(130 if stopped == "SIGINT" else signals.Terminated.exit_code)
