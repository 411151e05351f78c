"""config.json as transformers writes and reads it (issue 21, finding 11): lorabench.models.hfconfig's table of keys,
spellings and defaults held to transformers' config classes, and every family round-tripped through
save_pretrained, with the parameter count of the transformers model built on the meta device from the saved
file as the independent check."""

import dataclasses
import json

import pytest

from lorabench.errors import LorabenchError
from lorabench.models.families import FAMILIES, MULTIMODAL
from lorabench.models.hfconfig import from_hf_config, load_config
from lorabench.models.hfwrite import hf_config_dict
from lorabench.estimator.params import count_base_params
from lorabench.models.presets import PRESETS

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

MODEL_TYPES = sorted(FAMILIES) + sorted(MULTIMODAL)
# A small SigLIP tower: the vision side of a Gemma 3 checkpoint, which lorabench does not count.
VISION = {"model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 1,
          "num_attention_heads": 2, "image_size": 28, "patch_size": 14}
VISION_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.")


def config_class(model_type):
    return transformers.CONFIG_MAPPING[model_type]


def language_params(hf_config) -> int:
    """Parameters of the transformers model for hf_config, built on the meta device, less a vision tower."""
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config) if not hasattr(hf_config, "text_config") \
            else transformers.Gemma3ForConditionalGeneration(hf_config)
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith(VISION_PREFIXES))


def same_model(spec):
    """What a config.json says about the model: the spec less its name and notes."""
    return dataclasses.replace(spec, name="", notes=())


def saved(tmp_path, hf_config):
    """The config.json transformers' save_pretrained writes for hf_config, as a dict."""
    hf_config.save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


def write(tmp_path, cfg):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return load_config(str(tmp_path))


def table_keys(model_type):
    """The keys lorabench reads for model_type (a vision-language model's: those at its top level)."""
    return MULTIMODAL[model_type].top if model_type in MULTIMODAL else FAMILIES[model_type].keys


# --------------------------------------------------------------------------------------------------
# The table against transformers' classes: fails when transformers adds or changes a spelling or a default.


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_spellings_are_transformers_attribute_map(model_type):
    cls = config_class(model_type)
    for key in table_keys(model_type):
        spellings = {key.name, *key.aliases}
        linked = {a for a, t in cls.attribute_map.items() if t in spellings} | \
                 {t for a, t in cls.attribute_map.items() if a in spellings}
        assert spellings | linked == spellings, (model_type, key.name, cls.attribute_map)
        for alias in key.aliases:  # each alias is an attribute_map entry, in one direction or the other
            assert cls.attribute_map.get(alias) == key.name or cls.attribute_map.get(key.name) == alias


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_defaults_are_transformers_class_defaults(model_type):
    """A key that is a field of the class has the field's default; one that is not (Qwen2's head_dim, which
    the model takes as hidden_size / heads when absent; Gemma 3's older sliding_window_pattern) has none."""
    cls = config_class(model_type)
    for key in table_keys(model_type):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        field = next((fields[n] for n in (key.name, *key.aliases) if n in fields), None)
        if field is None:
            assert key.default is None and not hasattr(cls(), key.name), (model_type, key.name)
        else:
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            assert key.default == default, (model_type, key.name, key.default, default)


