"""The `lorabench` command: parses options, calls the estimation core, renders. Nothing else.

The estimation commands (params, memory, models, gpus) never import torch.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import traceback

import click

from lorabench import __version__
from lorabench.report import folder as reportfolder
from lorabench.safety import files as safeio
from lorabench.safety import signals
from lorabench.cli.options import (DEFAULT_MODEL, LAYERS, MFU, STEPS, BoundedFloat, BoundedInt, Text, cost_options,
                               distributed_options, format_option, method_options, model_options, parallel_options,
                               setup_options, targets_note)
from lorabench.estimator.compute import MATMUL_EFFICIENCY
from lorabench.errors import LorabenchError
from lorabench.gpus import GPUS, get_gpu, gpu_note
from lorabench.models.hfconfig import MAX_WIDTH
from lorabench.models.hub import is_local_model, resolve_specs
from lorabench.estimator.memory import ALLOCATOR_ALLOWANCE
from lorabench.estimator.setup import QUANTIZED
from lorabench.render.formats import (BENCH_COLUMNS, MEMORY_COLUMNS, PARAM_COLUMNS, bench_text, fit_width, fitted_table,
                              gib, render)
from lorabench.models.spec import PRESETS, from_dimension, from_name
from lorabench.cli.stdout import STDOUT, whole_stdout

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

# Exit codes: 0 done; 1 a --check failed, nothing was measured, a bench case failed to run (FAILED: a rank
# died, a timeout), or an output (a file, or stdout: a full disk, `ulimit -f`) could not be written whole;
# 2 bad input (one line on stderr); 130 SIGINT; 143 SIGTERM; 70 a bug in lorabench (please report).
EXIT_INTERNAL = 70
# Bench row statuses of a run that went wrong. "oom" and "skipped" are answers about the setup (it does not
# fit, it cannot run here): exit 0, unless --check.
FAILED = ("failed", "timeout")


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
    SIGTERM end any command with 130 and 143; an answer that stdout cannot take whole is an error, exit 1."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if sys.stdout is None:  # `lorabench ... >&-`: Python sets it to None and click would print nothing
            click.echo("lorabench: error: standard output is closed; there is nowhere to write the answer.",
                       err=True)
            if standalone_mode:
                sys.exit(1)
            return 1
        try:
            with signals.sigterm_raises(), whole_stdout():
                try:
                    rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
                finally:  # what is still buffered fails here, not silently at exit
                    sys.stdout.flush()
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
            where = getattr(exc, "filename", None)
            if where == STDOUT:
                click.echo(one_line(f"lorabench: error: cannot write the whole output to {STDOUT}: "
                                    f"{exc.strerror or exc}; what it got is cut short."), err=True)
            else:
                click.echo(one_line(f"lorabench: error: {exc.strerror or exc}{f': {where}' if where else ''}."),
                           err=True)
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


def pick_gpu(name):
    """The catalog GPU a --gpu names (None for none), with a note when the name was one that several share."""
    if name is None:
        return None
    note(gpu_note(name))
    return get_gpu(name)


def quantized_methods(methods, methods_from_all, setup):
    """'all' on a quantized base means every method that can run on one; a note names the ones left out."""
    if setup.dtype not in QUANTIZED or not methods_from_all:
        return methods
    dropped = [m.name for m in methods if not m.allows_quantized_base]
    if dropped:
        note(f"{', '.join(dropped)} left out: they write the base weights, which a {setup.dtype} base cannot hold.")
    return tuple(m for m in methods if m.allows_quantized_base)


def usable_methods(spec, methods, methods_from_all, ranks, targets):
    """--method all, or several models, keeps the methods that can adapt these targets of this model (PEFT's
    DoRA cannot adapt fused experts) and says which it left out; a method asked for by name for one model is
    refused in one line instead."""
    if not methods_from_all:
        return methods
    from lorabench.estimator.params import count_params

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
        note(f"{spec.name}: {m.name} left out: {exc}")
    return tuple(kept)


def each_model(specs, methods, methods_from_all, ranks, targets):
    """(spec, the methods it can take) for each model, in order: with several models, a method one of them
    cannot take is left out for that model with a note (usable_methods)."""
    for spec in specs:
        yield spec, usable_methods(spec, methods, methods_from_all or len(specs) > 1, ranks, targets)


def terminal_width() -> int:
    """The terminal's width ($COLUMNS first); 100 when the output is not a terminal."""
    return shutil.get_terminal_size((100, 24)).columns


