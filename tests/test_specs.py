"""Presets and config.json parsing, checked against published totals and transformers models."""

import dataclasses
import json

import pytest

from hf_configs import HF_CONFIGS, PUBLISHED_TOTALS
from lorabench.errors import LorabenchError
from lorabench.estimator.params import count_base_params
from lorabench.models.hfconfig import from_hf_config, load_config
from lorabench.models.presets import PRESETS, from_name
from lorabench.models.spec import from_dimension


@pytest.mark.parametrize("name", sorted(PUBLISHED_TOTALS))
def test_preset_total_equals_published_count(name):
    assert count_base_params(PRESETS[name]) == PUBLISHED_TOTALS[name]


def test_llama_3_8b_total_by_hand():
    d, inter, layers, vocab, kv = 4096, 14336, 32, 128256, 8 * 128
    attn = d * d + 2 * d * kv + d * d          # q, k, v, o
    mlp = 3 * d * inter                        # gate, up, down
    per_layer = attn + mlp + 2 * d             # two RMSNorm weights
    total = 2 * vocab * d + layers * per_layer + d
    assert total == 8_030_261_248
    assert count_base_params(from_name("llama-3-8b")) == total


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_config_json_gives_the_preset(name, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(HF_CONFIGS[name]))
    spec = load_config(str(tmp_path))  # a folder holding config.json
    preset = PRESETS[name]
    if name in PUBLISHED_TOTALS:  # (vision-language checkpoints: tests/test_families.py)
        assert count_base_params(spec) == PUBLISHED_TOTALS[name]
    for field in dataclasses.fields(preset):
        if field.name not in ("name", "notes"):
            assert getattr(spec, field.name) == getattr(preset, field.name), field.name


def _hf_model_params(cfg_dict):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.AutoConfig.for_model(**cfg_dict)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    return model.num_parameters()


@pytest.mark.parametrize("name", ["llama-3-8b", "llama-3.2-1b", "llama-3.2-3b", "mistral-7b",
                                  "qwen2.5-0.5b", "qwen2.5-7b", "gpt2", "llama-2-7b", "mistral-nemo-12b",
                                  "qwen3-8b", "qwen3-30b-a3b", "qwen1.5-moe-a2.7b", "gemma-2-2b", "gemma-2-9b",
                                  "gemma-3-1b", "phi-3-mini", "phi-4", "olmo-2-7b", "mixtral-8x7b"])
def test_preset_equals_transformers_model_on_meta(name):
    assert _hf_model_params(HF_CONFIGS[name]) == count_base_params(PRESETS[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-3-70b", "qwen2.5-72b", "llama-2-70b", "llama-2-13b"])
def test_large_preset_equals_transformers_model_on_meta(name):
    assert _hf_model_params(HF_CONFIGS[name]) == count_base_params(PRESETS[name])


def test_llama_biases_from_config():
    cfg = dict(HF_CONFIGS["llama-3.2-1b"], attention_bias=True, mlp_bias=True)
    spec = from_hf_config(cfg)
    base = count_base_params(PRESETS["llama-3.2-1b"])
    # q (2048) + k (512) + v (512) + o (2048) biases and gate, up (8192 each), down (2048), per layer
    assert count_base_params(spec) - base == 16 * (2048 + 512 + 512 + 2048 + 8192 + 8192 + 2048)
    assert _hf_model_params(cfg) == count_base_params(spec)


def test_single_matrix():
    assert count_base_params(from_dimension(4096)) == 4096 * 4096 == 16_777_216
    assert count_base_params(from_dimension(4096, layers=32)) == 32 * 16_777_216


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"model_type": "bert", "hidden_size": 768}', "not supported"),
    ('{"model_type": "gpt2", "n_embd": 768, "hidden_size": 1024}', "'n_embd' 768 and 'hidden_size' 1024 disagree"),
    ('{"model_type": "llama", "hidden_size": 4096, "intermediate_size": 1, "num_hidden_layers": 2, '
     '"num_attention_heads": 32, "num_key_value_heads": 5, "vocab_size": 10}', "multiple"),
    ('[1, 2]', "JSON object"),
])
def test_bad_config_is_a_user_error(tmp_path, content, message):
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(LorabenchError, match=message):
        load_config(str(path))


def test_missing_config_and_unknown_model():
    with pytest.raises(LorabenchError, match="no config.json"):
        load_config("/nonexistent/dir/config.json")
    with pytest.raises(LorabenchError, match="Did you mean llama-3-8b"):
        from_name("llama3-8b")
