"""`lorabench bench`: real training steps measured against the estimate (lorabench.measure: torch)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import click

from lorabench.cli.main import CONTEXT, FAILED, _blocks, cli, each_model, note, one_line, pick_gpu, terminal_width
from lorabench.cli.options import (STEPS, BoundedFloat, Text, distributed_options, format_option, method_options,
                                   model_options, setup_options)
from lorabench.errors import LorabenchError
from lorabench.render.formats import BENCH_COLUMNS, bench_text, render
from lorabench.safety import files as safeio
from lorabench.safety import signals


@dataclass(frozen=True)
class Run:
    """How each case is measured: timed steps after untimed warmup steps, and the verdict's tolerance (% of
    the measured peak)."""

    steps: int
    warmup: int
    tolerance: float


@dataclass(frozen=True)
class Output:
    """Where the rows go besides stdout (path, claimed with force as safety.files says), whether a row out of
    tolerance makes the exit code 1 (check), and whether a progress bar shows on stderr."""

    path: Optional[str]
    force: bool
    check: bool
    progress: bool


def run_options(fn):
    """--steps, --warmup, --tolerance: passes run=Run(...)."""
    @click.option("--steps", type=STEPS, default=5, show_default=True, help="Timed steps.")
    @click.option("--warmup", type=STEPS, default=2, show_default=True,
                  help="Untimed steps first (first calls, allocator growth, optimizer states).")
    @click.option("--tolerance", type=BoundedFloat(0.0, 100.0), default=5.0, show_default=True,
                  help="Verdict: estimated peak within this % of the measured peak.")
    @functools.wraps(fn)
    def wrapper(steps, warmup, tolerance, **kw):
        return fn(run=Run(steps, warmup, tolerance), **kw)
    return wrapper


def output_options(fn):
    """-o/--output, --force, --check, --progress: passes out=Output(...)."""
    @click.option("--output", "-o", type=Text("FILE"), default=None,
                  help="Also write every field to this .json or .csv file, rewritten (atomically) as each case "
                       "finishes. Checked before the run; a file lorabench did not write is refused.")
    @click.option("--force", is_flag=True,
                  help="With -o: move a regular file of yours there that lorabench did not write aside "
                       "(NAME.replaced-DATE.ext) instead of refusing; never a folder, a device or another user's "
                       "file.")
    @click.option("--check", is_flag=True,
                  help="Exit 1 when a row is outside the tolerance or fails to run, or when nothing was measured.")
    @click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
    @functools.wraps(fn)
    def wrapper(output, force, check, progress, **kw):
        return fn(out=Output(output, force, check, progress), **kw)
    return wrapper



@cli.command(context_settings=CONTEXT)
@model_options
@method_options
@setup_options
@run_options
@click.option("--gpu", type=Text("GPU"), default=None,
              help="Catalog GPU for the peak-FLOP/s comparison (default: the one found).")
@output_options
@distributed_options
@format_option
def bench(specs, layers, methods, methods_from_all, ranks, targets, setup, run: Run, gpu, out: Output, distributed,
          fmt):
    """Run real training steps and compare time and memory with the estimate.

    For each model and method it builds the model (--impl peft: transformers + PEFT, the default, as
    everywhere; --impl lorabench: lorabench's own layers), runs --warmup steps, reads memory per phase (CUDA: the
    allocator's peak counters and NVML; CPU: a live-tensor tracker), then times --steps steps
    (CUDA events). --layers N measures the model cut to N layers and projects to the full depth.
    --device defaults to cuda when one is present. On a CPU that multiplies bf16 slower than fp32 (no
    AVX-512 BF16 or AMX), a --dtype left at bf16 becomes fp32, and a note says why. With stderr not a
    terminal, a line per case replaces the progress bar. Ctrl-C or SIGTERM ends the run with the cases
    that finished (printed, and in -o) and exit code 130 or 143.
    --nproc N --sharding ddp|zero2|fsdp runs each case on N processes under torchrun, a row per rank
    with the estimate for that rank; a rank that fails, dies or runs out of memory gives a row saying so,
    the others are stopped, and --timeout bounds each case. A case that fails to run (a rank failed or
    was killed, a timeout) makes the exit code 1, with or without --check.

    \b
    Example:
        lorabench bench --model tiny-llama --device cpu --method all
        lorabench bench --model llama-3-8b --layers 4 --method all -r 8 -r 64 -o results.json
        lorabench bench -m llama-3-8b -m qwen3-8b --layers 2 --method lora,dora --targets all-linear
        lorabench bench --model llama-3-8b --layers 2 --impl lorabench --method all
        lorabench bench -m tiny-llama --device cpu --nproc 2 --sharding fsdp --method full,lora --loop plain
    """
    from lorabench import api, extras

    ctx = click.get_current_context()
    device = None if ctx.get_parameter_source("device") == click.core.ParameterSource.DEFAULT else setup.device
    chosen = pick_gpu(gpu)  # bad input is refused before the output is claimed
    extras.require("bench", "lorabench bench")
    output, force = out.path, out.force
    target = safeio.check_output_file(output, force=force) if output is not None else None  # before torch

    rows: list = []
    write_error = None
    sink = None

    def on_row(row):
        nonlocal write_error
        rows.append(row)
        if sink is not None and write_error is None:
            try:
                sink.add(row)
            except (OSError, LorabenchError) as exc:  # a full disk mid-run: say so now, keep measuring
                why = exc.strerror or exc if isinstance(exc, OSError) else exc
                write_error = f"cannot write {output}: {why}"
                click.echo(one_line(f"lorabench: error: {write_error}; the run goes on, results on stdout only."),
                           err=True)
            if sink.moved is not None and len(sink.rows) == 1:
                note(f"the file that was at {output} is now {sink.moved}.")

    stopped = None
    done = []  # (spec, its rows): one table per model
    try:  # from the claim of the output on, whatever ends the run (bad input too) gives the lock back
        if target is not None:
            with signals.signals_deferred():  # sink is set before a signal can end the run
                sink = safeio.RowFile(target, lambda rows, f: render(rows, f, BENCH_COLUMNS), force=force)
        with signals.signals_deferred():  # a Ctrl-C inside torch's import can abort the process or be lost
            from lorabench.measure.bench import cpu_dtype, run_bench
        # on a CPU, a dtype it runs fast
        setup, why = cpu_dtype(setup, ctx.get_parameter_source("dtype") != click.core.ParameterSource.DEFAULT, device)
        note(why)
        runner, text = run_bench, bench_text
        if distributed is not None:
            import functools

            from lorabench.measure.launch import run_distributed_bench
            from lorabench.render.formats import distributed_bench_text

            nproc, sharding, timeout_s = distributed
            runner = functools.partial(run_distributed_bench, nproc=nproc, sharding=sharding, timeout_s=timeout_s)
            text = distributed_bench_text
        for spec, used in each_model(specs, methods, methods_from_all, ranks, targets):
            done.append((spec, []))

            def keep(row, mine=done[-1][1]):
                mine.append(row)
                on_row(row)

            runner(spec, used, ranks, targets, setup, layers=layers, steps=run.steps, warmup=run.warmup,
                   impl=setup.impl, tolerance_pct=run.tolerance, progress=out.progress, gpu=chosen, device=device,
                   on_row=keep)
    except KeyboardInterrupt:
        stopped = ("SIGINT", 130)
    except signals.Terminated as exc:
        stopped = ("SIGTERM", exc.exit_code)
    finally:
        if sink is not None:
            sink.close()
    if fmt in ("table", "markdown"):
        if done:
            click.echo(_blocks(text(mine, spec.name, setup, fmt, terminal_width()) for spec, mine in done
                               if mine or len(done) == 1))
    else:
        click.echo(render(rows, fmt, BENCH_COLUMNS))
    note(api.targets_note(methods, targets))
    if stopped:
        saved = f"; those are in {output}" if sink is not None and sink.rows and write_error is None else ""
        finished = len(rows) if distributed is None else len(rows) // distributed[0]  # a row per rank
        click.echo(f"lorabench: interrupted ({stopped[0]}) after {finished} case(s){saved}.", err=True)
        ctx.exit(stopped[1])
    failed = [r for r in rows if r["status"] in FAILED]
    if failed:  # the run itself went wrong (a rank died, a timeout): not a measurement, whatever --check says
        first = failed[0]
        click.echo(one_line(f"lorabench: {len(failed)} of {len(rows)} row(s) failed ({first['method']}: "
                            f"{first.get('error') or first['status']})."), err=True)
    if write_error or failed:
        ctx.exit(1)
    if out.check:
        measured = [r for r in rows if r["status"] != "skipped"]
        if not measured:
            click.echo("lorabench: --check: nothing was measured (every case was skipped).", err=True)
            ctx.exit(1)
        if any(r["status"] != "ok" or not r["within_tolerance"] for r in measured):
            ctx.exit(1)