def _blocks(texts) -> str:
    return "\n\n".join(t for t in texts if t)


@cli.command(context_settings=CONTEXT)
@model_options
@method_options
@format_option
def params(specs, methods, methods_from_all, ranks, targets, fmt):
    """Exact trainable and total parameter counts per method and rank.

    Counts match PEFT's get_nb_trainable_parameters(); VeRA's shared projections
    are buffers and count nowhere.

    \b
    Example:
        lorabench params --model llama-3-8b --method lora --method vera --rank 8 --rank 256
        lorabench params -m llama-3-8b -m mistral-7b --method lora -t all-linear
        lorabench params --d 4096 --method lora --rank 8
        lorabench params --config ./my-model/config.json --targets all-linear -f json
    """
    from lorabench.estimator.rows import param_rows

    per_model = [(spec, param_rows(spec, used, ranks, targets))
                 for spec, used in each_model(specs, methods, methods_from_all, ranks, targets)]
    note(targets_note(methods, targets))  # after the rows: an error above it stays the only line
    if fmt not in ("table", "markdown"):
        click.echo(render([r for _, rows in per_model for r in rows], fmt, PARAM_COLUMNS))
        return
    texts = []
    for spec, rows in per_model:
        cols, hidden = (fit_width(rows, PARAM_COLUMNS, terminal_width(), keep=3) if fmt == "table" and rows
                        else (PARAM_COLUMNS, []))
        out = render(rows, fmt, cols, title=f"{spec.name}: parameters")
        if hidden:
            out += f"\nnot shown at {terminal_width()} columns: {', '.join(hidden)} (-f json carries every field)."
        texts.append(out + "".join(f"\nnote: {n}" for n in (rows[0]["notes"] if rows else ())))
    click.echo(_blocks(texts))


@cli.command(context_settings=CONTEXT)
@model_options
@method_options
@setup_options
@parallel_options
@click.option("--gpu", type=Text("GPU"), default=None,
              help="A GPU from 'lorabench gpus': whether it fits, the spare memory, what makes a 'no' fit, GPUs "
                   "needed and step time. Without it: the smallest catalog GPU that fits.")
@click.option("--mfu", type=MFU, default=None,
              help="Fraction of the GPU's dense peak its large matrix products reach, in [0.01, 1]. Default: "
                   f"{MATMUL_EFFICIENCY:.2f} (measured on an H100); the rows' mfu is what the whole step achieves.")
@click.option("--headroom", type=BoundedFloat(0.0, 90.0), default=round(100 * ALLOCATOR_ALLOWANCE, 1),
              show_default=True,
              help="Allocator allowance in % of the peak, kept free when deciding 'fits' (the caching allocator "
                   "reserves more than it hands out; bench reads both).")
@cost_options
@click.option("--wide", is_flag=True, help="Every memory component in the table (wider than a terminal).")
@click.option("--columns", type=Text("KEYS"), default=None,
              help="The table's columns, comma-separated (row keys or titles: method,rank,peak,fits,...).")
@click.option("--check", is_flag=True,
              help="With --gpu: exit 1 when a case does NOT fit (the answer is printed all the same), so a script "
                   "or CI step can stop before renting the GPUs.")
