"""Property tests (hypothesis): random command lines and random config.json files never end badly.

What is fuzzed:
- command lines of `params`, `memory`, `report` (estimates only, into a fresh --out-dir) and `bench` (on the
  CPU, tiny sizes): each option gets valid values mixed with hostile ones (empty, whitespace, NaN, inf, 1e400,
  4096.5, hundreds of digits, 5,000 characters, unknown and near-miss names, unicode), options repeat, and a
  junk token is sometimes inserted or a token dropped;
- config.json files: each family's real keys with wrong types, out-of-range sizes, missing and unknown keys,
  unknown model_type, and text that is not strict JSON (NaN, duplicate keys, truncation, deep nesting,
  non-UTF-8, empty, oversized).

What must hold on every run: exit code 0, 1, 2 or 130 (70 is lorabench's "internal error": a bug), no
traceback, exit 2 says why in one short `lorabench: error:` line, json and csv output parse (strict JSON:
no NaN or Infinity), and the numbers keep their invariants: counts and bytes are integers >= 0, trainable <=
total, peak = the largest phase >= weights, `fits` agrees with the bytes.

Profiles (root conftest.py): `ci`, the default, runs a few hundred examples per fast property; `thorough` a
few thousand (report and bench, which write files and train, run a fraction of that):

    LORABENCH_HYPOTHESIS=thorough python -m pytest tests/test_properties.py

--hypothesis-show-statistics shows how the runs ended (each exit code is a hypothesis event).
"""

import contextlib
import csv
import io
import json
import math
import os
import re
import shlex
import tempfile
from dataclasses import fields
from pathlib import Path

import pytest
from click.testing import CliRunner

from lorabench.cli import cli
from lorabench.errors import LorabenchError
from lorabench.gpus import GPUS
from lorabench.hfconfig import (MAX_CONFIG_BYTES, MAX_DEPTH, MAX_LAYERS, MAX_MLP, MAX_POSITIONS, MAX_VOCAB, MAX_WIDTH,
                                load_config)
from lorabench.memory import ATTENTION, DTYPES, FLOAT_BYTES, IMPLS, OPTIMIZERS
from lorabench.methods import METHODS
from lorabench.render import FORMATS
from lorabench.report import FILES
from lorabench.reportfolder import MARKER
from lorabench.specs import PRESETS, ModelSpec

pytest.importorskip("hypothesis")  # a test extra (setup.cfg)
from hypothesis import event, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXIT_CODES = {0, 1, 2, 130}  # 70 is "internal error": a bug
MAX_ERROR_LINE = 300
PHASES = ("forward", "backward", "optimizer")
COUNT_KEYS = ("trainable_params", "total_params", "base_params", "adapter_params")


def scaled(fraction: float) -> settings:
    """Settings for a slow property: that fraction of the profile's examples (ci 300, thorough 3000), >= 3."""
    return settings(max_examples=max(3, round(settings.default.max_examples * fraction)))


# --------------------------------------------------------------------------------------------------
# Option values: valid ones, mixed with what a typo, an unset variable or a fuzzer types.

# No NUL: a real argv cannot hold one (execve takes C strings). "\udcff" is how Python spells a non-UTF-8 byte.
HOSTILE_WORDS = ["", " ", "\t", "nan", "NaN", "inf", "-inf", "1e400", "-1", "0", "-0", "+8", "4096.5", "1e3",
                 "0x10", "1_000", "٣", "9" * 300, "x" * 5000, "llama3-8b", "Llama-3-8B ", "H100", "h100_80gb",
                 "lora,", ",", "all,all", "loraa", "q,,v", "ﬁ", "💥", "\udcff", "--", "-h"]
HOSTILE = st.one_of(st.sampled_from(HOSTILE_WORDS),
                    st.text(alphabet=st.characters(blacklist_characters="\x00"), max_size=30))
