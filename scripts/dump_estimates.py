"""Dump a wide grid of lorabench's answers (memory, fit, params as JSON and as tables) to one JSON file, so that
a change meant to keep every output byte-identical can be checked: run it before and after, then compare.

    python scripts/dump_estimates.py before.json
    ... change ...
    python scripts/dump_estimates.py after.json && python scripts/dump_estimates.py --diff before.json after.json

Runs the CLI in-process (click's CliRunner), so it prints exactly what users see, with COLUMNS=100.
"""

from __future__ import annotations

import itertools
import json
import os
import sys

MODELS = ("llama-3-8b", "qwen2.5-0.5b", "gpt2", "gemma-3-4b", "phi-3-mini", "mixtral-8x7b", "qwen3-30b-a3b",
          "gemma-2-2b", "llama-3-70b")
SETUPS = ("", "--grad-checkpointing", "--dtype nf4", "--dtype fp32 --autocast bf16", "-b 4 -s 4096",
          "--loop plain --grad-accum 4", "--loss chunked --optimizer paged-adamw-8bit", "--impl lorabench",
          "--gpus 8 --sharding fsdp", "--gpus 4 --sharding zero2 --grad-checkpointing", "--gpus 2 --sharding ddp",
          "--dtype int8 --kbit-prepare --grad-checkpointing", "--gpus 2 --sharding fsdp --cpu-offload")
TARGETS = ("", "-t all-linear")


def commands():
    for model, setup, targets in itertools.product(MODELS, SETUPS, TARGETS):
        base = f"-m {model} --method all -r 16 {targets} {setup}".split()
        yield ["memory", *base, "--gpu", "H100-80GB", "-f", "json"]
        yield ["memory", *base, "--gpu", "RTX-4090"]
    for model, targets in itertools.product(MODELS, TARGETS):
        yield ["params", "-m", model, "--method", "all", "-r", "8", "-r", "64", *targets.split(), "-f", "json"]
        yield ["memory", "-m", model, "--method", "lora,full", "--gpu", "H100-80GB", "--tokens", "1B",
               *targets.split(), "-f", "json"]
        yield ["memory", "-m", model, "--method", "lora,full", *targets.split()]
        yield ["fit", "-m", model, "--method", "lora,full,dora", "--gpu", "RTX-4090", *targets.split(), "-f", "json"]
        yield ["fit", "-m", model, "--method", "lora", "--gpu", "A100-40GB", "-s", "4096",
               *targets.split()]
    yield from wide_grid()


# Every preset once per option value that the grid above leaves out (dtypes, loops, losses, optimizers, attention,
# device, raw dimensions, cost, --check, fit under sharding), plus models/gpus and every command's --help.
EXTRA_SETUPS = ("--dtype fp16", "--dtype fp32", "--autocast fp16", "--device cpu", "--master-weights",
                "--attention eager", "--dropout 0.1", "--loss fused-linear", "--optimizer sgd",
                "--optimizer sgd-momentum", "--optimizer adamw-8bit", "--optimizer paged-adamw",
                "--adapter-dtype bf16", "--cpu-offload", "--loop plain -b 8 --grad-accum 2",
                "--layers 2", "--loss chunked --loss-chunk 256 --loop plain", "--dtype nf4 --gpus 4 --sharding fsdp")
PRESETS = ("llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b", "llama-3-70b", "llama-3.1-8b", "llama-3.1-70b",
           "llama-3.1-405b", "llama-3.2-1b", "llama-3.2-3b", "mistral-7b", "qwen2.5-0.5b", "qwen2.5-7b",
           "qwen2.5-72b", "gpt2", "mistral-nemo-12b", "qwen3-8b", "gemma-2-2b", "gemma-2-9b", "gemma-3-1b",
           "gemma-3-4b", "gemma-3-27b", "phi-3-mini", "phi-4", "olmo-2-7b", "mixtral-8x7b", "qwen1.5-moe-a2.7b",
           "qwen3-30b-a3b", "tiny-llama")