@format_option
def memory(specs, methods, methods_from_all, ranks, targets, setup, parallel, gpu, mfu, headroom, cost, wide, columns,
           check, fmt):
    """GPU memory of one training step per method: does it fit, and what makes it fit.

    The first lines answer: per method, fits or not on --gpu, the memory to
    spare, the phase of the peak and, for a "no", the largest component and the
    cheapest change that fits (checkpointing, a smaller batch, 8-bit AdamW, an
    nf4 base, a shorter sequence, more GPUs), found by the estimator. 'peak' is
    what torch.cuda.max_memory_allocated() should read; the runtime (CUDA
    context, cuBLAS workspace) and the allocator allowance (--headroom) come on
    top when deciding 'fits'. The table keeps the columns that fit the terminal;
    --wide shows every component. csv/json carry every field, in bytes.
    With --gpus N and --sharding ddp/zero2/fsdp every memory field is what one
    GPU holds (the largest), and each row gives the GPUs each strategy needs,
    the bytes each GPU sends per step and the step time with and without
    overlap on the GPU's link.

    \b
    Example:
        lorabench memory -m llama-3-8b --method lora -r 16 -t all-linear --gpu RTX-4090 -s 4096
        lorabench memory --model llama-3-70b --method all --dtype nf4 --gpu H100-80GB
        lorabench memory -m llama-3-8b -m mistral-7b --method lora,full --gpu A100-80GB --wide
        lorabench memory --model llama-3-70b --method full --gpu A100-80GB -f json
        lorabench memory -m llama-3-70b --method full --grad-checkpointing --gpu H100-80GB --gpus 8 --sharding fsdp
        lorabench memory -m llama-3-70b --method lora --dtype nf4 --gpu RTX-4090 --gpus 2 --sharding fsdp
        lorabench memory -m llama-3-8b --method lora --gpu A100-40GB --check -f json > plan.json
    """
    from lorabench.render.answer import add_verdicts, memory_text, pick_columns
    from lorabench.estimator.rows import memory_rows

    picked = pick_columns(columns) if columns else None  # a bad name is an error before any work
    chosen = pick_gpu(gpu)
    if cost is not None and chosen is None:
        raise click.UsageError("--tokens/--dataset-tokens need --gpu: time and cost are for a GPU.")
    if check and chosen is None:
        raise click.UsageError("--check needs --gpu: whether each case fits that GPU.")
    allowance = headroom / 100
    methods = quantized_methods(methods, methods_from_all, setup)
    per_model = []
    for spec, used in each_model(specs, methods, methods_from_all, ranks, targets):
        rows = memory_rows(spec, used, ranks, targets, setup, chosen, mfu, allowance=allowance, cost=cost,
                           parallel=parallel)
        add_verdicts(spec, rows, used, targets, setup, chosen, allowance, parallel)
        per_model.append((spec, used, rows))
    note(targets_note(methods, targets))
    if fmt not in ("table", "markdown"):
        click.echo(render([r for _, _, rows in per_model for r in rows], fmt, MEMORY_COLUMNS))
    else:
        click.echo(_blocks(memory_text(spec, rows, setup, chosen, targets, fmt, wide, picked, allowance,
                                       terminal_width()) for spec, used, rows in per_model))
    misses = [r for _, _, rows in per_model for r in rows if not r["fits"]] if check else []
    if misses:
        click.echo(f"lorabench: --check: {len(misses)} case(s) do not fit the {chosen.name}.", err=True)
        click.get_current_context().exit(1)


@cli.command(context_settings=CONTEXT)
@model_options
@method_options
@setup_options
@parallel_options
@click.option("--gpu", type=Text("GPU"), default=None, help="A GPU from 'lorabench gpus'.")
@click.option("--gpu-memory", type=BoundedFloat(0.0, 1e6, lo_open=True), default=None,
              help="Or a GPU memory size in GiB (as nvidia-smi reports it, e.g. 23.99 for an RTX 4090).")
@click.option("--headroom", type=BoundedFloat(0.0, 90.0), default=round(100 * ALLOCATOR_ALLOWANCE, 1),
              show_default=True, help="Allocator allowance in % of the peak, kept free when deciding 'fits'.")