# For bench: hostile numbers that no option accepts, so that a run never trains at a large size.
BAD_NUMBERS = st.one_of(st.sampled_from(["", " ", "nan", "inf", "-inf", "1e400", "-1", "0", "4096.5", "1e3",
                                         "0x10", "9" * 300, "x" * 5000, "\udcff"]),
                        st.text(alphabet=st.characters(blacklist_categories=("Nd", "Cs"),
                                                       blacklist_characters="\x00"), max_size=10))
FLAG = st.none()  # an option without a value


def mostly(valid, hostile=HOSTILE):
    """Valid values five times out of six, hostile ones otherwise."""
    return st.one_of(*[valid] * 5, hostile)


def numbers(lo, hi):
    return st.integers(lo, hi).map(str)


def decimals(lo, hi):
    return st.floats(lo, hi).map(str)


def names(values):
    """Names as given or upper-cased (case-insensitive options take both)."""
    return st.sampled_from(sorted(values)).flatmap(lambda v: st.sampled_from([v, v, v.upper()]))


METHOD_LISTS = st.lists(st.sampled_from([*METHODS, "all"]), min_size=1, max_size=3).map(",".join)
TARGET_LISTS = st.one_of(
    st.sampled_from(["all-linear", "all", "qkv", "q,v", "Q,V"]),
    st.lists(st.sampled_from(["q", "k", "v", "o", "gate", "up", "down", "qkv"]), min_size=1, max_size=4,
             unique=True).map(",".join))
GPU_NAMES = st.sampled_from(sorted(GPUS)).flatmap(lambda g: st.sampled_from([g, g.lower(), g.replace("-", "_")]))

MODEL_OPTIONS = {
    ("--model", "-m"): mostly(names(PRESETS)),
    ("--config",): st.one_of(st.sampled_from(["/nonexistent/config.json", "/dev/null", "/", "."]), HOSTILE),
    ("--d",): mostly(numbers(1, 1 << 14)),
    ("--layers",): mostly(st.one_of(numbers(1, 200), st.just(str(MAX_LAYERS)))),
}
METHOD_OPTIONS = {
    ("--method",): mostly(METHOD_LISTS),
    ("--rank", "-r"): mostly(st.one_of(numbers(1, 64), numbers(1, 64), numbers(65, 1 << 14))),
    ("--targets", "-t"): mostly(TARGET_LISTS),
}
SETUP_OPTIONS = {
    ("--alpha",): mostly(decimals(1e-3, 1e6)),
    ("--batch-size", "-b"): mostly(st.one_of(numbers(1, 64), numbers(1, 1 << 20))),
    ("--seq-len", "-s"): mostly(st.one_of(numbers(1, 8192), numbers(1, 1 << 24))),
    ("--dtype",): mostly(names(DTYPES)),
    ("--adapter-dtype",): mostly(names(FLOAT_BYTES)),
    ("--optimizer",): mostly(names(OPTIMIZERS)),
    ("--grad-checkpointing",): FLAG,
    ("--no-grad-checkpointing",): FLAG,
    ("--attention",): mostly(names(ATTENTION)),
    ("--dropout",): mostly(decimals(0.0, 0.99)),
    ("--master-weights",): FLAG,
    ("--device",): mostly(st.sampled_from(["cuda", "cpu"])),
    ("--impl",): mostly(st.sampled_from(IMPLS)),
}
GPU_OPTIONS = {
    ("--gpu",): mostly(GPU_NAMES),
    ("--mfu",): mostly(decimals(0.01, 1.0)),
}
FORMAT_OPTION = {("--format", "-f"): mostly(names(FORMATS))}

# Small config.json folders that report and bench write into their working folder, to be read with --config.
TINY_CONFIGS = {
    "tiny": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64},
    "tiny-gpt2": {"model_type": "gpt2", "n_embd": 32, "n_head": 4, "n_layer": 2, "n_positions": 32,
                  "vocab_size": 64},
}
TINY_CONFIG_PATHS = st.sampled_from(["tiny", "tiny/", "./tiny", "tiny/config.json", "tiny-gpt2"])

