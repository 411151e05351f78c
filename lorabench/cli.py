"""The `lorabench` command: parses options, calls the estimation core, renders. Nothing else.

The estimation commands (params, memory, models, gpus) never import torch.
"""

from __future__ import annotations

import os
import re
import sys
import traceback

import click

from lorabench import __version__, reportfolder, safeio, signals
from lorabench.cliopts import (DEFAULT_MODEL, LAYERS, MFU, STEPS, BoundedFloat, BoundedInt, Text, format_option,
                               method_options, model_options, setup_options, targets_note)
from lorabench.errors import LorabenchError
from lorabench.gpus import GPUS, get_gpu
from lorabench.hfconfig import MAX_WIDTH, config_json_path, load_config, printable_path
from lorabench.hub import is_local_model, resolve_model
from lorabench.memory import QUANTIZED
from lorabench.render import (BENCH_COLUMNS, GPU_COLUMNS, MEMORY_COLUMNS, PARAM_COLUMNS, bench_text, gib,
                              render)
from lorabench.specs import PRESETS, from_dimension, from_name

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

# Exit codes: 0 done; 1 a --check failed, nothing was measured, or an output could not be written
# mid-run; 2 bad input (one line on stderr); 130 SIGINT; 143 SIGTERM; 70 a bug in lorabench (please report).
EXIT_INTERNAL = 70


_LONG_WORD = re.compile(r"\S{121,}")
# click >= 8.2 raises this for a group run without a command; older clicks print the help themselves
_NO_ARGS = getattr(click.exceptions, "NoArgsIsHelpError", ())


def one_line(text: str) -> str:
    """A message fit for one terminal line: control characters escaped (a newline or an escape sequence
    in a user's value cannot break the line or clear the screen), words over 120 characters shortened in
    the middle (a 400-character --model, a 300-digit number), keeping a path's start and its file name."""
    text = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in str(text))
    return _LONG_WORD.sub(lambda m: f"{m[0][:50]}...{m[0][-50:]} ({len(m[0]):,} characters)", text)