@format_option
def fit(specs, methods, methods_from_all, ranks, targets, setup, parallel, gpu, gpu_memory, headroom, fmt):
    """What fits a GPU: the largest batch, sequence length and rank per method, and which knobs make a setup fit.

    For each method (and rank): whether the setup as given fits, the largest batch
    size at the given sequence length, the longest sequence at the given batch
    size and the largest rank at both, each found by search over the estimator.
    Then a table of the memory savers (gradient checkpointing, 8-bit AdamW, an
    nf4 base) alone and together: which make the given setup fit, and with how
    much to spare. 'Fits' counts the runtime and the allocator allowance
    (--headroom), as in 'lorabench memory'. With --gpus N --sharding S, on each
    of N GPUs, each running its own batch.

    \b
    Example:
        lorabench fit -m llama-3-8b --gpu RTX-4090 --method lora,dora,full -r 16 -t all-linear -s 4096
        lorabench fit -m qwen3-8b --gpu-memory 48 --method lora --grad-checkpointing -f json
        lorabench fit -m llama-3-70b --gpu RTX-4090 --gpus 2 --sharding fsdp --method lora --dtype nf4
    """
    import json

    from lorabench.render.answer import fit_text
    from lorabench.estimator.fit import fit_rows, search_cases

    if (gpu is None) == (gpu_memory is None):
        raise click.UsageError("give --gpu NAME or --gpu-memory GIB (one of them).")
    if gpu is not None:
        chosen = pick_gpu(gpu)
        label, capacity = chosen.name, chosen.memory_bytes
    else:
        label, capacity = f"{gpu_memory:g} GiB GPU", int(gpu_memory * 2 ** 30)
    allowance = headroom / 100
    methods = quantized_methods(methods, methods_from_all, setup)
    limit_rows, knob_rows = [], []
    for spec, used in each_model(specs, methods, methods_from_all, ranks, targets):
        limits_, knobs = fit_rows(search_cases(spec, used, ranks, targets, setup, parallel), label, capacity,
                                  allowance)
        limit_rows += limits_
        knob_rows += knobs
    note(targets_note(methods, targets))
    if fmt == "json":
        click.echo(json.dumps({"limits": limit_rows, "knobs": knob_rows}, indent=2))
    elif fmt == "csv":
        click.echo(render(limit_rows, fmt, ()))
    else:
        click.echo(fit_text(limit_rows, knob_rows, setup, terminal_width(), fmt))


@cli.command(context_settings=CONTEXT)
@format_option
def models(fmt):
    """The model presets, with their exact parameter counts.

    \b
    Example:
        lorabench models
        lorabench models -f json
    """
    from lorabench.estimator.params import count_base_params

    rows = [{"model": s.name, "params": count_base_params(s), "hidden_size": s.hidden_size,
             "intermediate_size": s.intermediate_size, "layers": s.num_layers, "heads": s.num_heads,
             "kv_heads": s.num_kv_heads, "vocab_size": s.vocab_size, "tied_embeddings": s.tie_embeddings,
             "num_experts": s.num_experts or None, "experts_per_token": s.experts_per_token or None,
             "expert_intermediate_size": s.expert_intermediate_size or None}
            for s in PRESETS.values()]
    if fmt in ("table", "markdown"):  # a mixture of experts: how many, each one's width, how many a token takes
        rows = [{**r, "experts": f"{r['num_experts']}x{r['expert_intermediate_size']} top-{r['experts_per_token']}"
                 if r["num_experts"] else ""} for r in rows]
    cols = [("model", "model", str), ("params", "parameters", lambda v: f"{v:,}"),
            ("hidden_size", "d", str), ("intermediate_size", "ffn", lambda v: str(v) if v else "-"),
            ("experts", "experts", str),
            ("layers", "layers", str), ("heads", "heads", str), ("kv_heads", "kv", str),
            ("vocab_size", "vocab", str), ("tied_embeddings", "tied", lambda v: "yes" if v else "no")]
    click.echo(fitted_table(rows, fmt, cols, terminal_width(), keep=2))