PARAMS_OPTIONS = {**MODEL_OPTIONS, **METHOD_OPTIONS, **FORMAT_OPTION}
MEMORY_OPTIONS = {**MODEL_OPTIONS, **METHOD_OPTIONS, **SETUP_OPTIONS, **GPU_OPTIONS, **FORMAT_OPTION}
# report: estimates only (no --bench); --steps, --warmup and --layers without it are an error.
REPORT_OPTIONS = {**MODEL_OPTIONS, **METHOD_OPTIONS, **SETUP_OPTIONS, **GPU_OPTIONS,
                  ("--config",): mostly(TINY_CONFIG_PATHS, MODEL_OPTIONS[("--config",)]),
                  ("--name",): mostly(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,20}", fullmatch=True)),
                  ("--force",): FLAG, ("--steps",): mostly(numbers(1, 5)), ("--warmup",): mostly(numbers(1, 5))}
# report's --out-dir, under a fresh folder: made if missing, however deep; a name too long for the filesystem.
OUT_DIRS = st.sampled_from(["reports", "reports/a/b", "new/" + "x" * 300])
# bench: every valid value is tiny (each example trains); the model and --device cpu are fixed around them.
BENCH_MODELS = mostly(st.one_of(st.just(["--model", "tiny-llama"]), TINY_CONFIG_PATHS.map(lambda p: ["--config", p])),
                      st.sampled_from([["--model", "tiny-lama"], ["--d", "64"], ["--config", "missing"],
                                       ["--model", "tiny-llama", "--d", "64"]]))
BENCH_TINY = ["--layers", "1", "--seq-len", "8", "--batch-size", "1", "--steps", "1", "--warmup", "1"]
BENCH_FIXED = ["--device", "cpu", "--no-progress"]
BENCH_OPTIONS = {
    ("--layers",): mostly(st.sampled_from(["1", "2"]), BAD_NUMBERS),
    ("--seq-len", "-s"): mostly(numbers(1, 16), BAD_NUMBERS),
    ("--batch-size", "-b"): mostly(numbers(1, 2), BAD_NUMBERS),
    ("--steps",): mostly(st.just("1"), BAD_NUMBERS),
    ("--warmup",): mostly(st.just("1"), BAD_NUMBERS),
    ("--rank", "-r"): mostly(numbers(1, 8), BAD_NUMBERS),
    ("--method",): mostly(METHOD_LISTS),
    ("--targets", "-t"): mostly(TARGET_LISTS),
    ("--alpha",): mostly(decimals(1e-3, 64.0)),
    ("--dtype",): mostly(st.sampled_from(["fp32", "bf16", "fp16"]), st.sampled_from(["int8", "nf4", "fp8", ""])),
    ("--adapter-dtype",): mostly(names(FLOAT_BYTES)),
    ("--optimizer",): mostly(names(OPTIMIZERS)),
    ("--grad-checkpointing",): FLAG,
    ("--attention",): mostly(names(ATTENTION)),
    ("--dropout",): mostly(decimals(0.0, 0.99)),
    ("--master-weights",): FLAG,
    ("--impl",): mostly(st.sampled_from(IMPLS)),
    ("--tolerance",): mostly(decimals(0.0, 100.0)),
    ("--check",): FLAG,
    ("--gpu",): mostly(GPU_NAMES),
    ("--output", "-o"): mostly(st.sampled_from(["rows.json", "rows.csv"]),
                               st.sampled_from(["rows.txt", "", "missing/rows.json", ".", "rows.json/", "tiny"])),
    ("--force",): FLAG,
    **FORMAT_OPTION,
}


