"""A model family is one row of lorabench.models.families.FAMILIES (issue 22).

A Llama-like family registered here, as a test would add a real one, is read from its config.json, counted,
estimated, built by lorabench.nn and written back without a line of lorabench changing. The counts are held to
Llama-3-8B's published total and PEFT's well-known LoRA count, and to transformers' model of the written
config. No module in lorabench/ compares a value with a family's name.
"""

import ast
import dataclasses
import json
import pathlib

import pytest

from hf_configs import HF_CONFIGS, PUBLISHED_TOTALS
from lorabench.estimator.case import Case
from lorabench.errors import LorabenchError
from lorabench.estimator.memory import estimate_memory
from lorabench.estimator.params import count_base_params, count_params
from lorabench.methods import METHODS
from lorabench.models.families import FAMILIES, MULTIMODAL
from lorabench.models.hfconfig import from_hf_config, load_config
from lorabench.models.hfwrite import hf_config_dict
from lorabench.models.presets import PRESETS

NEW = "llama_clone"
# PEFT's trainable count for Llama-3-8B, LoRA r=8 on q_proj and v_proj (its default targets for llama):
# 32 layers x 8 x ((4096 + 4096) + (4096 + 1024)).
LLAMA_3_8B_LORA_R8 = 3_407_872


@pytest.fixture
def new_family(monkeypatch):
    """A new model_type whose row is a copy of Llama's: the whole of what adding it takes."""
    row = dataclasses.replace(FAMILIES["llama"], arch=dataclasses.replace(FAMILIES["llama"].arch, label="Clone"))
    monkeypatch.setitem(FAMILIES, NEW, row)
    return row


def _write(tmp_path, cfg):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return load_config(str(tmp_path))


def test_a_new_family_is_read_and_counted_as_llama(new_family, tmp_path):
    spec = _write(tmp_path, {**HF_CONFIGS["llama-3-8b"], "model_type": NEW})
    llama = PRESETS["llama-3-8b"]
    assert spec.family == NEW and spec.arch.label == "Clone"
    assert dataclasses.replace(spec, name="", family="llama") == dataclasses.replace(llama, name="")
    assert count_base_params(spec) == count_base_params(llama) == PUBLISHED_TOTALS["llama-3-8b"] == 8_030_261_248
    lora = METHODS["lora"]
    assert count_params(spec, lora, 8).trainable_params == count_params(llama, lora, 8).trainable_params \
        == LLAMA_3_8B_LORA_R8
    assert count_params(spec, lora, 16, "all-linear") == count_params(llama, lora, 16, "all-linear")
    assert estimate_memory(Case(spec, lora, 16)) == estimate_memory(Case(llama, lora, 16))
    assert spec.peft_name("q") == "q_proj" and spec.default_targets == ("q", "v")


def test_a_new_family_reads_its_rows_defaults_and_refusals(new_family):
    bare = from_hf_config({"model_type": NEW})  # LlamaConfig's defaults, as the row says
    assert (bare.hidden_size, bare.intermediate_size, bare.num_layers, bare.num_kv_heads, bare.vocab_size) == (
        4096, 11008, 32, 32, 32000)
    biased = from_hf_config({"model_type": NEW, "attention_bias": True, "mlp_bias": True})
    assert (biased.qkv_bias, biased.o_bias, biased.mlp_bias) == (True, True, True)
    with pytest.raises(LorabenchError, match="'attention_bias' must be true or false"):
        from_hf_config({"model_type": NEW, "attention_bias": 1})
    with pytest.raises(LorabenchError, match="no q/k/v-only biases"):
        hf_config_dict(dataclasses.replace(bare, qkv_bias=True))


@pytest.mark.parametrize("extra", [{}, {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}])
def test_a_new_familys_config_json_round_trips(new_family, extra):
    cfg = {**HF_CONFIGS["llama-3.2-1b"], "model_type": NEW, **extra}
    spec = from_hf_config(cfg, name="clone")
    written = hf_config_dict(spec)
    assert written["model_type"] == NEW
    assert from_hf_config(written, name="clone") == spec
    assert {k: v for k, v in written.items() if k != "model_type"} == \
        {k: v for k, v in hf_config_dict(dataclasses.replace(spec, family="llama")).items() if k != "model_type"}


