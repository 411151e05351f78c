"""The `lorabench` command: parses options, calls the estimation core, renders. Nothing else.

The estimation commands (params, memory, models, gpus) never import torch.
"""

from __future__ import annotations

import functools
import sys

import click

from lorabench import __version__
from lorabench.errors import LorabenchError
from lorabench.gpus import GPUS, get_gpu
from lorabench.memory import ATTENTION, DTYPES, FLOAT_BYTES, OPTIMIZERS, QUANTIZED, TrainingSetup
from lorabench.methods import METHODS, resolve_methods
from lorabench.render import FORMATS, GPU_COLUMNS, MEMORY_COLUMNS, PARAM_COLUMNS, gib, render
from lorabench.specs import PRESETS, from_dimension, from_name, load_config

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class Cli(click.Group):
    """A group whose user errors are one line on stderr and exit code 2, never a traceback."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
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
        else:
            spec = load_config(config_path) if config_path else from_name(model or "llama-3-8b")
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


def setup_options(fn):
    """The options of how a step runs (memory, bench, report); passes setup=TrainingSetup(...)."""
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
    @functools.wraps(fn)
    def wrapper(alpha, batch_size, seq_len, dtype, adapter_dtype, optimizer, grad_checkpointing, attention,
                dropout, master_weights, device, **kw):
        setup = TrainingSetup(batch_size=batch_size, seq_len=seq_len, dtype=dtype.lower(),
                              adapter_dtype=adapter_dtype.lower(), optimizer=optimizer.lower(),
                              grad_checkpointing=grad_checkpointing, attention=attention.lower(),
                              dropout=dropout, master_weights=master_weights,
                              device=device or "cuda", alpha=alpha)
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


def main() -> None:
    cli(prog_name="lorabench")
