"""Model families: one row per Hugging Face model_type, holding everything lorabench knows of the family.

A row is the family's decoder structure (Arch: norms, fused projections, q/k norms, experts...), the
config.json keys it reads with transformers' defaults and spellings, what its config.json writer sets, and
its PEFT module names. The counts, the memory model, lorabench.nn, the config.json reader
(lorabench.models.hfconfig) and writer (lorabench.models.hfwrite) read these fields and never a family's
name: a new family is a new row plus its tests. Pure Python: no torch import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

from lorabench.models.keys import (MAX_HEADS, MAX_LAYERS, MAX_MLP, MAX_POSITIONS, MAX_VOCAB, Key, bool_key,
                                   float_key, int_key, list_key)

# Short names for the projections a method can target, mapped to PEFT's module names.
PEFT_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "qkv": "qkv_proj",
              "gate": "gate_proj", "up": "up_proj", "gate_up": "gate_up_proj", "down": "down_proj",
              "router": "gate", "shared_gate": "shared_expert_gate", "experts": "experts"}
# gpt2's Conv1D modules: c_attn (q, k, v fused), c_proj (attention output and MLP down), c_fc (up).
GPT2_PEFT_NAMES = {"qkv": "c_attn", "o": "attn.c_proj", "up": "c_fc", "down": "mlp.c_proj"}
# A mixture of experts' targets that are parameters, not nn.Linear modules (lora.ParamWrapper in PEFT).
MOE_TARGETS = ("router", "experts")


@dataclass(frozen=True)
class Routing:
    """How a mixture of experts' router turns logits into top-k weights (each family's *TopKRouter).

    Attributes:
        upcast_logits: softmax(logits.float()) (Mixtral) rather than softmax(logits, dtype=float32) (Qwen).
        renormalize: the k weights are divided by their sum (Mixtral always; Qwen by norm_topk_prob, false in
            Qwen1.5-MoE's config.json, true in Qwen3-MoE's).
        cast_back: the weights return to the activation dtype (Qwen); Mixtral's stay float32, so each
            expert output is weighted in float32.
    """

    upcast_logits: bool
    renormalize: bool
    cast_back: bool


@dataclass(frozen=True)
class Arch:
    """What a model family's decoder layer is made of (its row's `arch`, a spec's `spec.arch`), read by the
    counts, the memory model and lorabench.nn alike. Sizes are the ModelSpec's; this is the structure.

    Attributes:
        label: the family's name as users know it.
        norm: "rmsnorm" (Llama: weight * x.to(dtype)), "rmsnorm-fp32" (OLMo 2: (weight * x).to(dtype), the
            product in float32), "rmsnorm-plus1" (Gemma: x * (1 + weight) in float32, weight starting at 0)
            or "layernorm" (gpt2: weight and bias).
        norm_layout: "pre" (a norm before attention and before the MLP), "sandwich" (Gemma 2/3: also after
            each, on the block's output) or "post" (OLMo 2: after each block only).
        qk_norm: "" (none), "head" (an RMSNorm over head_dim on q and on k: Qwen3, Gemma 3) or "full" (over
            the whole q and k projection widths: OLMo 2).
        fused_qkv: q, k and v are one projection (Phi-3's qkv_proj, gpt2's c_attn).
        fused_gate_up: the MLP's gate and up are one projection (Phi-3's gate_up_proj).
        gated_mlp: act(gate x) * up x (SwiGLU/GeGLU) rather than act(up x).
        activation: "silu", "gelu-tanh" (Gemma's gelu_pytorch_tanh: one fused op that keeps its input) or
            "gelu-new" (gpt2's gelu_new: the same function written out in Python, transformers' NewGELUActivation,
            whose ops keep tanh's output, 0.5 x and 1 + tanh besides the input).
        embed_scale: embeddings are multiplied by sqrt(hidden_size) (Gemma).
        attention: the attention transformers runs by default: "sdpa", or "eager" where it refuses SDPA
            (Gemma 2: `_supports_sdpa = False`, since SDPA cannot soft-cap the scores).
        rope_tables: rotary cos/sin tables per forward (Gemma 3: one for local, one for global layers).
        rope_copies: the rotation writes new q and k in [B, H, S, hd] order (Phi-3 rotates
            q[..., :rotary_dim] and cats the rest back on), so SDPA's output is not [B, S, H, hd] and o's
            input is a copy of it (elsewhere transpose(1, 2).contiguous() is free).
        sliced_qkv: q, k and v are sliced out of the fused projection's output (Phi-3) rather than split
            (gpt2): backward makes one full-width zero gradient per slice.
        float32_rope: the rotary tables stay float32, so q and k are rotated in float32 and cast back
            (OLMo 2).
        moe: the MLP is a mixture of experts (router, fused 3-D expert weights, maybe a shared expert).
        routing: how its router weighs the top-k experts (None for a dense MLP).
        moe_targets: PEFT's all-linear also adapts the router and the fused experts. PEFT 0.21 rewrites a
            LoRA config for transformers 5's fused experts (peft/utils/transformers_weight_conversion.py)
            for mixtral and qwen3_moe, not qwen2_moe, whose all-linear stays on the nn.Linear modules.
        default_targets: PEFT's default LoRA targets for the family (peft.utils.constants), or the q,v
            analogue where PEFT has none (then `note_default` says so).
    """

    label: str
    norm: str = "rmsnorm"
    norm_layout: str = "pre"
    qk_norm: str = ""
    fused_qkv: bool = False
    fused_gate_up: bool = False
    gated_mlp: bool = True
    activation: str = "silu"
    embed_scale: bool = False
    attention: str = "sdpa"
    rope_tables: int = 1
    rope_copies: bool = False
    sliced_qkv: bool = False
    float32_rope: bool = False
    moe: bool = False
    routing: Optional[Routing] = None
    moe_targets: bool = False
    default_targets: Tuple[str, ...] = ("q", "v")
    note_default: bool = False

    @property
    def norms_per_layer(self) -> int:
        return 4 if self.norm_layout == "sandwich" else 2


@dataclass(frozen=True)
class Family:
    """One model_type: its structure, its config.json (read and written) and its PEFT names.

    Attributes:
        arch: what its decoder layer is made of.
        keys: the config.json keys it reads, each with the default of transformers' config class for the
            family and every spelling its attribute_map gives it.
        layout: how its config.json names the sizes: "decoder" (hidden_size, num_hidden_layers,
            num_attention_heads, ... as Llama's) or "gpt2" (n_embd, n_layer, n_head, n_inner, n_positions;
            every projection biased, a learned position embedding).
        qkv_bias: q, k and v always have biases and o none, whatever the config says (Qwen2's attention).
        global_every: with a sliding window but no layer_types, every Nth layer is global (transformers'
            defaults: Gemma 2 alternates, Gemma 3 has five sliding layers to one global); 0: no sliding layers.
        expert_width_key: the key the experts' MLP width is read from and written to (Mixtral's
            intermediate_size; the Qwen MoEs' moe_intermediate_size, their intermediate_size being a dense
            MLP's).
        writes: keys its config.json writer sets beyond a decoder's sizes, in order, each valued from the spec
            by lorabench.models.hfwrite.VALUES.
        peft_names: PEFT's module name for each of our target names.
        peft_refusal: why `bench --impl peft` cannot build the family ("": it can).
    """

    arch: Arch
    keys: Tuple[Key, ...]
    layout: str = "decoder"
    qkv_bias: bool = False
    global_every: int = 0
    expert_width_key: str = "moe_intermediate_size"
    writes: Tuple[str, ...] = ()
    peft_names: Mapping[str, str] = field(default_factory=lambda: PEFT_NAMES, hash=False)
    peft_refusal: str = ""

    def default(self, name: str):
        """transformers' default for the key called name."""
        return next(k.default for k in self.keys if k.name == name)


def _decoder(vocab, d, mlp, layers, heads, kv, head_dim=None, tied=False) -> Tuple[Key, ...]:
    """The keys every llama-style family reads, with its config class's defaults (None: derived)."""
    return (int_key("hidden_size", d), int_key("intermediate_size", mlp, MAX_MLP),
            int_key("num_hidden_layers", layers, MAX_LAYERS), int_key("num_attention_heads", heads, MAX_HEADS),
            int_key("num_key_value_heads", kv, MAX_HEADS, nullable=True), int_key("head_dim", head_dim, nullable=True),
            int_key("vocab_size", vocab, MAX_VOCAB), bool_key("tie_word_embeddings", tied))


def _experts(number, top_k, aliases=()) -> Tuple[Key, ...]:
    """Experts per layer and per token, with the class's defaults. Mixtral's class keeps the count as
    num_local_experts and Qwen3-MoE's as num_experts, and each maps the other spelling onto its own;
    Qwen2-MoE's reads only num_experts."""
    return (int_key("num_experts", number, MAX_HEADS, aliases=aliases),
            int_key("num_experts_per_tok", top_k, MAX_HEADS))


def _qwen_moe(number, top_k, width, aliases=()) -> Tuple[Key, ...]:
    return _experts(number, top_k, aliases) + (int_key("moe_intermediate_size", width, MAX_MLP),
                                                int_key("decoder_sparse_step", 1, MAX_LAYERS),
                                                list_key("mlp_only_layers", "ints"))


# The keys each family reads, every one with the default of transformers 5.25's config class for the family
# (configuration_<family>.py) and every spelling its attribute_map gives it: a config.json is read as
# transformers reads it, and save_pretrained's output (which writes attribute_map's spelling, and may leave a
# key out) reads back. tests/test_hfconfig_roundtrip.py holds the keys to transformers' classes.
ATTENTION_BIAS = (bool_key("attention_bias", False),)
GEMMA = (int_key("query_pre_attn_scalar", 256), bool_key("attention_bias", False), list_key("layer_types", "strs"),
         int_key("sliding_window", 4096, MAX_POSITIONS, nullable=True))
GEMMA_WRITES = ("attention_bias", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                "sliding_window", "layer_types")
QWEN_MOE_WRITES = ("num_experts", "decoder_sparse_step", "mlp_only_layers", "norm_topk_prob")

# model_type -> family. Structures read from each family's modeling file in transformers 5.x.
FAMILIES: Dict[str, Family] = {
    "llama": Family(Arch("Llama"), _decoder(32000, 4096, 11008, 32, 32, None) + ATTENTION_BIAS + (
        bool_key("mlp_bias", False),), writes=("attention_bias", "mlp_bias")),
    "mistral": Family(Arch("Mistral"), _decoder(32000, 4096, 14336, 32, 32, 8)),
    "qwen2": Family(Arch("Qwen2"), _decoder(151936, 4096, 22016, 32, 32, 32), qkv_bias=True),
    "qwen3": Family(Arch("Qwen3", qk_norm="head"), _decoder(151936, 4096, 22016, 32, 32, 32, head_dim=128)
                    + ATTENTION_BIAS, writes=("attention_bias",)),
    "gemma2": Family(Arch("Gemma 2", norm="rmsnorm-plus1", norm_layout="sandwich", activation="gelu-tanh",
                          embed_scale=True, attention="eager"),
                     _decoder(256000, 2304, 9216, 26, 8, 4, 256, tied=True) + GEMMA + (
                         float_key("attn_logit_softcapping", 50.0), float_key("final_logit_softcapping", 30.0)),
                     global_every=2, writes=GEMMA_WRITES),
    "gemma3_text": Family(Arch("Gemma 3", norm="rmsnorm-plus1", norm_layout="sandwich", qk_norm="head",
                               activation="gelu-tanh", embed_scale=True, rope_tables=2),
                          _decoder(262208, 2304, 9216, 26, 8, 4, 256, tied=True) + GEMMA + (
                              float_key("attn_logit_softcapping"), float_key("final_logit_softcapping"),
                              int_key("sliding_window_pattern", hi=MAX_LAYERS)),
                          global_every=6, writes=GEMMA_WRITES),
    "phi3": Family(Arch("Phi-3", fused_qkv=True, fused_gate_up=True, rope_copies=True, sliced_qkv=True,
                        default_targets=("qkv",), note_default=True),
                   _decoder(32064, 3072, 8192, 32, 32, None), writes=("resid_pdrop", "embd_pdrop")),
    "olmo2": Family(Arch("OLMo 2", norm="rmsnorm-fp32", norm_layout="post", qk_norm="full", float32_rope=True,
                         note_default=True),
                    _decoder(50304, 4096, 11008, 32, 32, None) + ATTENTION_BIAS, writes=("attention_bias",)),
    "mixtral": Family(Arch("Mixtral", moe=True, routing=Routing(True, True, False), moe_targets=True),
                      _decoder(32000, 4096, 14336, 32, 32, 8) + _experts(8, 2, ("num_local_experts",)),
                      expert_width_key="intermediate_size", writes=("num_local_experts",)),
    "qwen2_moe": Family(Arch("Qwen2-MoE", moe=True, routing=Routing(False, False, True), note_default=True),
                        _decoder(151936, 2048, 5632, 24, 16, 16) + _qwen_moe(60, 4, 1408) + (
                            int_key("shared_expert_intermediate_size", 5632, MAX_MLP), bool_key("qkv_bias", True)),
                        writes=QWEN_MOE_WRITES + ("shared_expert_intermediate_size", "qkv_bias")),
    "qwen3_moe": Family(Arch("Qwen3-MoE", qk_norm="head", moe=True, routing=Routing(False, True, True),
                             moe_targets=True, note_default=True),
                        _decoder(151936, 2048, 6144, 24, 32, 4) + ATTENTION_BIAS + _qwen_moe(
                            128, 8, 768, ("num_local_experts",)), writes=("attention_bias",) + QWEN_MOE_WRITES),
    "gpt2": Family(Arch("GPT-2", norm="layernorm", fused_qkv=True, gated_mlp=False, activation="gelu-new",
                        default_targets=("qkv",)),
                   (int_key("n_embd", 768, aliases=("hidden_size",)),
                    int_key("n_head", 12, MAX_HEADS, aliases=("num_attention_heads",)),
                    int_key("n_layer", 12, MAX_LAYERS, aliases=("num_hidden_layers",)),
                    int_key("n_positions", 1024, MAX_POSITIONS, aliases=("max_position_embeddings",)),
                    int_key("vocab_size", 50257, MAX_VOCAB), int_key("n_inner", None, MAX_MLP, nullable=True),
                    bool_key("tie_word_embeddings", True)),
                   layout="gpt2", writes=("resid_pdrop", "embd_pdrop", "attn_pdrop"), peft_names=GPT2_PEFT_NAMES,
                   peft_refusal="its Conv1D layers are not wired in"),
}


@dataclass(frozen=True)
class Multimodal:
    """A vision-language model_type whose language model lorabench reads from text_config.

    Attributes:
        text: the text_config's family.
        top: keys transformers reads at the top level for the language model, overriding text_config's.
    """

    text: str
    top: Tuple[Key, ...] = ()


# Gemma3ForConditionalGeneration ties its output head by Gemma3Config's tie_word_embeddings (default true),
# not text_config's.
MULTIMODAL = {"gemma3": Multimodal("gemma3_text", (bool_key("tie_word_embeddings", True),))}
