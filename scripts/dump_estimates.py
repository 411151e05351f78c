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
