"""config.json validation (lorabench.models.hfconfig): every refusal is one line naming the file and the key, and
what real configs carry (nulls, BOMs, extra keys, pipes) is accepted."""

import json
import os
import threading

import pytest

from hf_configs import HF_CONFIGS, PUBLISHED_TOTALS
from lorabench.errors import LorabenchError
from lorabench.models.hfconfig import MAX_CONFIG_BYTES, MAX_DEPTH, load_config
from lorabench.estimator.params import count_base_params

LLAMA = HF_CONFIGS["llama-3-8b"]
GPT2 = HF_CONFIGS["gpt2"]


def refusal(tmp_path, text, name="config.json"):
    path = tmp_path / name
    path.write_text(text) if isinstance(text, str) else path.write_bytes(text)
    with pytest.raises(LorabenchError) as info:
        load_config(str(path))
    message = str(info.value)
    assert "\n" not in message and str(path) in message and len(message) < 300, message
    return message


@pytest.mark.parametrize("key, value, message", [
    ("hidden_size", -4096, "'hidden_size' must be an integer from 1 to 1,048,576, got -4096"),
    ("hidden_size", 0, "'hidden_size' must be an integer from 1"),
    ("hidden_size", 4096.5, "'hidden_size' must be a positive integer, got 4096.5 (a fraction)"),
    ("hidden_size", 4096.0, "got 4096.0 (a float; write 4096)"),  # sizes are integers in every real config
    ("hidden_size", "4096", "'hidden_size' must be a positive integer, got '4096' (not an integer)"),
    ("hidden_size", True, "'hidden_size' must be a positive integer, got true"),
    ("hidden_size", [4096], "'hidden_size' must be a positive integer"),
    ("hidden_size", 10 ** 30, "'hidden_size' must be an integer from 1 to 1,048,576"),
    ("head_dim", "abc", "'head_dim' must be a positive integer, got 'abc'"),
    ("head_dim", -128, "'head_dim' must be an integer from 1"),
    ("num_key_value_heads", -8, "'num_key_value_heads' must be an integer from 1"),
    ("num_key_value_heads", 5, "'num_attention_heads' 32 is not a multiple of 'num_key_value_heads' 5"),
    ("num_key_value_heads", 64, "not a multiple of 'num_key_value_heads' 64"),
    ("num_hidden_layers", 10 ** 6, "'num_hidden_layers' must be an integer from 1 to 10,000"),
    ("vocab_size", None, "'vocab_size' must be a positive integer, got null"),
    ("tie_word_embeddings", "false", "'tie_word_embeddings' must be true or false (a JSON boolean), got 'false'"),
    ("tie_word_embeddings", 0, "'tie_word_embeddings' must be true or false"),
    ("attention_bias", "yes", "'attention_bias' must be true or false"),
    ("model_type", "bert", "model_type 'bert' is not supported (supported: llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3, "
     "olmo2, mixtral, qwen2_moe, qwen3_moe, gpt2)"),
    ("model_type", 7, "model_type 7 is not supported"),
])
def test_bad_llama_values_name_file_and_key(tmp_path, key, value, message):
    assert message in refusal(tmp_path, json.dumps({**LLAMA, key: value}))


@pytest.mark.parametrize("key, value, message", [
    ("n_inner", -5, "'n_inner' must be an integer from 1 to 4,194,304, got -5"),
    ("n_inner", 3072.5, "'n_inner' must be a positive integer, got 3072.5"),
    ("n_head", 7, "'n_embd' 768 is not divisible by 'n_head' 7"),
    ("n_positions", "1024", "'n_positions' must be a positive integer"),
    ("tie_word_embeddings", "true", "must be true or false"),
])
def test_bad_gpt2_values_name_file_and_key(tmp_path, key, value, message):
    assert message in refusal(tmp_path, json.dumps({**GPT2, key: value}))


