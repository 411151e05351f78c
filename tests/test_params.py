"""Exact trainable/total counts: hand formulas and PEFT's get_nb_trainable_parameters() on meta models."""

import pytest

from hf_configs import HF_CONFIGS
from lorabench.errors import LorabenchError
from lorabench.methods import METHODS, resolve_methods
from lorabench.estimator.params import count_params, parse_targets
from lorabench.models.presets import PRESETS
from lorabench.models.spec import from_dimension

LLAMA3_8B = PRESETS["llama-3-8b"]


def test_seed_worked_example_d4096_r8():
    c = count_params(from_dimension(4096), METHODS["lora"], 8)
    assert c.base_params == 4096 * 4096 == 16_777_216
    assert c.trainable_params == 8 * 4096 + 4096 * 8 == 65_536
    assert c.reduction == 256.0  # the seed rounds this to "250x"


def test_llama3_8b_lora_q_v_r8():
    # q: 4096 -> 4096, v: 4096 -> 1024 (8 kv heads x 128); r (in + out) each, 32 layers
    expected = 32 * (8 * (4096 + 4096) + 8 * (4096 + 1024))
    assert expected == 3_407_872
    c = count_params(LLAMA3_8B, METHODS["lora"], 8, "q,v")
    assert c.trainable_params == expected
    assert c.total_params == 8_030_261_248 + expected


def test_llama3_8b_vera_q_v_r256():
    # lambda_d (r) and lambda_b (out) per adapted layer
    expected = 32 * ((256 + 4096) + (256 + 1024))
    assert expected == 180_224
    c = count_params(LLAMA3_8B, METHODS["vera"], 256, "q,v")
    assert c.trainable_params == expected
    # shared A (r x max in) and B (max out x r) are buffers: in no parameter count
    assert c.total_params == 8_030_261_248 + expected
    assert c.shared_buffer_numel == 256 * 4096 + 4096 * 256


def test_lora_fa_is_lora_less_a():
    lora = count_params(LLAMA3_8B, METHODS["lora"], 16, "all-linear")
    fa = count_params(LLAMA3_8B, METHODS["lora-fa"], 16, "all-linear")
    a_params = 32 * 16 * (4096 * 4 + 4096 * 2 + 14336)  # A is r x in: q,k,v,gate,up take d, o d, down 14336
    assert fa.trainable_params == lora.trainable_params - a_params
    assert fa.total_params == lora.total_params  # A is still a parameter, frozen


def test_dora_adds_one_magnitude_per_output():
    lora = count_params(LLAMA3_8B, METHODS["lora"], 8, "q,v")
    dora = count_params(LLAMA3_8B, METHODS["dora"], 8, "q,v")
    assert dora.trainable_params - lora.trainable_params == 32 * (4096 + 1024)


def test_delta_lora_and_lora_plus_train_like_lora_but_delta_writes_w():
    lora = count_params(LLAMA3_8B, METHODS["lora"], 8)
    for name in ("delta-lora", "lora-plus"):
        c = count_params(LLAMA3_8B, METHODS[name], 8)
        assert c.trainable_params == lora.trainable_params
    assert count_params(LLAMA3_8B, METHODS["delta-lora"], 8).updates_base_weights
    assert not lora.updates_base_weights


def test_full_trains_everything():
    c = count_params(LLAMA3_8B, METHODS["full"])
    assert c.trainable_params == c.total_params == 8_030_261_248
    assert c.trainable_pct == 100.0


def test_targets_and_rank_errors():
    assert parse_targets(LLAMA3_8B, None) == ("q", "v")
    assert parse_targets(PRESETS["gpt2"], None) == ("qkv",)
    assert parse_targets(LLAMA3_8B, "all-linear") == ("q", "k", "v", "o", "gate", "up", "down")
    with pytest.raises(LorabenchError, match="use qkv"):
        parse_targets(PRESETS["gpt2"], "q,v")
    with pytest.raises(LorabenchError, match="unknown target"):
        parse_targets(LLAMA3_8B, "q,attn")
    with pytest.raises(LorabenchError, match="positive"):
        count_params(LLAMA3_8B, METHODS["lora"], 0)
    with pytest.raises(LorabenchError, match="larger than target 'v'"):
        count_params(LLAMA3_8B, METHODS["lora"], 2048, "q,v")  # v is 1024 x 4096
    with pytest.raises(LorabenchError, match="Did you mean"):
        resolve_methods(["lora-pls"])
    assert [m.name for m in resolve_methods(["all"])] == list(METHODS)


# ---------------------------------------------------------------------------------------------
# PEFT's own counts, on transformers models built on the meta device.

PEFT_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
              "up": "up_proj", "down": "down_proj", "qkv": "c_attn"}


def _peft_counts(model_name, method, rank, targets):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lorabench.measure.builders import expected_library_warnings

    cfg = transformers.AutoConfig.for_model(**HF_CONFIGS[model_name])
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    modules = "all-linear" if targets == "all-linear" else [PEFT_NAMES[t] for t in targets.split(",")]
    if method == "vera":
        config = peft.VeraConfig(r=rank, target_modules=modules)
    else:
        config = peft.LoraConfig(r=rank, target_modules=modules, use_dora=method == "dora")
    with expected_library_warnings():  # PEFT 0.21 on transformers 5.25, GPT-2's Conv1D
        model = peft.get_peft_model(model, config)
    if method == "lora-fa":  # LoRA-FA as PEFT users run it: LoRA with lora_A frozen
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
    return model.get_nb_trainable_parameters()


CASES = [
    ("llama-3-8b", "lora", 8, "q,v"),
    ("llama-3-8b", "lora", 64, "all-linear"),
    ("llama-3-8b", "dora", 16, "q,k,v,o"),
    ("llama-3-8b", "vera", 256, "q,v"),
    ("llama-3-8b", "lora-fa", 8, "all-linear"),
    ("llama-3.2-1b", "lora", 32, "gate,up,down"),
    ("llama-3.2-1b", "dora", 8, "all-linear"),
    ("llama-3.2-1b", "vera", 128, "all-linear"),
    ("qwen2.5-0.5b", "lora", 8, "all-linear"),
    ("qwen2.5-0.5b", "vera", 64, "q,k,v"),
    ("mistral-7b", "lora", 4, "q,k,v,o"),
    ("gpt2", "lora", 8, "qkv"),
    ("gpt2", "dora", 8, "all-linear"),
    ("gpt2", "vera", 256, "all-linear"),
]


@pytest.mark.parametrize("model_name, method, rank, targets", CASES)
def test_counts_equal_peft(model_name, method, rank, targets):
    trainable, total = _peft_counts(model_name, method, rank, targets)
    c = count_params(PRESETS[model_name], METHODS[method], rank, targets)
    assert (c.trainable_params, c.total_params) == (trainable, total)