class Cli(click.Group):
    """A group whose user errors are one line on stderr and exit code 2, never a traceback; SIGINT and
    SIGTERM end any command with 130 and 143."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if sys.stdout is None:  # `lorabench ... >&-`: Python sets it to None and click would print nothing
            click.echo("lorabench: error: standard output is closed; there is nowhere to write the answer.",
                       err=True)
            if standalone_mode:
                sys.exit(1)
            return 1
        try:
            with signals.sigterm_raises():
                rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            # without standalone mode click returns ctx.exit()'s code instead of raising it
            code = rv if isinstance(rv, int) and not isinstance(rv, bool) else 0
        except click.exceptions.Exit as exc:
            code = exc.exit_code
        except (click.exceptions.Abort, KeyboardInterrupt):
            click.echo("lorabench: interrupted.", err=True)
            code = 130
        except signals.Terminated as exc:
            click.echo("lorabench: terminated (SIGTERM).", err=True)
            code = exc.exit_code
        except _NO_ARGS as exc:  # plain `lorabench` (or `lorabench COMMAND` of a group): its help
            click.echo(exc.ctx.get_help() if exc.ctx is not None else self.get_help(click.Context(self)))
            code = 0
        except click.ClickException as exc:
            click.echo(f"lorabench: error: {one_line(exc.format_message())}", err=True)
            code = 2 if isinstance(exc, click.UsageError) else exc.exit_code
        except LorabenchError as exc:
            click.echo(f"lorabench: error: {one_line(exc)}", err=True)
            code = 2
        except BrokenPipeError:
            code = 0
        except OSError as exc:  # stdout on a full disk and the like: not a bug, not bad input
            where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
            click.echo(one_line(f"lorabench: error: {exc.strerror or exc}{where}."), err=True)
            code = 1
        except Exception as exc:  # a bug: one line, the traceback on request
            if os.environ.get("LORABENCH_DEBUG"):
                traceback.print_exc()
            click.echo(one_line(f"lorabench: internal error: {type(exc).__name__}: {str(exc)[:200]} (please report "
                                "it; LORABENCH_DEBUG=1 shows the traceback)."), err=True)
            code = EXIT_INTERNAL
        if standalone_mode:
            sys.exit(code)
        return code


def note(text: str) -> None:
    """A note on stderr: seen in every format, never inside the JSON or CSV on stdout."""
    if text:
        click.echo(f"lorabench: note: {one_line(text)}", err=True)


@click.group(cls=Cli, context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version")
def cli():
    """What fine-tuning a model costs, before you rent the GPUs.

    \b
    Example:
        lorabench params --model llama-3-8b --method lora --rank 8
        lorabench memory --model llama-3-70b --method all --gpu H100-80GB
    """


def usable_methods(spec, methods, methods_from_all, ranks, targets):
    """--method all keeps the methods that can adapt these targets (PEFT's DoRA cannot adapt fused experts)
    and says which it left out; a method asked for by name is refused in one line instead."""
    if not methods_from_all:
        return methods
    from lorabench.params import count_params

    kept, refused = [], []
    for m in methods:
        try:
            count_params(spec, m, ranks[0] if m.uses_rank else None, targets)
            kept.append(m)
        except LorabenchError as exc:
            refused.append((m, exc))
    if not any(m.uses_rank for m in kept) and refused:
        raise refused[0][1]  # bad input for every adapter method: the error, not a note
    for m, exc in refused:
        note(f"{m.name} left out: {exc}")
    return tuple(kept)


@cli.command(context_settings=CONTEXT)
@model_options
@method_options
@format_option
def params(spec, methods, methods_from_all, ranks, targets, fmt):
    """Exact trainable and total parameter counts per method and rank.

    Counts match PEFT's get_nb_trainable_parameters(); VeRA's shared projections
    are buffers and count nowhere.

    \b
    Example:
        lorabench params --model llama-3-8b --method lora --method vera --rank 8 --rank 256
        lorabench params --d 4096 --method lora --rank 8
        lorabench params --config ./my-model/config.json --targets all-linear -f json
    """
    from lorabench.estimate import param_rows

    methods = usable_methods(spec, methods, methods_from_all, ranks, targets)
    rows = param_rows(spec, methods, ranks, targets)
    note(targets_note(methods, targets))  # after the rows: an error above it stays the only line
    out = render(rows, fmt, PARAM_COLUMNS, title=f"{spec.name}: parameters")
    if fmt in ("table", "markdown") and rows:
        out += "".join(f"\nnote: {n}" for n in rows[0]["notes"])
    click.echo(out)


@cli.command(context_settings=CONTEXT)
@model_options
@method_options
@setup_options
@click.option("--gpu", type=Text("GPU"), default=None,
              help="A GPU from 'lorabench gpus': adds fits, GPUs needed and step time.")
@click.option("--mfu", type=MFU, default=0.4, show_default=True,
              help="Model-FLOPs utilisation assumed for the step time, in [0.01, 1].")
@format_option
def memory(spec, methods, methods_from_all, ranks, targets, setup, gpu, mfu, fmt):
    """GPU memory of one training step per method: components, peak, fit.

    Components are in GiB in tables and bytes in csv/json. 'peak' is what
    torch.cuda.max_memory_allocated() should read; '+runtime' (CUDA context,
    cuBLAS workspace) comes on top and is counted when deciding 'fits'.

    \b
    Example:
        lorabench memory --model llama-3-8b --method lora --rank 16 --gpu A100-40GB
        lorabench memory --model llama-3-70b --method all --dtype nf4 --gpu H100-80GB
        lorabench memory --model llama-3-70b --method full --gpu A100-80GB -f json
    """
    from lorabench.estimate import memory_rows

    chosen = get_gpu(gpu) if gpu is not None else None
    if setup.dtype in QUANTIZED and methods_from_all:
        # 'all' on a quantized base means every method that can run on one.
        methods = tuple(m for m in methods if m.allows_quantized_base)
    methods = usable_methods(spec, methods, methods_from_all, ranks, targets)
    rows = memory_rows(spec, methods, ranks, targets, setup, chosen, mfu)
    note(targets_note(methods, targets))
    title = (f"{spec.name}: batch {setup.batch_size} x {setup.seq_len} tokens, {setup.dtype} base, "
             f"{setup.optimizer}{', grad checkpointing' if setup.grad_checkpointing else ''}; GiB")
    columns = tuple(MEMORY_COLUMNS) + (tuple(GPU_COLUMNS) if chosen else ())
    out = render(rows, fmt, columns, title=title)
    if chosen and fmt in ("table", "markdown"):
        out += f"\n\n{chosen.name}: {gib(chosen.memory_bytes)} GiB; step time at {mfu:.0%} of {chosen.bf16_flops / 1e12:,.0f} TFLOP/s bf16."
    if fmt in ("table", "markdown"):
        notes = sorted({n for r in rows for n in r["notes"]})
        out += "".join(f"\nnote: {n}" for n in notes)
    click.echo(out)


@cli.command(context_settings=CONTEXT)
@format_option
def models(fmt):
    """The model presets, with their exact parameter counts.

    \b
    Example:
        lorabench models
        lorabench models -f json
    """
    from lorabench.params import count_base_params

    rows = [{"model": s.name, "params": count_base_params(s), "hidden_size": s.hidden_size,
             "intermediate_size": s.intermediate_size, "layers": s.num_layers, "heads": s.num_heads,
             "kv_heads": s.num_kv_heads, "vocab_size": s.vocab_size, "tied_embeddings": s.tie_embeddings}
            for s in PRESETS.values()]
    cols = [("model", "model", str), ("params", "parameters", lambda v: f"{v:,}"),
            ("hidden_size", "d", str), ("intermediate_size", "ffn", str), ("layers", "layers", str),
            ("heads", "heads", str), ("kv_heads", "kv heads", str), ("vocab_size", "vocab", str),
            ("tied_embeddings", "tied", lambda v: "yes" if v else "no")]
    click.echo(render(rows, fmt, cols))


@cli.command(context_settings=CONTEXT)
@format_option
def gpus(fmt):
    """The GPU catalog: memory and peak dense bf16 FLOP/s.

    \b
    Example:
        lorabench gpus
    """
    rows = [{"gpu": g.name, "memory_bytes": g.memory_bytes, "bf16_flops": g.bf16_flops,
             "bandwidth_bytes_s": g.bandwidth_bytes_s, "source": g.source} for g in GPUS.values()]
    cols = [("gpu", "gpu", str), ("memory_bytes", "memory GiB", gib),
            ("bf16_flops", "bf16 TFLOP/s", lambda v: f"{v / 1e12:,.1f}"),
            ("bandwidth_bytes_s", "GB/s", lambda v: f"{v / 1e9:,.0f}"), ("source", "source", str)]
    click.echo(render(rows, fmt, cols))


def _report_specs(models, configs, dims):
    """The report's models: presets, configs and --d matrices, each once and each under its own name."""
    from lorabench.report import distinct_specs

    local = [m for m in models if is_local_model(m)]  # `-m ./my-model` is a config folder
    entries = [(("model", spec.name), spec.name, spec)
               for spec in map(resolve_model, (m for m in models if m not in local))]
    for path in [*configs, *local]:
        spec = load_config(path)
        file = os.path.realpath(config_json_path(path))
        shown = os.path.relpath(os.path.dirname(file) if file.endswith(os.sep + "config.json") else file)
        entries.append((("config", file), f"{spec.name} (config {printable_path(shown)})", spec))
    entries += [(("d", d), spec.name, spec) for d, spec in ((d, from_dimension(d)) for d in dims)]
    return distinct_specs(entries or [(("model", DEFAULT_MODEL), DEFAULT_MODEL, from_name(DEFAULT_MODEL))])


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
@click.option("--mfu", type=MFU, default=0.4, show_default=True,
              help="Model-FLOPs utilisation assumed for the estimated step time, in [0.01, 1].")
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
              help="If OUT_DIR/NAME exists and is not a report lorabench wrote, move it aside "
                   "(NAME.replaced-DATE) instead of refusing. Nothing is ever deleted.")
