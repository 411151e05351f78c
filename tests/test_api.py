"""The Python API (lorabench.estimate, fit, count_params): the CLI's JSON, field for field, without torch; the
README's example runs as written; a missing extra is one line."""

import doctest
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

import lorabench
from lorabench import api
from lorabench.cli import cli
from lorabench.errors import LorabenchError

REPO = Path(__file__).resolve().parents[1]


def cli_json(*args):
    res = CliRunner().invoke(cli, [*args, "-f", "json"])
    assert res.exit_code == 0, res.output
    notes = [line[len("lorabench: note: "):] for line in res.stderr.splitlines()]
    return json.loads(res.stdout), notes


def api_call(fn, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(**kw)
    return out, [str(w.message) for w in caught if issubclass(w.category, lorabench.LorabenchNote)]


# (CLI options, the same as keywords)
MEMORY_CASES = [
    (["-m", "llama-3-8b", "--method", "lora", "-r", "16", "--gpu", "RTX-4090", "-s", "4096"],
     dict(model="llama-3-8b", method="lora", rank=16, gpu="RTX-4090", seq_len=4096)),
    (["-m", "qwen2.5-0.5b", "-m", "gpt2", "--method", "all", "-r", "8", "-r", "64", "-t", "all-linear"],
     dict(model=["qwen2.5-0.5b", "gpt2"], method="all", rank=[8, 64], targets="all-linear")),
    (["-m", "llama-3-70b", "--method", "full,lora", "--gpu", "H100-80GB", "--gpus", "8", "--sharding", "fsdp",
      "--grad-checkpointing", "--tokens", "2B"],
     dict(model="llama-3-70b", method="full,lora", gpu="H100-80GB", gpus=8, sharding="fsdp",
          grad_checkpointing=True, tokens=2_000_000_000)),
    (["-m", "mixtral-8x7b", "--method", "all", "--dtype", "nf4", "--gpu", "A100", "--loss", "chunked",
      "--loss-chunk", "256"],
     dict(model="mixtral-8x7b", method="all", dtype="nf4", gpu="A100", loss="chunked", loss_chunk=256)),
    (["--d", "4096", "--layers", "32", "--method", "all", "--autocast", "bf16", "--loop", "plain"],
     dict(d=4096, layers=32, method="all", autocast="bf16", loop="plain")),
]


@pytest.mark.parametrize("args, kw", MEMORY_CASES)
def test_estimate_is_the_memory_commands_json(args, kw):
    rows, notes = cli_json("memory", *args)
    got, told = api_call(lorabench.estimate, **kw)
    # the same fields and numbers; the notes name settings as keywords (spelling.api_spelling), not options
    worded = ("notes", "price_source")
    assert [{k: v for k, v in r.items() if k not in worded} for r in got] == [
        {k: v for k, v in r.items() if k not in worded} for r in rows]
    assert [len(r["notes"]) for r in got] == [len(r["notes"]) for r in rows] and len(told) == len(notes)
    assert not any(re.search(r"(^|\s)--[a-z]", n) for r in got for n in r["notes"] + told)
    if "gpu" in kw:  # the verdict the README calls part of the contract (it used to be the CLI's alone)
        assert all({"fits", "spare_bytes", "fix", "fix_alternative", "largest_component"} <= set(r) for r in got)


def test_a_fix_from_the_api_is_the_options_that_fit():
    row = lorabench.estimate(model="llama-3-8b", method="lora", rank=16, gpu="RTX-4090", seq_len=4096)[0]
    assert not row["fits"] and row["fix"]["args"][0] == "--grad-checkpointing"
    again, _ = cli_json("memory", "-m", "llama-3-8b", "--method", "lora", "-r", "16", "--gpu", "RTX-4090",
                        "-s", "4096", *row["fix"]["args"])
    assert again[0]["fits"] and again[0]["spare_bytes"] == row["fix"]["spare_bytes"]


@pytest.mark.parametrize("args, kw", [
    (["-m", "llama-3-8b", "--method", "lora,full,dora", "--gpu", "RTX-4090"],
     dict(model="llama-3-8b", method="lora,full,dora", gpu="RTX-4090")),
    (["-m", "qwen3-8b", "--method", "lora", "--gpu-memory", "48", "--grad-checkpointing", "-t", "all-linear"],
     dict(model="qwen3-8b", method="lora", gpu_memory=48, grad_checkpointing=True, targets="all-linear")),
])
def test_fit_is_the_fit_commands_json(args, kw):
    data, notes = cli_json("fit", *args)
    got, told = api_call(lorabench.fit, **kw)
    assert got == data and told == notes
    assert all(isinstance(k["args"], list) for k in got["knobs"])


def test_count_params_is_the_params_commands_json():
    rows, _ = cli_json("params", "-m", "llama-3-8b", "--method", "all", "-r", "8", "-r", "64")
    assert lorabench.count_params(model="llama-3-8b", rank=[8, 64]) == rows
    # LoRA r=8 on q and v of Llama-3-8B by hand: 32 layers x (8 x (4096 + 4096) + 8 x (4096 + 1024))
    assert lorabench.count_params(method="lora")[0]["trainable_params"] == 32 * (8 * 8192 + 8 * 5120) == 3_407_872


def test_notes_come_as_warnings():
    _, told = api_call(lorabench.estimate, model="llama-3-8b", method="all", dtype="nf4", gpu="A100")
    assert any("full, delta-lora left out" in t for t in told)
    assert any("A100-80GB" in t for t in told)  # the name several GPUs share, taken as one of them


@pytest.mark.parametrize("kw, msg", [
    (dict(method="bogus"), "unknown method"), (dict(rank=0), "rank must be"), (dict(rank=2.5), "rank must be"),
    (dict(batch_size=0), "batch size"), (dict(dtype="fp8"), "dtype"), (dict(gpus=2), "gpus=2 needs sharding"),
    (dict(bogus=1), "unknown keyword"), (dict(model="no-such-model"), "no-such-model"),
    (dict(tokens=10 ** 9), "need a gpu"), (dict(loss_chunk=64), "loss_chunk applies"),
    (dict(headroom=200), "headroom"),
])
def test_bad_input_raises_the_clis_error(kw, msg):
    with pytest.raises(LorabenchError, match=msg):
        lorabench.estimate(**kw)
    with pytest.raises(LorabenchError, match="one of them"):
        lorabench.fit(model="llama-3-8b")


def test_settings_are_named_as_keywords_in_the_api_and_as_options_in_the_cli():
    with pytest.raises(LorabenchError, match=r"^gpus=2 needs sharding ddp, zero2 or fsdp"):
        lorabench.estimate(gpus=2)
    res = CliRunner().invoke(cli, ["memory", "--gpus", "2"])
    assert res.exit_code == 2 and "error: --gpus 2 needs --sharding ddp, zero2 or fsdp" in res.stderr
    _, told = api_call(lorabench.estimate, method="full", targets="q,v")
    assert told == ["targets does not apply to full fine-tuning, which trains every weight; it is ignored."]
    _, notes = cli_json("memory", "--method", "full", "-t", "q,v")
    assert notes == ["--targets does not apply to full fine-tuning, which trains every weight; it is ignored."]
    # a fix's args are options in both: they are what to type
    row = lorabench.estimate(method="lora", gpu="RTX-4090", seq_len=8192)[0]
    assert row["fix"]["args"][0].startswith("--")


def test_the_docstrings_examples_run():
    failed, attempted = doctest.testmod(api)
    assert attempted >= 6 and failed == 0


def test_the_readmes_python_example_runs():
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = "\n".join(line[4:] if line.startswith(">>> ") or line.startswith("... ") else line
                     for line in code.splitlines() if not line.startswith("#"))
    res = subprocess.run([sys.executable, "-c", code + "\nimport sys; assert 'torch' not in sys.modules\n"],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip(), "the example prints its answer"


@pytest.mark.parametrize("args", [
    ["params"], ["memory", "-m", "llama-3-70b", "--method", "all", "--gpu", "H100-80GB"],
    ["fit", "-m", "llama-3-8b", "--method", "lora,full", "--gpu", "RTX-4090"], ["models"], ["gpus"],
])
def test_each_estimate_command_imports_no_torch(args):
    code = ("import sys; from lorabench.cli import cli\n"
            f"cli.main({args!r}, standalone_mode=False)\n"
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'matplotlib', 'numpy') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_the_api_imports_no_torch():
    code = ("import sys, lorabench\n"
            "lorabench.estimate(model='llama-3-8b', method='all', gpu='H100-80GB')\n"
            "lorabench.fit(model='llama-3-8b', method='lora', gpu='RTX-4090')\n"
            "lorabench.count_params(model='gpt2')\n"
            "assert 'torch' not in sys.modules and 'click' not in sys.modules, sorted(sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("args, extra, package", [
    (["bench", "-m", "tiny-llama", "--method", "lora"], "bench", "torch"),
    (["report", "--method", "lora"], "report", "matplotlib"),
])
def test_a_missing_extra_is_one_line_naming_it(tmp_path, monkeypatch, args, extra, package):
    monkeypatch.setitem(sys.modules, package, None)  # importlib.util.find_spec then finds nothing
    res = CliRunner().invoke(cli, [*args, *(["--out-dir", str(tmp_path)] if args[0] == "report" else [])])
    assert res.exit_code == 2, res.output
    assert res.stderr == (f"lorabench: error: lorabench {args[0]} needs {package}, which is not installed: "
                          f"pip install 'lorabench[{extra}]'.\n")
    assert list(tmp_path.iterdir()) == []
