"""lorabench.nn.model: exact parameter totals on meta, and outputs equal to Hugging Face's models."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from lorabench.errors import LorabenchError
from lorabench.estimator.params import count_base_params
from lorabench.models.presets import PRESETS
from lorabench.models.spec import from_dimension
from lorabench.nn.model import RMSNorm, attention, build_model, count_module_params

SEED = 1234
TINY = replace(PRESETS["tiny-llama"], hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
               num_kv_heads=2, head_dim=16, vocab_size=128)
TINY_GPT2 = replace(PRESETS["gpt2"], hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4,
                    num_kv_heads=4, head_dim=16, vocab_size=128, max_positions=32)
# Parameters of TINY written out: embed + head + 2 x (q, k, v, o, gate, up, down + 2 norms) + final norm.
TINY_PARAMS = 128 * 64 * 2 + 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 96 + 2 * 64) + 64


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(SEED)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_full_size_meta_model_has_exact_param_total(name):
    model = build_model(PRESETS[name], device="meta")
    assert count_module_params(model) == (count_base_params(PRESETS[name]),) * 2


def test_tiny_total_written_out():
    assert TINY_PARAMS == 78144
    assert count_module_params(build_model(TINY))[1] == TINY_PARAMS


def test_projection_names_map_to_targets():
    llama = dict(build_model(TINY, device="meta").named_modules())
    for t in ("q", "k", "v", "o"):
        assert isinstance(llama[f"layers.1.attn.{t}"], torch.nn.Linear)
    for t in ("gate", "up", "down"):
        assert isinstance(llama[f"layers.1.mlp.{t}"], torch.nn.Linear)
    gpt2 = dict(build_model(TINY_GPT2, device="meta").named_modules())
    assert "layers.0.attn.qkv" in gpt2 and "layers.0.mlp.up" in gpt2
    assert "layers.0.attn.q" not in gpt2 and "layers.0.mlp.gate" not in gpt2


def test_tied_head_shares_the_embedding():
    model = build_model(PRESETS["gpt2"], device="meta")
    assert model.head.weight is model.embed.weight


def test_dtype_and_layers():
    model = build_model(PRESETS["tiny-llama"], dtype=torch.bfloat16, layers=1)
    assert len(model.layers) == 1
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = model(torch.randint(0, 4096, (2, 8)), labels=torch.randint(0, 4096, (2, 8)))
    assert out.logits.dtype == torch.bfloat16 and out.logits.shape == (2, 8, 4096)
    assert out.loss.dtype == torch.float32


def test_single_matrix_spec_is_not_a_model():
    with pytest.raises(LorabenchError):
        build_model(from_dimension(64))


def test_learned_positions_bound_sequence_length():
    model = build_model(TINY_GPT2)
    with pytest.raises(LorabenchError):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_rmsnorm_is_hf_llama_rmsnorm_bitwise():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(2, 5, 64).to(torch.bfloat16)
    ours, hf = RMSNorm(64, eps=1e-5, dtype=torch.bfloat16), LlamaRMSNorm(64, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        hf.weight.copy_(ours.weight)
    assert torch.equal(ours(x), hf(x))


def test_gqa_kernel_equals_repeated_heads():
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                              is_causal=True)
    torch.testing.assert_close(attention(q, k, v), expected, rtol=1e-5, atol=1e-6)


def test_loss_is_shifted_cross_entropy():
    model = build_model(TINY)
    ids = torch.randint(0, 128, (2, 7))
    out = model(ids, labels=ids)
    # Position t predicts token t + 1; the last position has no target.
    logp = out.logits.float().log_softmax(-1)
    expected = -logp[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)


def _llama_state(model):
    sd = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight,
          "lm_head.weight": model.head.weight}
    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    for i, block in enumerate(model.layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = block.attn_norm.weight
        sd[p + "post_attention_layernorm.weight"] = block.mlp_norm.weight
        for ours, hf in names.items():
            parent = block.attn if hf.startswith("self_attn") else block.mlp
            sd[p + hf + ".weight"] = getattr(parent, ours).weight
            if getattr(parent, ours).bias is not None:
                sd[p + hf + ".bias"] = getattr(parent, ours).bias
    return sd


@pytest.mark.parametrize("tied,bias", [(False, False), (True, True)])
def test_llama_matches_transformers(tied, bias):
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = replace(TINY, tie_embeddings=tied, qkv_bias=bias, o_bias=bias)
    ours = build_model(spec)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.1)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                      attention_bias=bias, tie_word_embeddings=tied)
    hf = LlamaForCausalLM(cfg).eval()
    missing, unexpected = hf.load_state_dict(_llama_state(ours), strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    ids = torch.randint(0, 128, (2, 12))
    out, ref = ours(ids, labels=ids), hf(ids, labels=ids)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)


def test_gpt2_matches_transformers():
    from transformers import GPT2Config, GPT2LMHeadModel

    ours = build_model(TINY_GPT2)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.1)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=32, layer_norm_epsilon=1e-5,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    hf = GPT2LMHeadModel(cfg).eval()
    sd = {"transformer.wte.weight": ours.embed.weight, "transformer.wpe.weight": ours.pos_embed.weight,
          "transformer.ln_f.weight": ours.norm.weight, "transformer.ln_f.bias": ours.norm.bias,
          "lm_head.weight": ours.head.weight}
    for i, block in enumerate(ours.layers):
        p = f"transformer.h.{i}."
        for hf_norm, norm in (("ln_1", block.attn_norm), ("ln_2", block.mlp_norm)):
            sd[p + hf_norm + ".weight"], sd[p + hf_norm + ".bias"] = norm.weight, norm.bias
        convs = {"attn.c_attn": block.attn.qkv, "attn.c_proj": block.attn.o,
                 "mlp.c_fc": block.mlp.up, "mlp.c_proj": block.mlp.down}
        for name, linear in convs.items():
            # HF's Conv1D stores the weight as [in, out].
            sd[p + name + ".weight"], sd[p + name + ".bias"] = linear.weight.t(), linear.bias
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and not [m for m in missing if "attn.bias" not in m and "masked_bias" not in m]
    ids = torch.randint(0, 128, (2, 12))
    out, ref = ours(ids, labels=ids), hf(ids, labels=ids)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