def spec_against_config(spec, c):
    """Every field of spec against the attributes of transformers' config object c (as its model reads them)."""
    c = c.get_text_config() if hasattr(c, "text_config") else c
    heads = c.num_attention_heads
    dense = {"gpt2": lambda: c.n_inner or 4 * c.hidden_size, "mixtral": lambda: 0, "qwen3_moe": lambda: 0,
             "qwen2_moe": lambda: c.shared_expert_intermediate_size}.get(spec.family, lambda: c.intermediate_size)
    assert (spec.hidden_size, spec.intermediate_size, spec.num_layers, spec.num_heads, spec.num_kv_heads,
            spec.head_dim, spec.vocab_size) == (
        c.hidden_size, dense(), c.num_hidden_layers, heads, getattr(c, "num_key_value_heads", heads),
        getattr(c, "head_dim", None) or c.hidden_size // heads, c.vocab_size)
    if spec.moe:
        assert (spec.num_experts, spec.experts_per_token, spec.expert_intermediate_size) == (
            c.num_experts, c.num_experts_per_tok, getattr(c, "moe_intermediate_size", c.intermediate_size))
    if spec.family.startswith("gemma"):
        assert (spec.query_pre_attn_scalar, spec.attn_softcap, spec.final_softcap, spec.sliding_window) == (
            c.query_pre_attn_scalar, c.attn_logit_softcapping or 0.0, c.final_logit_softcapping or 0.0,
            c.sliding_window or 0)
        assert spec.sliding_layers() == (c.layer_types.count("sliding_attention") if c.sliding_window else 0)
    if spec.family == "gpt2":
        assert spec.max_positions == c.max_position_embeddings


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_a_bare_config_reads_as_transformers_defaults(model_type, tmp_path):
    """transformers requires no key but model_type: every other one has its class's default."""
    spec = write(tmp_path, {"model_type": model_type})
    theirs = config_class(model_type)()
    spec_against_config(spec, theirs)
    assert spec.tie_embeddings == theirs.tie_word_embeddings  # a vision-language model's: its top level's
    assert count_base_params(spec) == language_params(theirs)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_each_key_left_out_of_a_saved_config_reads_as_its_default(model_type, tmp_path):
    """save_pretrained of the class's defaults, less any one key lorabench reads: still the same model."""
    full = saved(tmp_path, config_class(model_type)())
    whole = same_model(write(tmp_path, full))
    text_keys = {k.name for k in FAMILIES[MULTIMODAL[model_type].text].keys} if model_type in MULTIMODAL else ()
    for key in table_keys(model_type):
        for name in (key.name, *key.aliases):
            if name in full:
                assert same_model(write(tmp_path, {k: v for k, v in full.items() if k != name})) == whole, name
    for name in text_keys:  # and of a vision-language model's text_config
        if name in full["text_config"]:
            text = {k: v for k, v in full["text_config"].items() if k != name}
            assert same_model(write(tmp_path, {**full, "text_config": text})) == whole, name


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_spelling_reads_as_transformers_reads_it(model_type, tmp_path):
    """Each alias written in place of the spelling save_pretrained used: the same value for lorabench and for
    transformers (gpt2's hidden_size for n_embd, Mixtral's num_experts for num_local_experts)."""
    cls = config_class(model_type)
    cfg = hf_config_dict(DISTINCT[model_type])
    full = saved(tmp_path, cls(**{k: v for k, v in cfg.items() if k != "model_type"}))
    whole = same_model(write(tmp_path, full))
    for key in FAMILIES[model_type].keys:
        for name in (key.name, *key.aliases):
            if name not in full:
                continue
            for alias in {key.name, *key.aliases} - {name}:
                cfg = {alias if k == name else k: v for k, v in full.items()}
                assert same_model(write(tmp_path, cfg)) == whole, (name, alias)
                assert getattr(cls.from_pretrained(tmp_path), key.name) == full[name], (name, alias)


# --------------------------------------------------------------------------------------------------
# Round trips: lorabench's hf_config_dict -> transformers' class -> save_pretrained -> lorabench.


def _distinct(family):
    """A small model of family whose every size differs from the class's defaults, so a key read under a
    wrong spelling (and so defaulted) shows."""
    spec = next((s for s in PRESETS.values() if s.family == family), None) or from_hf_config(
        {"model_type": family}, name=family)  # a family with no preset: its class's defaults
    extra = dict(num_experts=6, experts_per_token=3, expert_intermediate_size=96) if spec.moe else {}
    if spec.sliding_window:
        extra.update(sliding_window=128, query_pre_attn_scalar=48)
    # 7 layers: Gemma 3's five sliding layers to one global show
    return dataclasses.replace(spec, name=f"{family} small", hidden_size=256, num_layers=7, num_heads=4,
                               num_kv_heads=4 if family == "gpt2" else 2, head_dim=64, vocab_size=1000,
                               intermediate_size=0 if spec.moe and not spec.intermediate_size else 512,
                               max_positions=512 if spec.max_positions else 0, **extra)


DISTINCT = {family: _distinct(family) for family in FAMILIES}


def _variants():
    """Presets (cut to 8 layers: Gemma 3's five sliding layers to one global still show), each family's
    distinct small model, and what no preset has: biases, GQA where the preset has none, every layer sliding,
    no soft-capping, a head_dim other than hidden / heads, tied experts, a narrow gpt2 MLP."""
    cases = {name: spec.with_layers(min(spec.num_layers, 8)) for name, spec in PRESETS.items()}
    cases.update({spec.name: spec for spec in DISTINCT.values()})
    r = dataclasses.replace
    cases.update({
        "llama with biases": r(cases["llama-3.2-1b"], qkv_bias=True, o_bias=True, mlp_bias=True),
        "qwen3 with attention bias": r(cases["qwen3-8b"], qkv_bias=True, o_bias=True, tie_embeddings=True),
        "olmo2 with attention bias and GQA": r(cases["olmo-2-7b"], qkv_bias=True, o_bias=True, num_kv_heads=8),
        "gemma3 every layer sliding": r(cases["gemma-3-1b"], sliding_pattern=1),
        "gemma2 no soft-capping, no window": r(cases["gemma-2-2b"], attn_softcap=0.0, final_softcap=0.0,
                                               sliding_window=0, sliding_pattern=0, tie_embeddings=False),
        "mistral tied": r(cases["mistral-7b"], tie_embeddings=True),
        "mixtral head_dim 256": r(cases["mixtral-8x7b"], head_dim=256),
        "qwen2_moe GQA, tied": r(cases["qwen1.5-moe-a2.7b"], num_kv_heads=4, tie_embeddings=True),
        "qwen3_moe tied, attention bias": r(cases["qwen3-30b-a3b"], tie_embeddings=True, qkv_bias=True,
                                            o_bias=True),
        "gpt2 narrow MLP, untied": r(cases["gpt2"], intermediate_size=1000, tie_embeddings=False),
    })
    return cases


VARIANTS = _variants()


def test_every_family_has_a_round_trip():
    assert {s.family for s in VARIANTS.values()} == set(FAMILIES)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_round_trip_through_save_pretrained(name, tmp_path):
    spec = VARIANTS[name]
    cfg = hf_config_dict(spec)
    hf = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    written = saved(tmp_path, hf)
    back = load_config(str(tmp_path))
    assert same_model(back) == same_model(spec), written
    reread = transformers.AutoConfig.from_pretrained(tmp_path)
    spec_against_config(back, reread)
    assert count_base_params(back) == language_params(reread) == count_base_params(spec)


@pytest.mark.parametrize("name, tied", [("gemma-3-4b", True), ("gemma-3-27b", True), ("gemma-3-4b", False)])
def test_vision_language_round_trip(name, tied, tmp_path):
    """A Gemma3Config saved with its language model's config as text_config: the language model reads back,
    its output head tied as the top level says."""
    spec = dataclasses.replace(VARIANTS[name], tie_embeddings=tied)
    text = hf_config_dict(spec)
    hf = transformers.Gemma3Config(text_config=text, vision_config=VISION, tie_word_embeddings=tied)
    saved(tmp_path, hf)
    back = load_config(str(tmp_path))
    assert same_model(back) == same_model(spec) and "vision tower" in back.notes[0]
    assert count_base_params(back) == language_params(transformers.AutoConfig.from_pretrained(tmp_path))


# --------------------------------------------------------------------------------------------------
# The finding, and what the spellings and defaults change.


@pytest.mark.parametrize("spec", [PRESETS["qwen3-30b-a3b"], DISTINCT["qwen3_moe"]], ids=lambda s: s.name)
def test_qwen3_moe_saved_by_transformers_is_read(spec, tmp_path):
    """Qwen3MoeConfig's attribute_map turns num_experts into num_local_experts, which save_pretrained writes:
    lorabench refused the file ("'num_experts' is missing"). (6 experts: not the class's default 128.)"""
    cfg = hf_config_dict(spec)
    written = saved(tmp_path, transformers.Qwen3MoeConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    assert written["num_local_experts"] == spec.num_experts and "num_experts" not in written
    back = load_config(str(tmp_path))
    assert same_model(back) == same_model(spec)
    assert count_base_params(back) == language_params(transformers.AutoConfig.from_pretrained(tmp_path))
    if spec.name == "qwen3-30b-a3b":
        assert count_base_params(back) == 30_532_122_624


@pytest.mark.parametrize("cfg, message", [
    ({"model_type": "qwen3_moe", "num_experts": 8, "num_local_experts": 4},
     "'num_experts' 8 and 'num_local_experts' 4 disagree; transformers reads both as one setting"),
    ({"model_type": "mixtral", "num_local_experts": 8, "num_experts": 16}, "'num_experts' 16 and "
     "'num_local_experts' 8 disagree"),
    ({"model_type": "gpt2", "n_embd": 768, "hidden_size": 1024}, "'n_embd' 768 and 'hidden_size' 1024 disagree"),
    ({"model_type": "gpt2", "n_layer": 12, "num_hidden_layers": 12.5}, "'num_hidden_layers' must be a positive "
     "integer, got 12.5"),
    ({"model_type": "gpt2", "hidden_size": 770}, "'hidden_size' 770 is not divisible by 'n_head' 12 (absent: "
     "transformers' default)"),
    ({"model_type": "mistral", "num_attention_heads": 4, "hidden_size": 256}, "'num_attention_heads' 4 is not a "
     "multiple of 'num_key_value_heads' 8 (absent: transformers' default)"),
    ({"model_type": "gemma3", "text_config": [1]}, "'text_config' must be an object"),
    ({"model_type": "qwen3_moe", "num_local_experts": 4}, "'num_experts_per_tok' 8 (absent: transformers' "
     "default) is more than 'num_local_experts' 4 (the experts per layer)"),
])
def test_spellings_that_disagree_or_do_not_fit_are_one_line(cfg, message):
    with pytest.raises(LorabenchError) as info:
        from_hf_config(cfg, where="config.json")
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_two_spellings_that_agree_are_read():
    both = from_hf_config({"model_type": "qwen3_moe", "num_experts": 64, "num_local_experts": 64})
    assert both.num_experts == 64
    gpt2 = from_hf_config({"model_type": "gpt2", "n_embd": 1024, "hidden_size": 1024, "num_attention_heads": 16})
    assert (gpt2.hidden_size, gpt2.num_heads, gpt2.head_dim) == (1024, 16, 64)


def test_vision_language_tying_is_the_top_levels(tmp_path):
    """transformers ties Gemma 3's output head by the top-level tie_word_embeddings, text_config's unread."""
    text = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 512, "tie_word_embeddings": True}
    cfg = {"model_type": "gemma3", "text_config": text, "vision_config": VISION, "tie_word_embeddings": False}
    spec = write(tmp_path, cfg)
    assert not spec.tie_embeddings
    assert count_base_params(spec) == language_params(transformers.AutoConfig.from_pretrained(tmp_path))
    untied_text = {**cfg, "text_config": {**text, "tie_word_embeddings": False}}
    del untied_text["tie_word_embeddings"]  # Gemma3Config's default: tied
    assert write(tmp_path, untied_text).tie_embeddings


def test_legacy_layer_type_reads_as_transformers_renames_it():
    types = ["sliding_attention", "attention"] * 2  # "attention": transformers 5 reads it as full_attention
    theirs = transformers.Gemma2Config(num_hidden_layers=4, layer_types=types)
    assert theirs.layer_types == ["sliding_attention", "full_attention"] * 2
    ours = from_hf_config({"model_type": "gemma2", "num_hidden_layers": 4, "layer_types": types})
    assert (ours.sliding_pattern, ours.sliding_layers()) == (2, 2)