@st.composite
def command_lines(draw, options, formats=True, max_options=8):
    """Options drawn from the table (repeats allowed), usually after a `-f` that later ones override, then
    now and then a junk token inserted or a token dropped."""
    args = []
    if formats and draw(st.integers(0, 9)):
        args += ["-f", draw(st.sampled_from(["json", "json", "json", "csv", "table", "markdown"]))]
    for option in draw(st.lists(st.sampled_from(sorted(options)), max_size=max_options)):
        args.append(draw(st.sampled_from(option)))
        value = draw(options[option])
        if value is not None:
            args.append(value)
    mangle = draw(st.sampled_from(["none"] * 8 + ["junk", "drop"]))
    if mangle == "junk":
        junk = draw(st.one_of(HOSTILE, st.sampled_from(["--bogus", "-x", "--rank", "-f", "--version"])))
        args.insert(draw(st.integers(0, len(args))), junk)
    elif mangle == "drop" and args:
        del args[draw(st.integers(0, len(args) - 1))]
    return args


# --------------------------------------------------------------------------------------------------
# config.json contents.

LLAMA_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "attention_bias", "mlp_bias")
GPT2_KEYS = ("n_embd", "n_head", "n_layer", "n_positions", "n_inner", "vocab_size", "tie_word_embeddings")
# (the llama-shaped families; Gemma's and the experts' configs are checked in tests/test_families.py)
FAMILY_KEYS = {"llama": LLAMA_KEYS, "mistral": LLAMA_KEYS, "qwen2": LLAMA_KEYS, "qwen3": LLAMA_KEYS,
               "phi3": LLAMA_KEYS, "olmo2": LLAMA_KEYS, "gpt2": GPT2_KEYS}
KNOWN_KEYS = sorted(set(LLAMA_KEYS + GPT2_KEYS + ("model_type",)))
# transformers' num_key_value_heads where the key is absent (the others: the attention heads)
KV_DEFAULTS = {"mistral": 8, "qwen2": 32, "qwen3": 32}

HEADS = (1, 2, 4, 8, 32, 128)
LAYER_COUNTS = st.one_of(st.integers(1, 128), st.just(MAX_LAYERS))
VOCABS = st.one_of(st.integers(1, 300_000), st.just(MAX_VOCAB))
# Any JSON value a key could hold, valid or not.
JSON_VALUES = st.one_of(
    st.integers(-2, 64), st.integers(-(1 << 70), 1 << 70),
    st.sampled_from([0, -1, MAX_WIDTH + 1, MAX_LAYERS + 1, 10 ** 30, 10 ** 4000]),
    st.integers(1, 4096).map(float), st.floats(),
    st.sampled_from(["4096", "abc", "false", "true", "null", "", "1e3", "\ud800"]), st.text(max_size=10),
    st.booleans(), st.none(),
    st.lists(st.integers(0, 8), max_size=3),
    st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.none(), st.lists(st.none(), max_size=2)),
                    max_size=3),
)
MODEL_TYPES = st.one_of(st.sampled_from(["LLAMA", "Llama", " llama", "llama2", "bert", "gpt-2", "", "qwen2.5"]),
                        JSON_VALUES)
UNKNOWN_KEYS = st.one_of(st.sampled_from(["text_config", "rope_scaling", "a\nb", "\ud800", ""]), st.text(max_size=10))
# Literals json.dumps never writes: not JSON, or JSON that lorabench refuses (non-finite, past int()'s digit limit).
ODD_LITERALS = st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "9" * 5000, "-0", "1E2", "01",
                                "0x10", "4096.", "True", "None", "'4096'"])
# How the contents become a file: mostly json.dumps, else a way a config.json goes wrong.
STRICT_KINDS = ("json", "unicode", "bom")
ENCODINGS = st.sampled_from([*["json"] * 8, "unicode", "bom", "duplicate", "literal", "truncated", "deep",
                             "bad-utf8", "utf16", "empty", "oversized"])