@cli.command(context_settings=CONTEXT)
@format_option
def gpus(fmt):
    """The GPU catalog: memory, peak dense bf16 and fp32 FLOP/s, memory bandwidth, interconnect, the server and
    network it comes in (for steps over more GPUs than one server holds), and a dated on-demand price where one
    was found, each with its source.

    \b
    Example:
        lorabench gpus
        lorabench gpus -f json
    """
    from lorabench.gpus import PRICES, node_of

    rows = []
    for g in GPUS.values():
        price, node = PRICES.get(g.name), node_of(g)
        rows.append({"gpu": g.name, "memory_bytes": g.memory_bytes, "bf16_flops": g.bf16_flops,
                     "fp32_flops": g.fp32_flops, "bandwidth_bytes_s": g.bandwidth_bytes_s,
                     "interconnect": g.interconnect, "interconnect_bytes_s": g.interconnect_bytes_s,
                     "gpus_per_node": node.gpus, "network": node.network or None,
                     "network_bytes_s": node.network_bytes_s or None, "node_source": node.source,
                     "usd_per_gpu_hour": price.usd_per_gpu_hour if price else None,
                     "price_source": price.source if price else None, "source": g.source})
    tflops = lambda v: "" if v is None else f"{v / 1e12:,.1f}"  # noqa: E731
    cols = [("gpu", "gpu", str), ("memory_bytes", "GiB", gib), ("bf16_flops", "bf16 TFLOP/s", tflops),
            ("fp32_flops", "fp32", tflops), ("bandwidth_bytes_s", "GB/s", lambda v: f"{v / 1e9:,.0f}"),
            ("interconnect", "link", str), ("interconnect_bytes_s", "link GB/s", lambda v: f"{v / 1e9:,.0f}"),
            ("network_bytes_s", "net GB/s", lambda v: "" if v is None else f"{v / 1e9:,.0f}"),
            ("usd_per_gpu_hour", "$/GPU-h", lambda v: "" if v is None else f"{v:,.2f}")]
    out = fitted_table(rows, fmt, cols, terminal_width(), keep=2)
    if fmt in ("table", "markdown"):
        from lorabench.render.formats import wrap

        width = terminal_width()
        out += "\n\nSources:\n" + "\n".join(wrap(f"  {r['gpu']}: {r['source']}", width, "    ") for r in rows)
        out += "\nServers and networks (link and net GB/s: per GPU, both directions):\n" + "\n".join(
            wrap(f"  {r['gpu']}: {r['gpus_per_node']} per server; {r['node_source']}", width, "    ") for r in rows)
        out += "\nPrices (on-demand, dated; --price to use yours):\n" + "\n".join(
            wrap(f"  {r['gpu']}: {r['price_source']}", width, "    ") for r in rows if r["price_source"])
    click.echo(out)


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
    from lorabench.measure.envinfo import command_line
    from lorabench.report.build import FILES, build_report, check_name, default_name, report_markdown, write_report

    ctx = click.get_current_context()
    if not bench:
        given = [f"--{p}" for p in ("steps", "warmup", "layers")
                 if ctx.get_parameter_source(p) is not click.core.ParameterSource.DEFAULT]
        if given:
            raise click.UsageError(f"{', '.join(given)} only apply with --bench.")
    specs = _report_specs(models, configs, dims)
    shallow = [s.name for s in specs if layers and not s.single_matrix and s.num_layers <= layers]
    name = check_name(name) if name is not None else default_name(specs)
    chosen = pick_gpu(gpu)
    if setup.dtype in QUANTIZED and methods_from_all:
        methods = tuple(m for m in methods if m.allows_quantized_base)
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
@setup_options
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
              help="With -o: move a regular file of yours there that lorabench did not write aside "
                   "(NAME.replaced-DATE.ext) instead of refusing; never a folder, a device or another user's file.")
@click.option("--check", is_flag=True,
              help="Exit 1 when a row is outside the tolerance or fails to run, or when nothing was measured.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
@distributed_options
@format_option
def bench(specs, layers, methods, methods_from_all, ranks, targets, setup, steps, warmup, tolerance, gpu, output,
          force, check, progress, distributed, fmt):
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
    ctx = click.get_current_context()
    device = None if ctx.get_parameter_source("device") == click.core.ParameterSource.DEFAULT else setup.device
    chosen = pick_gpu(gpu)  # bad input is refused before the output is claimed
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

            runner(spec, used, ranks, targets, setup, layers=layers, steps=steps, warmup=warmup,
                   impl=setup.impl, tolerance_pct=tolerance, progress=progress, gpu=chosen, device=device,
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
    note(targets_note(methods, targets))
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
    if check:
        measured = [r for r in rows if r["status"] != "skipped"]
        if not measured:
            click.echo("lorabench: --check: nothing was measured (every case was skipped).", err=True)
            ctx.exit(1)
        if any(r["status"] != "ok" or not r["within_tolerance"] for r in measured):
            ctx.exit(1)
