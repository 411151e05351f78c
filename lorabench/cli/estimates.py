"""`lorabench params`, `memory` and `fit`: parse, call lorabench.api's answers, print. No torch."""

from __future__ import annotations

import sys

import click

from lorabench.cli.main import CONTEXT, _blocks, cli, note, pick_gpu, terminal_width
from lorabench.cli.options import (MFU, BoundedFloat, Text, cost_options, engine_options, format_option, image_options,
                                   method_options, model_options, parallel_options, setup_options)
from lorabench.estimator.compute import MATMUL_EFFICIENCY
from lorabench.estimator.memory import ALLOCATOR_ALLOWANCE
from lorabench.render.formats import MEMORY_COLUMNS, PARAM_COLUMNS, fit_width, render


def progress(text: str) -> None:
    """A traced answer's steps, on stderr while it works (a terminal only: pipes and logs get the answer alone)."""
    if sys.stderr.isatty():
        click.echo(f"lorabench: {text}...", err=True)


@cli.command(context_settings=CONTEXT)
@model_options
@method_options
@engine_options
@format_option
def params(specs, methods, methods_from_all, ranks, targets, engine, peft_config, fmt):
    """Exact trainable and total parameter counts per method and rank.

    Counts match PEFT's get_nb_trainable_parameters(); VeRA's shared projections
    are buffers and count nowhere.

    \b
    Example:
        lorabench params --model llama-3-8b --method lora --method vera --rank 8 --rank 256
        lorabench params -m llama-3-8b -m mistral-7b --method lora -t all-linear
        lorabench params --d 4096 --method lora --rank 8
        lorabench params --config ./my-model/config.json --targets all-linear -f json
        lorabench params --config ./granite-3.3-8b --peft-config ./my-ia3
    """
    from lorabench import api

    per_model = api.param_answer(specs, methods, methods_from_all, ranks, targets, note, engine=engine,
                                 peft_config=peft_config)
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
@engine_options
@image_options
@format_option
def memory(specs, methods, methods_from_all, ranks, targets, setup, parallel, gpu, mfu, headroom, cost, wide, columns,
           check, engine, peft_config, images, fmt):
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
        lorabench memory --config ./granite-3.3-8b/config.json --method lora -t all-linear --gpu L40S
        lorabench memory -m llama-3-8b --peft-config ./my-ia3/adapter_config.json --gpu A100-40GB
        lorabench memory --config ./qwen2.5-vl-7b --method lora -t q_proj,v_proj --images 2 --image-size 448x448
    """
    from lorabench import api

    from lorabench.render.answer import memory_text, pick_columns

    picked = pick_columns(columns) if columns else None  # a bad name is an error before any work
    chosen = pick_gpu(gpu)
    if cost is not None and chosen is None:
        raise click.UsageError("--tokens/--dataset-tokens need --gpu: time and cost are for a GPU.")
    if check and chosen is None:
        raise click.UsageError("--check needs --gpu: whether each case fits that GPU.")
    allowance = headroom / 100
    per_model = api.memory_answer(specs, methods, methods_from_all, ranks, targets, setup, parallel, chosen, mfu,
                                  allowance, cost, note, engine=engine, peft_config=peft_config, progress=progress,
                                  images=images)
    if fmt not in ("table", "markdown"):
        click.echo(render([r for _, rows in per_model for r in rows], fmt, MEMORY_COLUMNS))
    else:
        click.echo(_blocks(memory_text(spec, rows, setup, chosen, targets, fmt, wide, picked, allowance,
                                       terminal_width()) for spec, rows in per_model))
    misses = [r for _, rows in per_model for r in rows if not r["fits"]] if check else []
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
@engine_options
@image_options
@format_option
def fit(specs, methods, methods_from_all, ranks, targets, setup, parallel, gpu, gpu_memory, headroom, engine,
        peft_config, images, fmt):
    """What fits a GPU: the largest batch, sequence length and rank per method, and which knobs make a setup fit.

    For each method (and rank): whether the setup as given fits, the largest batch
    size at the given sequence length, the longest sequence at the given batch
    size and the largest rank at both, each found by search over the estimator.
    Then a table of the memory savers (gradient checkpointing, 8-bit AdamW, an
    nf4 base) alone and together: which make the given setup fit, and with how
    much to spare. 'Fits' counts the runtime and the allocator allowance
    (--headroom), as in 'lorabench memory'. With --gpus N --sharding S, on each
    of N GPUs, each running its own batch. A model without a description (or
    --engine trace, --peft-config) is answered by traces of transformers + PEFT:
    each limit is found from a few traces and checked by them (seconds each,
    then cached).

    \b
    Example:
        lorabench fit -m llama-3-8b --gpu RTX-4090 --method lora,dora,full -r 16 -t all-linear -s 4096
        lorabench fit -m qwen3-8b --gpu-memory 48 --method lora --grad-checkpointing -f json
        lorabench fit -m llama-3-70b --gpu RTX-4090 --gpus 2 --sharding fsdp --method lora --dtype nf4
        lorabench fit --config ./granite-3.3-8b/config.json --gpu L40S --method lora -t all-linear
        lorabench fit --config ./qwen2.5-vl-7b --gpu L40S --method lora -t q_proj,v_proj --images 2 --image-size 448x448
    """
    from lorabench import api

    import json

    from lorabench.render.answer import fit_text

    if (gpu is None) == (gpu_memory is None):
        raise click.UsageError("give --gpu NAME or --gpu-memory GIB (one of them).")
    if gpu is not None:
        chosen = pick_gpu(gpu)
        label, capacity = chosen.name, chosen.memory_bytes
    else:
        label, capacity = f"{gpu_memory:g} GiB GPU", int(gpu_memory * 2 ** 30)
    limit_rows, knob_rows = api.fit_answer(specs, methods, methods_from_all, ranks, targets, setup, parallel, label,
                                           capacity, headroom / 100, note, engine=engine, peft_config=peft_config,
                                           progress=progress, images=images)
    if fmt == "json":
        click.echo(json.dumps({"limits": limit_rows, "knobs": knob_rows}, indent=2))
    elif fmt == "csv":
        click.echo(render(limit_rows, fmt, ()))
    else:
        click.echo(fit_text(limit_rows, knob_rows, setup, terminal_width(), fmt))