@st.composite
def valid_configs(draw):
    """A config.json its family accepts: heads consistent, sizes small or at lorabench's bounds."""
    model_type = draw(st.sampled_from(sorted(FAMILY_KEYS)))
    heads = draw(st.sampled_from(HEADS))
    head_dim = draw(st.sampled_from([1, 8, 64, 128]))
    if model_type == "gpt2":
        cfg = {"model_type": model_type, "n_embd": heads * head_dim, "n_head": heads, "n_layer": draw(LAYER_COUNTS),
               "n_positions": draw(st.integers(1, MAX_POSITIONS)), "vocab_size": draw(VOCABS)}
        if draw(st.booleans()):
            cfg["n_inner"] = draw(st.one_of(st.none(), st.integers(1, 1 << 16), st.just(MAX_MLP)))
        optional = ("tie_word_embeddings",)
    else:
        cfg = {"model_type": model_type, "hidden_size": heads * head_dim,
               "intermediate_size": draw(st.one_of(st.integers(1, 1 << 16), st.just(MAX_MLP))),
               "num_hidden_layers": draw(LAYER_COUNTS), "num_attention_heads": heads, "vocab_size": draw(VOCABS)}
        kv_default = KV_DEFAULTS.get(model_type, heads)
        if draw(st.booleans()) or kv_default > heads or heads % kv_default:
            kv_heads = st.sampled_from([k for k in HEADS if heads % k == 0])
            cfg["num_key_value_heads"] = draw(st.one_of(st.none(), kv_heads))
        if draw(st.booleans()):  # an explicit head_dim frees hidden_size from heads x head_dim
            cfg["head_dim"] = draw(st.one_of(st.none(), st.sampled_from([8, 64, 256])))
            if cfg["head_dim"] is not None:
                cfg["hidden_size"] = draw(st.one_of(st.integers(1, 8192), st.just(MAX_WIDTH)))
        optional = ("tie_word_embeddings", "attention_bias", "mlp_bias")
    for key in optional:
        if draw(st.booleans()):
            cfg[key] = draw(st.booleans())
    return cfg


@st.composite
def config_files(draw):
    """(bytes of a config.json, pristine): pristine when the file is a valid config written as strict JSON."""
    cfg = draw(valid_configs())
    family = FAMILY_KEYS[cfg["model_type"]]
    mutations = draw(st.sampled_from([0, 0, 0, 1, 1, 2, 3]))
    for _ in range(mutations):
        kind = draw(st.sampled_from(["set", "set", "drop", "add", "model_type"]))
        if kind == "set":
            cfg[draw(st.sampled_from(family))] = draw(JSON_VALUES)
        elif kind == "drop":
            cfg.pop(draw(st.sampled_from(sorted(cfg))), None)
        elif kind == "add":
            cfg[draw(UNKNOWN_KEYS)] = draw(JSON_VALUES)
        else:
            cfg["model_type"] = draw(MODEL_TYPES)
    top = cfg if draw(st.integers(0, 19)) else draw(JSON_VALUES)
    encoding = draw(ENCODINGS)
    text = json.dumps(top, ensure_ascii=encoding != "unicode")
    if encoding in ("duplicate", "literal") and isinstance(top, dict) and top:
        pairs = [(k, json.dumps(v)) for k, v in top.items()]
        i = draw(st.integers(0, len(pairs) - 1))
        if encoding == "duplicate":
            pairs.insert(draw(st.integers(0, len(pairs))), (pairs[i][0], json.dumps(draw(JSON_VALUES))))
        else:
            pairs[i] = (pairs[i][0], draw(ODD_LITERALS))
        text = "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in pairs) + "}"
    elif encoding == "truncated":
        text = text[:draw(st.integers(0, max(0, len(text) - 1)))]
    elif encoding == "deep":
        depth = draw(st.sampled_from([10, 63, 64, 65, 1000, 100_000]))
        nested = "[" * depth + "]" * depth
        text = text[:-1] + f', "nested": {nested}}}' if isinstance(top, dict) and top else nested
    data = text.encode("utf-8", "surrogatepass")
    if encoding == "bom":
        data = b"\xef\xbb\xbf" + data
    elif encoding == "bad-utf8":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82"])) + data[at:]
    elif encoding == "utf16":
        data = text.encode("utf-16", "surrogatepass")
    elif encoding == "empty":
        data = b""
    elif encoding == "oversized":
        data = data + b" " * MAX_CONFIG_BYTES
    pristine = mutations == 0 and top is cfg and encoding in STRICT_KINDS
    return data, pristine