def wide_grid():
    for model in PRESETS:
        yield ["memory", "-m", model, "--method", "all", "-r", "8", "-r", "128", "--gpu", "A100-80GB", "-f", "json"]
        yield ["memory", "-m", model, "--method", "all", "-t", "all-linear", "--gpu", "L4", "--wide"]
        yield ["params", "-m", model, "--method", "all", "-r", "4", "-t", "all-linear"]
        yield ["fit", "-m", model, "--method", "all", "--gpu", "H100-80GB", "-f", "json"]
        yield ["fit", "-m", model, "--method", "lora,full", "--gpu", "RTX-4090", "--gpus", "4", "--sharding",
               "zero2"]
        for setup in EXTRA_SETUPS:
            yield ["memory", "-m", model, "--method", "all", "--gpu", "A100-40GB", *setup.split(), "-f", "json"]
    for setup in EXTRA_SETUPS[:8]:
        yield ["memory", "-m", "llama-3-8b", "--method", "all", "--gpu", "A100-40GB", *setup.split()]
    for d in ("--d 4096", "--d 4096 --layers 32", "--d 8192 --layers 80"):
        yield ["params", *d.split(), "--method", "all", "-r", "8", "-r", "16"]
        yield ["memory", *d.split(), "--method", "all", "--gpu", "H100-80GB", "-f", "json"]
        yield ["memory", *d.split(), "--method", "all"]
    for cost in ("--tokens 2B --price 2.5", "--dataset-tokens 100M --epochs 3 --mfu 0.4", "--check"):
        yield ["memory", "-m", "llama-3-8b", "--method", "lora,full", "--gpu", "H100-80GB", *cost.split(), "-f",
               "json"]
        yield ["memory", "-m", "llama-3-8b", "--method", "lora,full", "--gpu", "H100-80GB", *cost.split()]
    yield ["fit", "-m", "llama-3-70b", "--method", "lora,full", "--gpu", "H100-80GB", "--gpus", "8", "--sharding",
           "fsdp", "-f", "json"]
    yield ["fit", "-m", "llama-3-8b", "--method", "all", "--gpu-memory", "23.99", "--autocast", "bf16"]
    for fmt in ("table", "markdown", "csv", "json"):
        yield ["models", "-f", fmt]
        yield ["gpus", "-f", fmt]
        yield ["memory", "-m", "llama-3-8b", "-m", "mistral-7b", "--method", "all", "--gpu", "RTX-4090", "-f", fmt]
        yield ["params", "-m", "llama-3-8b", "--method", "all", "-f", fmt]
        yield ["fit", "-m", "llama-3-8b", "--method", "lora,full", "--gpu", "RTX-4090", "-f", fmt]
    for command in ("", "params", "memory", "fit", "models", "gpus", "report", "bench"):
        yield [*command.split(), "--help"]
    for bad in ("memory -m nope", "memory --method bogus", "fit -m llama-3-8b", "memory --tokens 1x",
                "memory --gpus 2", "params -r 0", "memory --dtype nf4 --method full --gpu H100-80GB"):
        yield bad.split()


def dump(path: str) -> None:
    from click.testing import CliRunner

    from lorabench.cli import cli

    os.environ["COLUMNS"] = "100"
    runner = CliRunner()
    out = {}
    for args in commands():
        r = runner.invoke(cli, args)
        out[" ".join(args)] = {"exit": r.exit_code, "stdout": r.stdout, "stderr": r.stderr}
    with open(path, "w") as f:
        json.dump(out, f, indent=0, sort_keys=True)
    print(f"{len(out)} commands -> {path}")


def diff(a: str, b: str) -> int:
    with open(a) as f:
        x = json.load(f)
    with open(b) as f:
        y = json.load(f)
    changed = [k for k in x if k in y and x[k] != y[k]]
    for k in changed[:40]:
        print("changed:", k)
    print(f"{len(changed)} of {len(x)} commands changed; {len(set(x) ^ set(y))} only in one")
    return 1 if changed else 0


if __name__ == "__main__":
    if sys.argv[1] == "--diff":
        sys.exit(diff(sys.argv[2], sys.argv[3]))
    dump(sys.argv[1])
