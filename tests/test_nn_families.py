"""lorabench.nn builds every family in lorabench.models.families.FAMILIES as transformers does: the same parameter total, logits,
loss and gradients as the transformers model of the same config with the same weights, and in bfloat16 the
same bits and the same tensors kept for backward."""

import re
from collections import Counter
from dataclasses import replace

import pytest
import torch

from lorabench.models.hfwrite import hf_config_dict
from lorabench.nn.model import build_model, count_module_params
from lorabench.nn.norms import RMSNorm
from lorabench.models.presets import PRESETS

transformers = pytest.importorskip("transformers")

SEED = 11
EPS = 1e-6
ROPE_THETA = 50000.0  # not 10000, so Gemma 3's global table differs from its local one
BATCH, SEQ, VOCAB = 2, 12, 128
# Every family cut to 64 wide, 2-3 layers, 4 query heads on 2 kv heads; head_dim 24 where the family sets it
# apart from d / heads. Windows of 4 < SEQ so the sliding masks are real, soft-caps small enough to bend.
SMALL = dict(hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
             vocab_size=VOCAB)
MOE = dict(num_experts=4, experts_per_token=2, expert_intermediate_size=32)
SPECS = {
    "qwen2": replace(PRESETS["qwen2.5-0.5b"], **SMALL),
    "qwen3": replace(PRESETS["qwen3-8b"], **{**SMALL, "head_dim": 24}),
    "mistral": replace(PRESETS["mistral-nemo-12b"], **{**SMALL, "head_dim": 24}),
    "gemma2": replace(PRESETS["gemma-2-2b"], **SMALL, sliding_window=4, query_pre_attn_scalar=24,
                      attn_softcap=1.5, final_softcap=3.0),
    "gemma3_text": replace(PRESETS["gemma-3-1b"], **{**SMALL, "num_layers": 3}, sliding_window=4,
                           sliding_pattern=2, query_pre_attn_scalar=24),
    "phi3": replace(PRESETS["phi-4"], **SMALL),
    "olmo2": replace(PRESETS["olmo-2-7b"], **SMALL),
    "mixtral": replace(PRESETS["mixtral-8x7b"], **{**SMALL, "intermediate_size": 0}, **MOE),
    "qwen2_moe": replace(PRESETS["qwen1.5-moe-a2.7b"], **SMALL, **{**MOE, "num_experts": 6}),
    "qwen3_moe": replace(PRESETS["qwen3-30b-a3b"], **{**SMALL, "intermediate_size": 0, "head_dim": 24},
                         **{**MOE, "num_experts": 8}),
}


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(SEED)


def hf_name(name, spec):
    """transformers' name for one of our parameters."""
    moe, pre = spec.moe, spec.arch.norm_layout == "pre"
    rules = [(r"^embed\.", "model.embed_tokens."), (r"^norm\.", "model.norm."), (r"^head\.", "lm_head."),
             (r"^layers\.", "model.layers."), (r"\.attn\.(q|k|v|o|qkv)\.", r".self_attn.\1_proj."),
             (r"\.attn\.(q_norm|k_norm)\.", r".self_attn.\1."), (r"\.attn_norm\.", ".input_layernorm."),
             (r"\.attn_post_norm\.", ".post_attention_layernorm."),
             (r"\.mlp_norm\.", ".post_attention_layernorm." if pre else ".pre_feedforward_layernorm."),
             (r"\.mlp_post_norm\.", ".post_feedforward_layernorm."),
             (r"\.mlp\.(gate|up|down|gate_up)\.", r".mlp.shared_expert.\1_proj." if moe else r".mlp.\1_proj."),
             (r"\.mlp\.shared_gate\.", ".mlp.shared_expert_gate."), (r"\.mlp\.router\.", ".mlp.gate.")]
    for pattern, repl in rules:
        name = re.sub(pattern, repl, name)
    return name


def hf_model(spec, dtype):
    cfg = {**hf_config_dict(spec), "rms_norm_eps": EPS, "rope_theta": ROPE_THETA}
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    kwargs = {"attn_implementation": spec.arch.attention, "dtype": dtype}
    if spec.moe:
        kwargs["experts_implementation"] = "grouped_mm"
    return transformers.AutoModelForCausalLM.from_config(config, **kwargs).train()


def paired_models(spec, dtype=torch.float32):
    """Our model with weights N(0, 0.1) (norms, routers and experts included) and transformers' with a copy."""
    ours = build_model(spec, dtype=dtype, eps=EPS, rope_theta=ROPE_THETA)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.1)
    hf = hf_model(spec, dtype)
    missing, unexpected = hf.load_state_dict({hf_name(n, spec): p for n, p in ours.named_parameters()},
                                             strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if spec.tie_embeddings else set())
    if spec.tie_embeddings:
        assert hf.lm_head.weight is hf.model.embed_tokens.weight
    return ours, hf


