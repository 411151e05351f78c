"""The CLI: JSON contract, help on every command, one-line errors with exit code 2, no torch import."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from lorabench.cli import cli

CONTRACT_PARAMS = {"method", "rank", "trainable_params", "total_params", "trainable_pct"}
CONTRACT_MEMORY = CONTRACT_PARAMS | {"weights_bytes", "adapter_bytes", "gradients_bytes", "optimizer_bytes",
                                     "activations_bytes", "overhead_bytes", "peak_bytes"}


def run(*args):
    return CliRunner().invoke(cli, list(args))


def test_params_json_contract():
    res = run("params", "--model", "llama-3-8b", "--method", "lora", "--method", "vera", "--rank", "8",
              "--rank", "256", "--targets", "q,v", "-f", "json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [(r["method"], r["rank"]) for r in rows] == [("lora", 8), ("lora", 256), ("vera", 8), ("vera", 256)]
    assert all(CONTRACT_PARAMS <= set(r) for r in rows)
    assert rows[0]["trainable_params"] == 3_407_872 and rows[3]["trainable_params"] == 180_224


def test_memory_json_contract_with_gpu():
    res = run("memory", "-m", "llama-3-8b", "--method", "all", "--gpu", "A100-80GB", "-f", "json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [r["method"] for r in rows] == ["full", "lora", "lora-fa", "vera", "delta-lora", "lora-plus", "dora"]
    for r in rows:
        assert CONTRACT_MEMORY | {"fits", "gpus_needed"} <= set(r)
        assert isinstance(r["peak_bytes"], int)


def test_seed_example_and_formats():
    res = run("params", "--d", "4096", "--method", "lora", "--rank", "8", "-f", "csv")
    assert res.exit_code == 0
    header, line = res.output.strip().splitlines()
    row = dict(zip(header.split(","), line.split(",")))
    assert row["trainable_params"] == "65536" and row["total_params"] == "16842752"
    for fmt in ("table", "markdown"):
        assert "65,536" in run("params", "--d", "4096", "--method", "lora", "-f", fmt).output


def test_quantized_all_skips_methods_that_write_w_and_says_so():
    res = run("memory", "--dtype", "nf4", "-f", "json")
    rows = json.loads(res.stdout)
    assert "full" not in [r["method"] for r in rows] and "delta-lora" not in [r["method"] for r in rows]
    assert "note: full, delta-lora left out: they write the base weights" in res.stderr


@pytest.mark.parametrize("args, message", [
    (("params", "--model", "llama3-8b"), "Did you mean llama-3-8b"),
    (("params", "--rank", "0"), "must be from 1 to"),
    (("params", "--rank", "5000"), "larger than target"),
    (("params", "--method", "loraa"), "unknown method"),
    (("memory", "--dtype", "fp8"), "fp8"),
    (("memory", "--optimizer", "lion"), "lion"),
    (("memory", "--gpu", "H1000"), "unknown GPU"),
    (("memory", "--format", "xml"), "xml"),
    (("memory", "--batch-size", "0"), "must be from 1 to"),
    (("memory", "--seq-len", "-5"), "must be from 1 to"),
    (("memory", "--method", "full", "--dtype", "nf4"), "writes the base weights"),
    (("memory", "--method", "delta-lora", "--dtype", "int8"), "writes the base weights"),
    (("params", "--config", "/nonexistent/config.json"), "no config.json"),
    (("params", "--model", "gpt2", "--d", "4096"), "not both"),
    (("params", "--model", "gpt2", "--targets", "q,v"), "use qkv"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    res = CliRunner().invoke(cli, list(args))
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in res.output


def test_every_command_has_help_with_an_example():
    for name, command in cli.commands.items():
        res = run(name, "-h")
        assert res.exit_code == 0 and "Example:" in res.output, name
    assert run("--version").exit_code == 0


def test_models_and_gpus_lists():
    models = json.loads(run("models", "-f", "json").output)
    assert {"model": "llama-3-8b", "params": 8_030_261_248}.items() <= next(
        m for m in models if m["model"] == "llama-3-8b").items()
    gpus = json.loads(run("gpus", "-f", "json").output)
    assert {g["gpu"] for g in gpus} >= {"A100-40GB", "A100-80GB", "H100-80GB", "H200", "L4", "L40S", "RTX-4090"}


def test_estimation_commands_never_import_torch():
    code = ("import sys; from lorabench.cli import cli\n"
            "for args in (['params'], ['memory', '-m', 'llama-3-70b', '--method', 'all', '--gpu', 'H100-80GB'],"
            " ['models'], ['gpus']):\n"
            "    cli.main(args, standalone_mode=False)\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_python_dash_m_entry_point():
    res = subprocess.run([sys.executable, "-m", "lorabench", "params", "-f", "json", "--method", "lora"],
                         capture_output=True, text=True)
    assert res.returncode == 0 and json.loads(res.stdout)[0]["trainable_params"] == 3_407_872