def report(models, configs, dims, methods, methods_from_all, ranks, targets, setup, gpu, mfu, bench, steps,
           warmup, layers, name, out_dir, force):
    """A sweep of models x methods x ranks as a report folder: md, html, csv, json.

    Writes OUT_DIR/NAME/ with results.json (environment, command, settings,
    rows), results.csv, report.md (tables) and report.html (tables and figures,
    self-contained). The folder appears whole or not at all, and replaces only a
    report lorabench wrote (marked by a hidden .lorabench-report.json); any other
    folder of that name is refused before anything runs, unless --force.
    --bench adds measurements on this machine's device; interrupted (Ctrl-C,
    SIGTERM), the report keeps the cases measured so far and exits 130/143.

    \b
    Example:
        lorabench report --model llama-3-8b --rank 8 --rank 64
        lorabench report -m llama-3-8b -m mistral-7b --method lora,vera,full --gpu A100-80GB
        lorabench report -m tiny-llama --bench --steps 3 --name tiny-bench
    """
    from lorabench.envinfo import command_line
    from lorabench.report import FILES, build_report, check_name, default_name, report_markdown, write_report

    ctx = click.get_current_context()
    if not bench:
        given = [f"--{p}" for p in ("steps", "warmup", "layers")
                 if ctx.get_parameter_source(p) is not click.core.ParameterSource.DEFAULT]
        if given:
            raise click.UsageError(f"{', '.join(given)} only apply with --bench.")
    specs = _report_specs(models, configs, dims)
    shallow = [s.name for s in specs if layers and not s.single_matrix and s.num_layers <= layers]
    name = check_name(name) if name is not None else default_name(specs)
    chosen = get_gpu(gpu)
    if setup.dtype in QUANTIZED and methods_from_all:
        methods = tuple(m for m in methods if m.allows_quantized_base)
    # before any work: refuse now, not after an hour of benchmarks
    reportfolder.check_report_target(out_dir, name, FILES, force, measured=bench)
    data = build_report(specs, methods, ranks, targets, setup, chosen, mfu, command=command_line(),
                        bench={"layers": layers, "steps": steps, "warmup": warmup} if bench else None)
    with signals.signals_deferred():  # a Ctrl-C now would throw away what the bench measured
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
    note(targets_note(methods, targets))
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