def forward_keeping(model, ids, skip, **kwargs):
    """The forward's output, and (bytes, dtype) of each storage autograd keeps for backward, weights aside."""
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            kept[storage.data_ptr()] = (storage.nbytes(), t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, labels=ids, **kwargs)
    return out, Counter(kept.values())


def assert_grads(ours, hf, spec, **tolerances):
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, hf_params[hf_name(name, spec)].grad, **tolerances,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("family", sorted(SPECS))
def test_family_matches_transformers(family):
    spec = SPECS[family]
    assert spec.family == family
    ours, hf = paired_models(spec)
    assert count_module_params(ours)[1] == hf.num_parameters()
    # Token 0 is transformers' padding_idx (its embedding row gets no gradient); ours has none.
    ids = torch.randint(1, VOCAB, (BATCH, SEQ))
    out, ref = ours(ids, labels=ids), hf(ids, labels=ids)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    out.loss.backward()
    ref.loss.backward()
    assert_grads(ours, hf, spec, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", sorted(SPECS))
def test_bf16_is_transformers_op_for_op(family):
    """In bfloat16 every rounding shows, so equal bits mean the same ops in the same dtypes; and autograd
    keeps the same tensors (what the memory estimator counts). transformers' KV cache is left off: it is
    its own term of the estimate, and lorabench.nn keeps none."""
    spec = SPECS[family]
    ours, hf = paired_models(spec, torch.bfloat16)
    weights = {p.untyped_storage().data_ptr() for p in [*ours.parameters(), *hf.parameters()]}
    ids = torch.randint(1, VOCAB, (BATCH, SEQ))
    out, ours_kept = forward_keeping(ours, ids, weights)
    ref, hf_kept = forward_keeping(hf, ids, weights, use_cache=False)
    assert ours_kept == hf_kept
    assert out.logits.dtype == torch.bfloat16 and torch.equal(out.logits, ref.logits)
    assert torch.equal(out.loss, ref.loss)
    out.loss.backward()
    ref.loss.backward()
    assert_grads(ours, hf, spec, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["gemma3_text", "qwen2_moe"])
def test_checkpointed_blocks_give_the_same_gradients(family):
    model = build_model(SPECS[family], eps=EPS, rope_theta=ROPE_THETA, seed=SEED)
    ids = torch.randint(1, VOCAB, (BATCH, SEQ))
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.grad_checkpointing = ckpt
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, rtol=0, atol=0)


def test_sliding_layers_see_only_their_window():
    spec = SPECS["gemma3_text"]
    model = build_model(spec, eps=EPS, seed=SEED)
    assert [layer.attn.kind for layer in model.layers] == ["sliding", "full", "sliding"]
    # Changing token 0 reaches the last position through the full layer, not through a sliding one.
    ids = torch.randint(1, VOCAB, (1, SEQ))
    other = ids.clone()
    other[0, 0] = 1 + ids[0, 0] % (VOCAB - 1)
    sliding_only = build_model(replace(spec, sliding_pattern=1), eps=EPS, seed=SEED)
    with torch.no_grad():
        assert not torch.equal(model(ids).logits[0, -1], model(other).logits[0, -1])
        assert torch.equal(sliding_only(ids).logits[0, -1], sliding_only(other).logits[0, -1])


@pytest.mark.parametrize("kind,hf_class", [("rmsnorm", "llama.modeling_llama.LlamaRMSNorm"),
                                           ("rmsnorm-fp32", "olmo2.modeling_olmo2.Olmo2RMSNorm"),
                                           ("rmsnorm-plus1", "gemma2.modeling_gemma2.Gemma2RMSNorm")])
def test_rmsnorm_kinds_are_transformers_bitwise_in_bf16(kind, hf_class):
    module, cls = hf_class.rsplit(".", 1)
    hf = getattr(__import__(f"transformers.models.{module}", fromlist=[cls]), cls)(64, eps=EPS).to(torch.bfloat16)
    ours = RMSNorm(64, eps=EPS, dtype=torch.bfloat16, kind=kind)
    assert torch.equal(ours.weight, hf.weight)  # ones, or zeros for Gemma's 1 + weight
    with torch.no_grad():
        ours.weight.uniform_(-0.5, 1.5)
        hf.weight.copy_(ours.weight)
    x = torch.randn(2, 5, 64).to(torch.bfloat16)
    assert torch.equal(ours(x), hf(x))


def test_embeddings_scaled_in_the_weight_dtype():
    spec = SPECS["gemma2"]
    model = build_model(replace(spec, hidden_size=3072, intermediate_size=64, num_layers=0, head_dim=768),
                        dtype=torch.bfloat16)
    # sqrt(3072) = 55.43 is 55.5 in bfloat16, as in transformers' Gemma.
    assert model.embed_scale.to(torch.bfloat16).item() == 55.5
    assert "embed_scale" not in model.state_dict()