# --------------------------------------------------------------------------------------------------
# Running the CLI and checking what it said.


@contextlib.contextmanager
def fresh_folder():
    """A new temporary folder as the working folder for the block (contextlib.chdir is Python 3.11+)."""
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            yield tmp
        finally:
            os.chdir(here)


def write_tiny_configs():
    for folder, cfg in TINY_CONFIGS.items():
        os.mkdir(folder)
        Path(folder, "config.json").write_text(json.dumps(cfg))


def invoke(args):
    result = CliRunner().invoke(cli, args)
    event(f"{args[0]}: exit {result.exit_code}")
    return result


def shown(args, result) -> str:
    command = "lorabench " + shlex.join(args)
    return (f"{command[:3000]}\nexit {result.exit_code}\nstdout: {result.stdout[-1000:]}\n"
            f"stderr: {result.stderr[-2000:]}")


def assert_ended_cleanly(args, result):
    """Exit 0, 1, 2 or 130, no traceback; exit 2 says why in one short line."""
    why = shown(args, result)
    assert result.exit_code in EXIT_CODES, why
    assert result.exception is None or isinstance(result.exception, SystemExit), why
    assert "Traceback (most recent call last)" not in result.stdout + result.stderr, why
    if result.exit_code == 2:
        # lines as a terminal shows them: str.splitlines would also split at \x1c-\x1e and \x85, which are not
        said = [line for line in re.split(r"\r\n|[\r\n]", result.stderr)
                if line.strip() and not line.startswith("lorabench: note:")]
        assert len(said) == 1 and said[0].startswith("lorabench: error:"), why
        assert len(said[0]) < MAX_ERROR_LINE, why


