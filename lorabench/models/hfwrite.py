"""Writing a Hugging Face config.json for a spec (the inverse of lorabench.models.hfconfig), for
`lorabench bench --impl peft`, which builds the model with transformers' AutoModelForCausalLM.

What a family writes beyond its sizes is data in its row (lorabench.models.families.Family.writes); each key's
value is one entry of VALUES. Pure Python: no torch import.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

from lorabench.errors import LorabenchError
from lorabench.models.spec import ModelSpec


def _layer_types(s: ModelSpec) -> Optional[List[str]]:
    """transformers 5's layer_types: every sliding_pattern-th layer global (1: every layer sliding)."""
    if not s.sliding_window:
        return None
    return ["sliding_attention" if s.sliding_pattern and (s.sliding_pattern == 1 or (i + 1) % s.sliding_pattern)
            else "full_attention" for i in range(s.num_layers)]


# config.json key -> its value for a spec, for the keys a family's row lists in `writes`. Dropout off.
VALUES: Dict[str, Callable[[ModelSpec], object]] = {
    "attention_bias": lambda s: s.o_bias,  # on q, k, v and o alike
    "mlp_bias": lambda s: s.mlp_bias,
    "qkv_bias": lambda s: s.qkv_bias,
    "resid_pdrop": lambda s: 0.0,
    "embd_pdrop": lambda s: 0.0,
    "attn_pdrop": lambda s: 0.0,
    "query_pre_attn_scalar": lambda s: s.query_pre_attn_scalar or s.head_dim,
    "attn_logit_softcapping": lambda s: s.attn_softcap or None,
    "final_logit_softcapping": lambda s: s.final_softcap or None,
    "sliding_window": lambda s: s.sliding_window or None,
    "layer_types": _layer_types,
    "num_experts": lambda s: s.num_experts,
    "num_local_experts": lambda s: s.num_experts,
    "decoder_sparse_step": lambda s: 1,
    "mlp_only_layers": lambda s: [],
    "norm_topk_prob": lambda s: s.arch.routing.renormalize,
    "shared_expert_intermediate_size": lambda s: s.intermediate_size,
}


def _decoder_sizes(s: ModelSpec) -> Dict:
    """A llama-style config's sizes; special-token ids inside any vocabulary."""
    cfg = {"hidden_size": s.hidden_size, "num_hidden_layers": s.num_layers, "num_attention_heads": s.num_heads,
           "num_key_value_heads": s.num_kv_heads, "head_dim": s.head_dim, "vocab_size": s.vocab_size,
           "tie_word_embeddings": s.tie_embeddings, "attention_dropout": 0.0, "pad_token_id": 0, "bos_token_id": 0,
           "eos_token_id": 0}
    if s.intermediate_size:
        cfg["intermediate_size"] = s.intermediate_size
    return cfg


def _gpt2_sizes(s: ModelSpec) -> Dict:
    return {"n_embd": s.hidden_size, "n_head": s.num_heads, "n_layer": s.num_layers, "n_positions": s.max_positions,
            "n_inner": s.intermediate_size, "vocab_size": s.vocab_size, "tie_word_embeddings": s.tie_embeddings}


# A family's layout (Family.layout) -> its config.json's sizes.
SIZES = {"decoder": _decoder_sizes, "gpt2": _gpt2_sizes}


def hf_config_dict(spec: ModelSpec) -> Dict:
    """The config.json keys transformers needs to build spec's model (the inverse of from_hf_config), for
    `lorabench bench --impl peft`. Dropout off; special-token ids inside any vocabulary.

    Raises:
        LorabenchError: a --d matrix, which is no model; q/k/v biases without an o bias in a family whose
            attention_bias sets all four.
    """
    if spec.single_matrix:
        raise LorabenchError(f"'{spec.name}' is a single d x d matrix, not a model to build.")
    row = spec.family_row
    if spec.qkv_bias and not spec.o_bias and "attention_bias" in row.writes and not (
            row.qkv_bias or "qkv_bias" in row.writes):
        raise LorabenchError(f"transformers' {row.arch.label} has no q/k/v-only biases ('{spec.name}'); use qwen2.")
    cfg = {"model_type": spec.family, **SIZES[row.layout](spec)}
    if spec.moe:
        cfg.update(num_experts_per_tok=spec.experts_per_token, router_jitter_noise=0.0, output_router_logits=False)
        cfg[row.expert_width_key] = spec.expert_intermediate_size
    cfg.update({key: VALUES[key](spec) for key in row.writes})
    return cfg