def test_absent_keys_take_transformers_defaults(tmp_path):
    """As transformers reads it: LlamaConfig's intermediate_size is 11008 (every family's defaults:
    tests/test_hfconfig_roundtrip.py). Only model_type is needed."""
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in LLAMA.items() if k != "intermediate_size"}))
    assert load_config(str(tmp_path)).intermediate_size == 11008
    assert "'model_type' is missing" in refusal(tmp_path, json.dumps({"hidden_size": 4096}))


@pytest.mark.parametrize("text, message", [
    ('{"model_type": "llama", "hidden_size": NaN}', "NaN: JSON has no NaN or Infinity"),
    ('{"model_type": "llama", "hidden_size": Infinity}', "Infinity: JSON has no NaN or Infinity"),
    ('{"model_type": "llama", "hidden_size": -Infinity}', "JSON has no NaN or Infinity"),
    ('{"model_type": "llama", "rope_theta": 1e400}', "overflows a float"),
    ('{"model_type": "llama", "hidden_size": 4096, "hidden_size": 8}', "key 'hidden_size' appears twice"),
    ('{"model_type": "llama", "hidden_size": ' + "9" * 5000 + "}", "not valid JSON"),
    ("[" * 200_000, f"nested more than {MAX_DEPTH} levels deep"),
    ('{"a": ' * 100 + "1" + "}" * 100, f"nested more than {MAX_DEPTH} levels deep"),
    ("{not json", "not valid JSON (Expecting property name"),
    ("", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ("null", "expected a JSON object, got null"),
    (b"\xff\xfe{}", "is not UTF-8 text"),
])
def test_bad_json_is_one_line(tmp_path, text, message):
    assert message in refusal(tmp_path, text)


def test_brackets_inside_strings_do_not_count_as_nesting(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA, "note": "[" * 1000, "esc": '\\"[[[' * 50}))
    assert count_base_params(load_config(str(tmp_path))) == PUBLISHED_TOTALS["llama-3-8b"]


def test_size_cap_is_checked_before_reading(tmp_path):
    path = tmp_path / "config.json"
    with open(path, "wb") as fh:
        fh.truncate(MAX_CONFIG_BYTES + 1)  # sparse: nothing to parse, only the size
    with pytest.raises(LorabenchError, match="a config.json is at most"):
        load_config(str(path))


def test_devices_are_refused_and_pipes_read(tmp_path):
    with pytest.raises(LorabenchError, match="'/dev/zero' is not a regular file"):
        load_config("/dev/zero")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text(json.dumps(LLAMA)))
    writer.start()
    spec = load_config(str(fifo))  # as `--config <(curl ...)` gives it
    writer.join()
    assert count_base_params(spec) == PUBLISHED_TOTALS["llama-3-8b"]


def test_what_real_configs_carry_is_accepted(tmp_path):
    """transformers writes nulls for defaults, a BOM may lead, and configs carry many keys we do not read."""
    cfg = {**LLAMA, "head_dim": None, "num_key_value_heads": 8, "rope_scaling": {"factor": 8.0, "rope_type": "llama3"},
           "torch_dtype": "bfloat16", "architectures": ["LlamaForCausalLM"], "rms_norm_eps": 1e-05}
    (tmp_path / "config.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(cfg).encode())
    spec = load_config(str(tmp_path))
    assert count_base_params(spec) == PUBLISHED_TOTALS["llama-3-8b"] and spec.head_dim == 128
    assert load_config(str(tmp_path / "config.json")).name == tmp_path.name
    gpt2 = {**GPT2, "n_inner": None}  # GPT-2's own config says n_inner: null (4 x n_embd)
    (tmp_path / "config.json").write_text(json.dumps(gpt2))
    assert count_base_params(load_config(str(tmp_path))) == PUBLISHED_TOTALS["gpt2"]


def test_missing_file_and_empty_path(tmp_path):
    with pytest.raises(LorabenchError, match="no config.json at"):
        load_config(str(tmp_path))  # a folder without one
    with pytest.raises(LorabenchError, match="--config is empty"):
        load_config("")