@cli.command(context_settings=CONTEXT)
@model_options
@method_options
@setup_options(impl_default="lorabench")
@click.option("--steps", type=STEPS, default=5, show_default=True, help="Timed steps.")
@click.option("--warmup", type=STEPS, default=2, show_default=True,
              help="Untimed steps first (first calls, allocator growth, optimizer states).")
@click.option("--tolerance", type=BoundedFloat(0.0, 100.0), default=5.0, show_default=True,
              help="Verdict: estimated peak within this % of the measured peak.")
@click.option("--gpu", type=Text("GPU"), default=None,
              help="Catalog GPU for the peak-FLOP/s comparison (default: the one found).")
@click.option("--output", "-o", type=Text("FILE"), default=None,
              help="Also write every field to this .json or .csv file, rewritten (atomically) as each case "
                   "finishes. Checked before the run; a file lorabench did not write is refused.")
@click.option("--force", is_flag=True,
              help="With -o: move a file there that lorabench did not write aside (NAME.replaced-DATE.ext) "
                   "instead of refusing.")
@click.option("--check", is_flag=True,
              help="Exit 1 when a row is outside the tolerance or fails to run, or when nothing was measured.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
@format_option
def bench(spec, layers, methods, methods_from_all, ranks, targets, setup, steps, warmup, tolerance, gpu, output,
          force, check, progress, fmt):
    """Run real training steps and compare time and memory with the estimate.

    For each method it builds the model (--impl lorabench: lorabench's own layers, the default here;
    --impl peft: transformers + PEFT), runs --warmup steps, reads memory per phase (CUDA: the
    allocator's peak counters and NVML; CPU: a live-tensor tracker), then times --steps steps
    (CUDA events). --layers N measures the model cut to N layers and projects to the full depth.
    --device defaults to cuda when one is present. Ctrl-C or SIGTERM ends the run with the cases
    that finished (printed, and in -o) and exit code 130 or 143.

    \b
    Example:
        lorabench bench --model tiny-llama --device cpu --method all
        lorabench bench --model llama-3-8b --layers 4 --method all -r 8 -r 64 -o results.json
        lorabench bench --model llama-3-8b --layers 2 --impl peft --method lora,dora --targets all-linear
    """
    ctx = click.get_current_context()
    device = None if ctx.get_parameter_source("device") == click.core.ParameterSource.DEFAULT else setup.device
    sink = None
    if output is not None:  # checked before torch is even imported
        target = safeio.check_output_file(output, force=force)
        sink = safeio.RowFile(target, lambda rows, f: render(rows, f, BENCH_COLUMNS))
    chosen = get_gpu(gpu) if gpu is not None else None
    with signals.signals_deferred():  # a Ctrl-C inside torch's import can abort the process or be lost
        from lorabench.bench import run_bench

    rows: list = []
    write_error = None

    def on_row(row):
        nonlocal write_error
        rows.append(row)
        if sink is not None and write_error is None:
            try:
                sink.add(row)
            except OSError as exc:  # a full disk mid-run: say so now, keep measuring, print the table
                write_error = f"cannot write {output}: {exc.strerror or exc}"
                click.echo(one_line(f"lorabench: error: {write_error}; the run goes on, results on stdout only."),
                           err=True)
            if sink.moved is not None and len(sink.rows) == 1:
                note(f"the file that was at {output} is now {sink.moved}.")

    stopped = None
    try:
        run_bench(spec, methods, ranks, targets, setup, layers=layers, steps=steps, warmup=warmup,
                  impl=setup.impl, tolerance_pct=tolerance, progress=progress, gpu=chosen, device=device,
                  on_row=on_row)
    except KeyboardInterrupt:
        stopped = ("SIGINT", 130)
    except signals.Terminated as exc:
        stopped = ("SIGTERM", exc.exit_code)
    finally:
        if sink is not None:
            sink.close()
    click.echo(bench_text(rows, spec.name, setup, fmt))
    note(targets_note(methods, targets))
    if stopped:
        saved = f"; those are in {output}" if sink is not None and sink.rows and write_error is None else ""
        click.echo(f"lorabench: interrupted ({stopped[0]}) after {len(rows)} case(s){saved}.", err=True)
        ctx.exit(stopped[1])
    if write_error:
        ctx.exit(1)
    if check:
        measured = [r for r in rows if r["status"] != "skipped"]
        if not measured:
            click.echo("lorabench: --check: nothing was measured (every case was skipped).", err=True)
            ctx.exit(1)
        if any(r["status"] != "ok" or not r["within_tolerance"] for r in measured):
            ctx.exit(1)