def test_transformers_builds_the_written_config_with_the_counted_parameters(new_family, tmp_path):
    """transformers' Llama registered under the new model_type: the model it builds from the config.json
    lorabench writes has the parameters lorabench counts, and its save_pretrained output reads back."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if NEW not in transformers.CONFIG_MAPPING:
        config = type("CloneConfig", (transformers.LlamaConfig,), {"model_type": NEW})
        model = type("CloneForCausalLM", (transformers.LlamaForCausalLM,), {"config_class": config})
        transformers.AutoConfig.register(NEW, config)
        transformers.AutoModelForCausalLM.register(config, model)
    spec = from_hf_config({"model_type": NEW, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 3,
                           "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 1000,
                           "attention_bias": True}, name="clone")
    cfg = hf_config_dict(spec)
    hf = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == NEW
    assert dataclasses.replace(load_config(str(tmp_path)), name="clone") == spec
    with torch.device("meta"):
        theirs = transformers.AutoModelForCausalLM.from_config(hf)
    # 3 x (q, k, v, o with biases: 256 x (256 + 64 + 64 + 256) + 256 + 64 + 64 + 256; MLP 3 x 256 x 688;
    # 2 norms of 256) + embeddings and head 2 x 1000 x 256 + final norm 256
    by_hand = 3 * (256 * 640 + 640 + 3 * 256 * 688 + 2 * 256) + 2 * 1000 * 256 + 256
    assert theirs.num_parameters() == count_base_params(spec) == by_hand == 2_592_384


def test_lorabench_nn_builds_a_new_family(new_family):
    pytest.importorskip("torch")
    from lorabench.nn import build_model
    spec = from_hf_config({**HF_CONFIGS["llama-3.2-1b"], "model_type": NEW, "hidden_size": 64,
                           "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                           "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128}, name="clone")
    model = build_model(spec, seed=0)
    assert sum(p.numel() for p in model.parameters()) == count_base_params(spec)


@pytest.mark.parametrize("name", ["llama-3-8b", "qwen3-8b", "olmo-2-7b", "gemma-2-2b", "gemma-3-1b",
                                  "qwen3-30b-a3b"])
def test_qkv_only_biases_are_refused_where_attention_bias_sets_all_four(name):
    """These families' config classes have one attention_bias for q, k, v and o (no qkv_bias field), so a spec
    with q/k/v biases and no o bias cannot be written (before issue 22 only Llama refused; the others wrote a
    config whose model had no biases at all)."""
    transformers = pytest.importorskip("transformers")
    fields = {f.name for f in dataclasses.fields(transformers.CONFIG_MAPPING[PRESETS[name].family])}
    assert "attention_bias" in fields and "qkv_bias" not in fields
    with pytest.raises(LorabenchError, match="has no q/k/v-only biases"):
        hf_config_dict(dataclasses.replace(PRESETS[name], qkv_bias=True, o_bias=False))


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "qwen1.5-moe-a2.7b"])
def test_qkv_only_biases_are_written_where_the_family_has_them(name):
    spec = PRESETS[name].with_layers(2)
    assert spec.qkv_bias and not spec.o_bias
    assert from_hf_config(hf_config_dict(spec), name=spec.name) == dataclasses.replace(spec, notes=())


def _family_name_comparisons(path: pathlib.Path, names):
    """Lines of path that compare something with a family's name (==, !=, in, not in, startswith)."""
    hits = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            items = [e for side in [node.left, *node.comparators]
                     for e in (side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side])]
            if any(isinstance(c, ast.Constant) and c.value in names for c in items):
                hits.append(f"{path}:{node.lineno}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "startswith":
            prefixes = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            if any(n.startswith(p) for p in prefixes for n in names if len(p) > 3):  # "gemma", "qwen"
                hits.append(f"{path}:{node.lineno}")
    return hits


def test_no_module_branches_on_a_family_name(tmp_path):
    root = pathlib.Path(__file__).resolve().parents[1] / "lorabench"
    names = set(FAMILIES) | set(MULTIMODAL)
    hits = [h for path in sorted(root.rglob("*.py")) for h in _family_name_comparisons(path, names)]
    assert hits == []
    # the check sees a branch (before issue 22, measure/builders.py had `spec.family == "gpt2"`)
    probe = tmp_path / "probe.py"
    probe.write_text('def f(spec):\n    return spec.family == "gpt2" or spec.model_type in ("qwen3", "olmo2")\n'
                     'def g(spec):\n    return spec.family.startswith("gemma") or spec.kind == "gemm"\n')
    assert len(_family_name_comparisons(probe, names)) == 3