def _refuse(token):
    raise ValueError(f"{token} is not JSON")


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, which Python writes and other JSON readers reject."""
    return json.loads(text, parse_constant=_refuse)


def csv_rows(text: str):
    reader = csv.DictReader(io.StringIO(text))
    rows = list(reader)
    assert reader.fieldnames, text[:500]
    for row in rows:
        assert None not in row and None not in row.values(), row  # every row as wide as the header
    return rows


def output_format(args) -> str:
    """The format the CLI used: the last -f/--format, else table (click takes the last of a repeated option)."""
    fmt = "table"
    for i, arg in enumerate(args[:-1]):
        if arg in ("-f", "--format"):
            fmt = args[i + 1].lower()
    return fmt


def checked_output(args, result):
    """The rows on stdout of a run that exited 0 with -f json (None for other formats), csv parsed."""
    fmt = output_format(args)
    if result.exit_code != 0 or "-h" in args or "--version" in args:
        return None
    if fmt == "csv":
        csv_rows(result.stdout)
    if fmt != "json":
        return None
    rows = strict_json(result.stdout)
    assert isinstance(rows, list) and rows, result.stdout[:500]
    return rows


# --------------------------------------------------------------------------------------------------
# Invariants of the rows.


def is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_param_row(row):
    for key in COUNT_KEYS:
        assert is_count(row[key]), (key, row[key])
    assert row["trainable_params"] <= row["total_params"], row
    assert row["base_params"] + row["adapter_params"] == row["total_params"], row
    assert is_number(row["trainable_pct"]) and 0 <= row["trainable_pct"] <= 100, row
    # pct_of_full is trainable / base: above 100 when an adapter has more parameters than the matrices it
    # adapts (rank > d / 2 on a d x d matrix, e.g. params --d 8 --rank 8 says 200%), so no upper bound here.
    assert is_number(row["pct_of_full"]) and row["pct_of_full"] >= 0, row
    assert math.isclose(row["pct_of_full"], 100 * row["trainable_params"] / row["base_params"]), row


def check_memory_row(row):
    for key, value in row.items():
        if key.endswith("_bytes") and key != "spare_bytes":  # spare is negative when it does not fit
            assert value is None or is_count(value), (key, value)
    assert row["trainable_params"] <= row["total_params"], row
    peaks = {phase: row[f"{phase}_peak_bytes"] for phase in PHASES}
    assert row["peak_bytes"] == max(peaks.values()) == peaks[row["peak_phase"]], row
    assert row["peak_bytes"] >= row["weights_bytes"], row
    assert row["device_bytes"] == row["peak_bytes"] + row["overhead_bytes"], row
    assert is_count(row["step_flops"]), row
    if "fits" not in row:
        return
    assert row["allowance_bytes"] == int(row["allowance_fraction"] * row["peak_bytes"]), row
    assert row["spare_bytes"] == row["gpu_memory_bytes"] - row["device_bytes"] - row["allowance_bytes"], row
    assert row["fits"] is (row["spare_bytes"] >= 0), row
    if row["fits"]:
        assert row["gpus_needed"] == 1 and row["per_gpu_bytes"] == row["device_bytes"], row
    elif row["gpus_needed"] is None:
        assert row["per_gpu_bytes"] is None, row
    else:
        assert is_count(row["gpus_needed"]) and row["gpus_needed"] >= 2, row
        assert row["per_gpu_bytes"] <= row["gpu_memory_bytes"], row
    assert is_number(row["step_ms"]) and row["step_ms"] > 0, row
    assert is_number(row["tokens_per_s"]) and row["tokens_per_s"] > 0, row


# Sizes that are 0 when a model lacks the feature (learned positions, sliding windows, experts).
MAY_BE_ZERO = ("max_positions", "sliding_window", "sliding_pattern", "num_experts", "experts_per_token",
               "expert_intermediate_size", "query_pre_attn_scalar")


def check_spec(spec: ModelSpec):
    """Every size of a loaded spec is a positive int (0 where the feature is absent), flags are bools,
    soft-caps finite and >= 0."""
    for f in fields(ModelSpec):
        value = getattr(spec, f.name)
        if f.type in ("int", int):
            assert isinstance(value, int) and not isinstance(value, bool), (f.name, value)
            assert value >= 0 if f.name in MAY_BE_ZERO else value > 0, (f.name, value)
        elif f.type in ("bool", bool):
            assert isinstance(value, bool), (f.name, value)
        elif f.type in ("float", float):
            assert isinstance(value, float) and math.isfinite(value) and value >= 0, (f.name, value)


# --------------------------------------------------------------------------------------------------
# The properties.


@given(args=command_lines(PARAMS_OPTIONS))
def test_params_command_lines_end_cleanly_and_counts_hold(args):
    args = ["params"] + args
    result = invoke(args)
    assert_ended_cleanly(args, result)
    for row in checked_output(args, result) or ():
        check_param_row(row)


@given(args=command_lines(MEMORY_OPTIONS))
def test_memory_command_lines_end_cleanly_and_bytes_hold(args):
    args = ["memory"] + args
    result = invoke(args)
    assert_ended_cleanly(args, result)
    for row in checked_output(args, result) or ():
        check_memory_row(row)


@scaled(1 / 20)
@given(args=command_lines(REPORT_OPTIONS, formats=False), out_dir=OUT_DIRS)
def test_report_writes_a_whole_folder_or_nothing(args, out_dir):
    with fresh_folder() as tmp:
        write_tiny_configs()
        out = Path(tmp, "out")  # made by the run, if at all
        args = ["report"] + args + ["--out-dir", str(out / out_dir)]
        result = invoke(args)
        assert_ended_cleanly(args, result)
        if result.exit_code == 2:
            assert not out.exists(), (sorted(out.rglob("*")), shown(args, result))
        if result.exit_code != 0 or "-h" in args or "--version" in args:
            return
        made = sorted((out / out_dir).iterdir())
        assert len(made) == 1 and made[0].is_dir(), (made, shown(args, result))
        assert {p.name for p in made[0].iterdir()} == set(FILES) | {MARKER}, shown(args, result)
        report = strict_json((made[0] / "results.json").read_text(encoding="utf-8"))
        for row in report["rows"]:
            check_param_row(row)
            check_memory_row(row)
        assert len(csv_rows((made[0] / "results.csv").read_text(encoding="utf-8"))) == len(report["rows"])


@scaled(1 / 50)
@given(model=BENCH_MODELS, args=command_lines(BENCH_OPTIONS, max_options=5))
def test_bench_on_the_cpu_ends_cleanly(model, args):
    with fresh_folder():
        write_tiny_configs()
        args = ["bench"] + model + BENCH_TINY + args + BENCH_FIXED
        result = invoke(args)
        assert_ended_cleanly(args, result)
        for row in checked_output(args, result) or ():
            assert row["status"] in ("ok", "skipped", "oom"), row
            check_memory_row(row)
        if result.exit_code == 0:
            for path in Path(".").glob("rows.*"):
                text = path.read_text(encoding="utf-8")
                if path.suffix == ".json":
                    strict_json(text)
                else:
                    csv_rows(text)


@given(case=config_files(), folder=st.booleans(), all_linear=st.booleans())
def test_random_config_json_through_the_cli(case, folder, all_linear):
    data, pristine = case
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "model").mkdir()
        Path(tmp, "model", "config.json").write_bytes(data)
        path = str(Path(tmp, "model") if folder else Path(tmp, "model", "config.json"))
        targets = ["--targets", "all-linear"] if all_linear else []
        for args, check in ((["params", "--config", path, "--rank", "1", *targets, "-f", "json"], check_param_row),
                            (["memory", "--config", path, "--rank", "1", "--method", "all", "--gpu", "H100-80GB",
                              *targets, "-f", "json"], check_memory_row)):
            result = invoke(args)
            assert_ended_cleanly(args, result)
            if pristine:  # rank 1 fits every matrix: a valid config must be accepted
                assert result.exit_code == 0, shown(args, result)
            for row in checked_output(args, result) or ():
                check(row)


@given(case=config_files(), folder=st.booleans())
def test_load_config_returns_a_valid_spec_or_one_line_error(case, folder):
    data, pristine = case
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "model").mkdir()
        Path(tmp, "model", "config.json").write_bytes(data)
        path = str(Path(tmp, "model") if folder else Path(tmp, "model", "config.json"))
        try:
            spec = load_config(path)
        except LorabenchError as exc:
            message = str(exc)
            note(message)
            assert not pristine, message
            assert "\n" not in message and "\r" not in message, message
            assert path in message, message
            parsed = _strict_parse(data)
            if isinstance(parsed, dict) and len(data) <= MAX_CONFIG_BYTES:  # a content error: which key
                assert any(f"'{key}'" in message for key in KNOWN_KEYS) or "model_type" in message, message
            return
        check_spec(spec)
        parsed = _strict_parse(data)
        assert isinstance(parsed, dict) and parsed.get("model_type") in FAMILY_KEYS, data[:300]


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key")
    return dict(pairs)


def _depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def _strict_parse(data: bytes):
    """The JSON in data, or None where lorabench may refuse it: not UTF-8, NaN, duplicate keys, 1e400, and
    (as hfconfig.MAX_DEPTH says) nesting deeper than any config.json has."""
    def finite(token):
        value = float(token)
        if not math.isfinite(value):
            raise ValueError(token)
        return value

    try:
        value = json.loads(data.decode("utf-8-sig"), parse_constant=_refuse, parse_float=finite,
                           object_pairs_hook=_no_duplicates)
        return value if _depth(value) <= MAX_DEPTH else None
    except (ValueError, RecursionError):
        return None
