"""The `lorabench` command: parses options, calls the estimation core, renders. Nothing else.

The estimation commands (params, memory, models, gpus) never import torch.
"""

from __future__ import annotations

import functools
import inspect
import sys

import click

from lorabench import __version__
from lorabench.errors import LorabenchError
from lorabench.gpus import GPUS, get_gpu
from lorabench.memory import ATTENTION, DTYPES, FLOAT_BYTES, IMPLS, OPTIMIZERS, QUANTIZED, TrainingSetup
from lorabench.methods import METHODS, resolve_methods
from lorabench.render import FORMATS, GPU_COLUMNS, MEMORY_COLUMNS, PARAM_COLUMNS, gib, render
from lorabench.specs import PRESETS, from_dimension, from_name, load_config

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class Cli(click.Group):
    """A group whose user errors are one line on stderr and exit code 2, never a traceback."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            # without standalone mode click returns ctx.exit()'s code instead of raising it
            code = rv if isinstance(rv, int) and not isinstance(rv, bool) else 0
        except click.exceptions.Exit as exc:
            code = exc.exit_code
        except click.exceptions.Abort:
            click.echo("lorabench: aborted.", err=True)
            code = 130
        except click.ClickException as exc:
            click.echo(f"lorabench: error: {exc.format_message()}", err=True)
            code = 2 if isinstance(exc, click.UsageError) else exc.exit_code
        except LorabenchError as exc:
            click.echo(f"lorabench: error: {exc}", err=True)
            code = 2
        except BrokenPipeError:
            code = 0
        if standalone_mode:
            sys.exit(code)
        return code


def _positive(ctx, param, value):
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if v is not None and v <= 0:
            raise click.BadParameter(f"must be positive, got {v}.")
    return value


def model_options(fn):
    keep_depth = "layers" in inspect.signature(fn).parameters  # bench: --layers is its own, not a cut

    @click.option("--model", "-m", default=None, help="Preset name (see 'lorabench models'). Default: llama-3-8b.")
    @click.option("--config", "config_path", type=click.Path(), default=None,
                  help="A Hugging Face config.json (or a folder holding one), read offline.")
    @click.option("--d", "dim", type=int, default=None,
                  help="Describe one d x d weight matrix instead of a model (the seed's example).")
    @click.option("--layers", type=int, default=None, callback=_positive,
                  help="With --d: that many matrices. With a model: cut it to that many layers.")
    @functools.wraps(fn)
    def wrapper(model, config_path, dim, layers, **kw):
        given = [n for n, v in (("--model", model), ("--config", config_path), ("--d", dim)) if v is not None]
        if len(given) > 1:
            raise click.UsageError(f"give only one of {', '.join(given)}.")
        if dim is not None:
            spec = from_dimension(dim, layers or 1)
            if keep_depth:
                return fn(spec=spec, layers=None, **kw)
        else:
            spec = load_config(config_path) if config_path else from_name(model or "llama-3-8b")
            if keep_depth:  # bench measures N layers and projects to the full depth itself
                return fn(spec=spec, layers=layers, **kw)
            if layers:
                spec = spec.with_layers(layers)
        return fn(spec=spec, **kw)
    return wrapper


def method_options(fn):
    @click.option("--method", "methods", multiple=True, default=("all",), show_default=True,
                  help=f"Repeatable or comma-separated: {', '.join(METHODS)}, all.")
    @click.option("--rank", "-r", "ranks", type=int, multiple=True, default=(8,), show_default=True,
                  callback=_positive, help="LoRA rank; repeat for a sweep (--rank 8 --rank 64).")
    @click.option("--targets", "-t", default=None,
                  help="Projections to adapt: q,k,v,o,gate,up,down (qkv for gpt2) or all-linear. "
                       "Default: PEFT's (q,v; gpt2: qkv).")
    @functools.wraps(fn)
    def wrapper(methods, **kw):
        from_all = any(part.strip().lower() == "all" for m in methods for part in m.split(","))
        return fn(methods=resolve_methods(methods), methods_from_all=from_all, **kw)
    return wrapper


def setup_options(fn=None, *, impl_default: str = "peft"):
    """The options of how a step runs (memory, bench, report); passes setup=TrainingSetup(...)."""
    if fn is None:
        return functools.partial(setup_options, impl_default=impl_default)
    @click.option("--alpha", type=float, default=16.0, show_default=True, help="LoRA alpha (scale alpha/r).")
    @click.option("--batch-size", "-b", type=int, default=1, show_default=True, callback=_positive,
                  help="Sequences per step per GPU.")
    @click.option("--seq-len", "-s", type=int, default=2048, show_default=True, callback=_positive,
                  help="Tokens per sequence.")
    @click.option("--dtype", type=click.Choice(DTYPES, case_sensitive=False), default="bf16", show_default=True,
                  help="Base weights; int8/nf4 is a quantized frozen base (QLoRA), adapters only.")
    @click.option("--adapter-dtype", type=click.Choice(tuple(FLOAT_BYTES), case_sensitive=False), default="fp32",
                  show_default=True, help="Adapter weights (PEFT keeps them in fp32).")
    @click.option("--optimizer", type=click.Choice(OPTIMIZERS, case_sensitive=False), default="adamw",
                  show_default=True, help="Optimizer; its states follow the trainable weights' dtype.")
    @click.option("--grad-checkpointing/--no-grad-checkpointing", default=False, show_default=True,
                  help="Keep only each layer's input; recompute in backward.")
    @click.option("--attention", type=click.Choice(ATTENTION, case_sensitive=False), default="sdpa",
                  show_default=True, help="sdpa (flash/efficient kernels) or eager (keeps s x s softmax).")
    @click.option("--dropout", type=float, default=0.0, show_default=True, help="LoRA dropout on adapter inputs.")
    @click.option("--master-weights", is_flag=True, help="fp32 master copy and fp32 optimizer states (mixed precision).")
    @click.option("--device", type=click.Choice(("cuda", "cpu")), default="cuda", show_default=True,
                  help="Where the step runs: cuda adds the runtime's overhead and foreach AdamW.")
    @click.option("--impl", type=click.Choice(IMPLS), default=impl_default, show_default=True,
                  help="Whose layers: peft (transformers + PEFT: per-layer fp32 input copies, KV cache) "
                       "or lorabench (lorabench.nn's lean layers).")
    @functools.wraps(fn)
    def wrapper(alpha, batch_size, seq_len, dtype, adapter_dtype, optimizer, grad_checkpointing, attention,
                dropout, master_weights, device, impl, **kw):
        setup = TrainingSetup(batch_size=batch_size, seq_len=seq_len, dtype=dtype.lower(),
                              adapter_dtype=adapter_dtype.lower(), optimizer=optimizer.lower(),
                              grad_checkpointing=grad_checkpointing, attention=attention.lower(),
                              dropout=dropout, master_weights=master_weights,
                              device=device or "cuda", alpha=alpha, impl=impl)
        return fn(setup=setup, **kw)
    return wrapper


def format_option(fn):
    return click.option("--format", "-f", "fmt", type=click.Choice(FORMATS, case_sensitive=False),
                        default="table", show_default=True,
                        help="table and markdown for people; csv and json carry every field.")(fn)


@click.group(cls=Cli, context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version")
def cli():
    """What fine-tuning a model costs, before you rent the GPUs.

    \b
    Example:
        lorabench params --model llama-3-8b --method lora --rank 8
        lorabench memory --model llama-3-70b --method all --gpu H100-80GB
    """


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

    rows = param_rows(spec, methods, ranks, targets)
    click.echo(render(rows, fmt, PARAM_COLUMNS, title=f"{spec.name}: parameters"))


@cli.command(context_settings=CONTEXT)
@model_options
@method_options
@setup_options
@click.option("--gpu", default=None, help="A GPU from 'lorabench gpus': adds fits, GPUs needed and step time.")
@click.option("--mfu", type=click.FloatRange(0.01, 1.0), default=0.4, show_default=True,
              help="Model-FLOPs utilisation assumed for the step time.")
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

    chosen = get_gpu(gpu) if gpu else None
    if setup.dtype in QUANTIZED and methods_from_all:
        # 'all' on a quantized base means every method that can run on one.
        methods = tuple(m for m in methods if m.allows_quantized_base)
    rows = memory_rows(spec, methods, ranks, targets, setup, chosen, mfu)
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


@cli.command(context_settings=CONTEXT)
@click.option("--model", "-m", "models", multiple=True,
              help="Preset name; repeat for several models. Default: llama-3-8b (when no --config/--d).")
@click.option("--config", "configs", multiple=True, type=click.Path(),
              help="A Hugging Face config.json (or its folder); repeatable.")
@click.option("--d", "dims", type=int, multiple=True, callback=_positive,
              help="One d x d matrix (the seed's example); repeatable. Estimated, never benched.")
@method_options
@setup_options
@click.option("--gpu", default="H100-80GB", show_default=True, help="GPU for fit and estimated step time.")
@click.option("--mfu", type=click.FloatRange(0.01, 1.0), default=0.4, show_default=True,
              help="Model-FLOPs utilisation assumed for the estimated step time.")
@click.option("--bench", is_flag=True, help="Also measure every case on this machine (needs torch).")
@click.option("--steps", type=int, default=5, show_default=True, callback=_positive,
              help="With --bench: timed steps per case.")
@click.option("--warmup", type=int, default=2, show_default=True, callback=_positive,
              help="With --bench: untimed steps first.")
@click.option("--layers", type=int, default=None, callback=_positive,
              help="With --bench: build only this many layers of each model (estimates follow).")
@click.option("--name", default=None, help="Folder name. Default: from the models (llama-3-8b_mistral-7b).")
@click.option("--out-dir", default="reports", show_default=True, type=click.Path(file_okay=False),
              help="Where the report folder goes.")
def report(models, configs, dims, methods, methods_from_all, ranks, targets, setup, gpu, mfu, bench, steps,
           warmup, layers, name, out_dir):
    """A sweep of models x methods x ranks as a report folder: md, html, csv, json.

    Writes OUT_DIR/NAME/ with results.json (environment, command, settings,
    rows), results.csv, report.md (tables) and report.html (tables and figures,
    self-contained). The folder appears whole or not at all; an existing one of
    that name is replaced. --bench adds measurements on this machine's device.

    \b
    Example:
        lorabench report --model llama-3-8b --rank 8 --rank 64
        lorabench report -m llama-3-8b -m mistral-7b --method lora,vera,full --gpu A100-80GB
        lorabench report -m tiny-llama --bench --steps 3 --name tiny-bench
    """
    import os

    from lorabench.envinfo import command_line
    from lorabench.report import build_report, check_name, default_name, write_report

    ctx = click.get_current_context()
    if not bench:
        given = [f"--{p}" for p in ("steps", "warmup", "layers")
                 if ctx.get_parameter_source(p) is not click.core.ParameterSource.DEFAULT]
        if given:
            raise click.UsageError(f"{', '.join(given)} only apply with --bench.")
    specs = [from_name(m) for m in models] + [load_config(c) for c in configs] + [from_dimension(d) for d in dims]
    specs = list({s.name: s for s in specs or [from_name("llama-3-8b")]}.values())
    name = check_name(name) if name else default_name(specs)
    chosen = get_gpu(gpu)
    if setup.dtype in QUANTIZED and methods_from_all:
        methods = tuple(m for m in methods if m.allows_quantized_base)
    data = build_report(specs, methods, ranks, targets, setup, chosen, mfu, command=command_line(),
                        bench={"layers": layers, "steps": steps, "warmup": warmup} if bench else None)
    try:
        path = write_report(data, out_dir, name)
    except OSError as exc:  # a read-only or full disk: one line, not a traceback
        raise click.ClickException(f"cannot write the report: {exc}") from exc
    click.echo(f"wrote {path}{os.sep} ({', '.join(sorted(p.name for p in path.iterdir()))})")


BENCH_COLUMNS = (
    ("method", "method", str), ("rank", "rank", lambda v: "" if v is None else str(v)),
    ("layers", "layers", str), ("status", "status", str),
    ("peak_bytes", "est. peak", gib), ("measured_peak_bytes", "measured", gib),
    ("peak_error_pct", "error %", lambda v: "" if v is None else f"{v:+.2f}"),
    ("within_tolerance", "ok", lambda v: "" if v is None else ("yes" if v else "NO")),
    ("estimated_after_forward_bytes", "est. activ.", gib), ("measured_activations_bytes", "measured", gib),
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


@cli.command(context_settings=CONTEXT)
@model_options
@method_options
@setup_options(impl_default="lorabench")
@click.option("--steps", type=int, default=5, show_default=True, callback=_positive, help="Timed steps.")
@click.option("--warmup", type=int, default=2, show_default=True, callback=_positive,
              help="Untimed steps first (first calls, allocator growth, optimizer states).")
@click.option("--tolerance", type=click.FloatRange(0.0, 100.0), default=5.0, show_default=True,
              help="Verdict: estimated peak within this % of the measured peak.")
@click.option("--gpu", default=None, help="Catalog GPU for the peak-FLOP/s comparison (default: the one found).")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None,
              help="Also write every field to this .json or .csv file (atomically).")
@click.option("--check", is_flag=True, help="Exit 1 when a row is outside the tolerance or fails to run.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
@format_option
def bench(spec, layers, methods, methods_from_all, ranks, targets, setup, steps, warmup, tolerance, gpu, output,
          check, progress, fmt):
    """Run real training steps and compare time and memory with the estimate.

    For each method it builds the model (--impl lorabench: lorabench's own layers, the default here;
    --impl peft: transformers + PEFT), runs --warmup steps, reads memory per phase (CUDA: the
    allocator's peak counters and NVML; CPU: a live-tensor tracker), then times --steps steps
    (CUDA events). --layers N measures the model cut to N layers and projects to the full depth.
    --device defaults to cuda when one is present.

    \b
    Example:
        lorabench bench --model tiny-llama --device cpu --method all
        lorabench bench --model llama-3-8b --layers 4 --method all -r 8 -r 64 -o results.json
        lorabench bench --model llama-3-8b --layers 2 --impl peft --method lora,dora --targets all-linear
    """
    from lorabench.bench import run_bench

    ctx = click.get_current_context()
    device = None if ctx.get_parameter_source("device") == click.core.ParameterSource.DEFAULT else setup.device
    if output and not output.lower().endswith((".json", ".csv")):
        raise click.BadParameter("must end in .json or .csv.", param_hint="--output")
    chosen = get_gpu(gpu) if gpu else None
    rows: list = []
    interrupted = False
    try:
        run_bench(spec, methods, ranks, targets, setup, layers=layers, steps=steps, warmup=warmup,
                  impl=setup.impl, tolerance_pct=tolerance, progress=progress, gpu=chosen, device=device,
                  on_row=rows.append)
    except KeyboardInterrupt:
        interrupted = True
    if output and rows:
        _write_rows_atomically(rows, output)
    cut = f"{rows[0]['layers']} of {rows[0]['full_layers']} layers" if rows else ""
    title = (f"{spec.name} ({cut}), {setup.impl} layers on {rows[0]['device_name'] if rows else setup.device}: "
             f"batch {setup.batch_size} x {setup.seq_len}, {setup.dtype}; GiB, ms")
    projected = any(r.get("full_projected_peak_bytes") is not None for r in rows)
    columns = BENCH_COLUMNS + (FULL_DEPTH_COLUMNS if projected else ())
    if all((r.get("peak_bytes") or 0) < 2 ** 30 for r in rows):  # small models read better in MiB
        columns = tuple((k, t, _mib) if f is gib else (k, t, f) for k, t, f in columns)
        title = title.replace("; GiB", "; MiB")
    out = render(rows, fmt, columns, title=title)
    if fmt in ("table", "markdown") and rows:
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
    click.echo(out)
    if interrupted:
        click.echo(f"lorabench: interrupted after {len(rows)} case(s)"
                   + (f"; those are in {output}." if output and rows else "."), err=True)
        ctx.exit(130)
    if check and any(r["status"] != "ok" or not r["within_tolerance"] for r in rows
                     if r["status"] != "skipped"):
        ctx.exit(1)


def _mib(n) -> str:
    return "" if n is None else f"{n / 2 ** 20:,.2f}"


def _write_rows_atomically(rows, path: str) -> None:
    """Write rows as JSON or CSV into a temporary file beside path, then rename it over path."""
    import os
    import tempfile

    text = render(rows, "json" if path.lower().endswith(".json") else "csv", BENCH_COLUMNS)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".lorabench-", dir=folder)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main() -> None:
    cli(prog_name="lorabench")
