"""Model specifications for decoder-only transformers: presets and raw d x d (config.json: lorabench.models.hfconfig).

Pure Python: no torch import. Every preset's parameter total equals the real model's
(checked in tests against transformers models built on the meta device).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple

from lorabench.errors import LorabenchError

# Short names for the projections a method can target, mapped to PEFT's module names.
PEFT_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "qkv": "qkv_proj",
              "gate": "gate_proj", "up": "up_proj", "gate_up": "gate_up_proj", "down": "down_proj",
              "router": "gate", "shared_gate": "shared_expert_gate", "experts": "experts"}
# gpt2's Conv1D modules: c_attn (q, k, v fused), c_proj (attention output and MLP down), c_fc (up).
# A mixture of experts' targets that are parameters, not nn.Linear modules (lora.ParamWrapper in PEFT).
MOE_TARGETS = ("router", "experts")
GPT2_PEFT_NAMES = {"qkv": "c_attn", "o": "attn.c_proj", "up": "c_fc", "down": "mlp.c_proj"}


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
    """What a model family's decoder layer is made of: one row of ARCHS, read by the counts, the memory
    model and lorabench.nn alike. Sizes are the ModelSpec's; this is the structure.

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
        activation: "silu" or "gelu-tanh" (Gemma's gelu_pytorch_tanh, gpt2's gelu_new).
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


# model_type -> structure. Read from each family's modeling file in transformers 5.x.
ARCHS: Dict[str, Arch] = {
    "llama": Arch("Llama"),
    "mistral": Arch("Mistral"),
    "qwen2": Arch("Qwen2"),
    "qwen3": Arch("Qwen3", qk_norm="head"),
    "gemma2": Arch("Gemma 2", norm="rmsnorm-plus1", norm_layout="sandwich", activation="gelu-tanh",
                   embed_scale=True, attention="eager"),
    "gemma3_text": Arch("Gemma 3", norm="rmsnorm-plus1", norm_layout="sandwich", qk_norm="head",
                        activation="gelu-tanh", embed_scale=True, rope_tables=2),
    "phi3": Arch("Phi-3", fused_qkv=True, fused_gate_up=True, rope_copies=True, sliced_qkv=True,
                 default_targets=("qkv",), note_default=True),
    "olmo2": Arch("OLMo 2", norm="rmsnorm-fp32", norm_layout="post", qk_norm="full", float32_rope=True,
                  note_default=True),
    "mixtral": Arch("Mixtral", moe=True, routing=Routing(True, True, False), moe_targets=True),
    "qwen2_moe": Arch("Qwen2-MoE", moe=True, routing=Routing(False, False, True), note_default=True),
    "qwen3_moe": Arch("Qwen3-MoE", qk_norm="head", moe=True, routing=Routing(False, True, True),
                        moe_targets=True, note_default=True),
    "gpt2": Arch("GPT-2", norm="layernorm", fused_qkv=True, gated_mlp=False, activation="gelu-tanh",
                 default_targets=("qkv",)),
}


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a decoder-only transformer, enough to count every parameter and activation.

    Attributes:
        name: preset name or where the spec came from.
        hidden_size: d, the residual width.
        intermediate_size: MLP width (of the dense MLP; of the shared expert in Qwen2-MoE).
        num_layers: decoder blocks.
        num_heads: query heads.
        num_kv_heads: key/value heads (grouped-query attention when < num_heads).
        head_dim: width of one head (hidden_size // num_heads unless the config says otherwise).
        vocab_size: embedding rows and output-head columns.
        tie_embeddings: the output head shares the embedding matrix.
        qkv_bias: q, k and v projections have biases (Qwen2, gpt2).
        o_bias: the attention output projection has a bias (gpt2).
        mlp_bias: MLP projections have biases (gpt2).
        max_positions: rows of a learned position embedding, 0 for rotary models.
        family: the Hugging Face model_type whose layout the spec mirrors (a key of ARCHS).
        single_matrix: the spec is one d x d matrix per layer (the `--d` worked example), no model around it.
        attn_softcap: attention scores soft-capped as cap * tanh(s / cap) (Gemma 2), 0 for none.
        final_softcap: the same on the output logits (Gemma 2), 0 for none.
        sliding_window: tokens a sliding-window layer attends to, 0 for none.
        sliding_pattern: which layers slide: 1 every layer, N every layer but each Nth (Gemma 2: 2,
            Gemma 3: 6), 0 none.
        num_experts: experts per MoE layer (0: a dense MLP).
        experts_per_token: experts each token is routed to (top-k).
        expert_intermediate_size: each expert's MLP width.
        shared_expert_gate: Qwen2-MoE's sigmoid gate (d -> 1) on its shared expert, whose width is
            intermediate_size.
        query_pre_attn_scalar: Gemma's attention scale 1/sqrt(this) instead of 1/sqrt(head_dim); 0 default.
        notes: what the spec leaves out or assumes (a vision tower not counted), shown with every answer.
    """

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    max_positions: int = 0
    family: str = "llama"
    single_matrix: bool = False
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    sliding_window: int = 0
    sliding_pattern: int = 0
    num_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    shared_expert_gate: bool = False
    query_pre_attn_scalar: int = 0
    notes: Tuple[str, ...] = ()

    @property
    def arch(self) -> Arch:
        return ARCHS[self.family]

    @property
    def norm(self) -> str:
        return self.arch.norm

    @property
    def fused_qkv(self) -> bool:
        return self.arch.fused_qkv

    @property
    def gated_mlp(self) -> bool:
        return self.arch.gated_mlp

    @property
    def moe(self) -> bool:
        return self.num_experts > 0

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def target_names(self) -> Tuple[str, ...]:
        """The projections this model's adapters can target, in layer order (PEFT's all-linear)."""
        if self.single_matrix:
            return ("w",)
        names = tuple(self.linear_shapes())
        return names + (MOE_TARGETS if self.arch.moe_targets else ())

    @property
    def default_targets(self) -> Tuple[str, ...]:
        """PEFT's default LoRA targets for the family (q_proj, v_proj; c_attn for gpt2)."""
        return ("w",) if self.single_matrix else self.arch.default_targets

    def peft_name(self, target: str) -> str:
        """PEFT's module name for one of our target names."""
        return (GPT2_PEFT_NAMES if self.family == "gpt2" else PEFT_NAMES)[target]

    def linear_shapes(self) -> Dict[str, Tuple[int, int, bool]]:
        """(in_features, out_features, has_bias) of each nn.Linear in one decoder layer, in order.

        A mixture-of-experts layer lists its shared expert's gate, up and down and the shared expert's
        sigmoid gate ("shared_gate", d -> 1) (Qwen2-MoE); its router and experts are parameters of other
        modules (moe_shapes).
        """
        d, i, a = self.hidden_size, self.intermediate_size, self.arch
        if self.single_matrix:
            return {"w": (d, d, False)}
        shapes: Dict[str, Tuple[int, int, bool]] = {}
        if a.fused_qkv:
            shapes["qkv"] = (d, self.q_dim + 2 * self.kv_dim, self.qkv_bias)
        else:
            shapes["q"] = (d, self.q_dim, self.qkv_bias)
            shapes["k"] = (d, self.kv_dim, self.qkv_bias)
            shapes["v"] = (d, self.kv_dim, self.qkv_bias)
        shapes["o"] = (self.q_dim, d, self.o_bias)
        if self.moe and not i:
            return shapes
        if a.fused_gate_up:
            shapes["gate_up"] = (d, 2 * i, self.mlp_bias)
        elif a.gated_mlp:
            shapes["gate"] = (d, i, self.mlp_bias)
        if not a.fused_gate_up:
            shapes["up"] = (d, i, self.mlp_bias)
        shapes["down"] = (i, d, self.mlp_bias)
        if self.shared_expert_gate:
            shapes["shared_gate"] = (d, 1, False)
        return shapes

    def moe_shapes(self) -> Dict[str, Tuple[int, int, int]]:
        """(experts, out, in) of one MoE layer's router weight (E x d, one matrix) and fused 3-D expert weights
        as transformers 5 stores them: gate_up_proj [E, 2 I, d] and down_proj [E, d, I]."""
        if not self.moe:
            return {}
        e, i, d = self.num_experts, self.expert_intermediate_size, self.hidden_size
        return {"router": (1, e, d), "gate_up_proj": (e, 2 * i, d), "down_proj": (e, d, i)}

    @property
    def expert_params(self) -> int:
        """Parameters of one expert (its gate, up and down)."""
        return 3 * self.expert_intermediate_size * self.hidden_size if self.moe else 0

    def sliding_layers(self) -> int:
        """Layers that attend within a sliding window (transformers' layer_types)."""
        if not self.sliding_window or not self.sliding_pattern:
            return 0
        p = self.sliding_pattern
        return self.num_layers if p == 1 else sum(1 for i in range(self.num_layers) if (i + 1) % p)

    def attended_keys(self, seq_len: int, sliding: bool) -> float:
        """Keys a causal query attends to on average in a sequence of seq_len: (s + 1) / 2 taken as s / 2, and
        within a sliding window of w, w (1 - w / 2s) (the first w queries see fewer). FlashAttention skips the
        blocks outside the window, so this is the work too."""
        w = self.sliding_window if sliding else 0
        return seq_len / 2 if not w or w >= seq_len else w * (1 - w / (2 * seq_len))

    def with_layers(self, num_layers: int) -> "ModelSpec":
        """The same model cut (or grown) to num_layers decoder blocks."""
        return replace(self, num_layers=num_layers)


def _llama(name, d, inter, layers, heads, kv, vocab, head_dim=None, tied=False, qkv_bias=False,
           family="llama", **extra):
    return ModelSpec(name=name, hidden_size=d, intermediate_size=inter, num_layers=layers,
                     num_heads=heads, num_kv_heads=kv, head_dim=head_dim or d // heads,
                     vocab_size=vocab, tie_embeddings=tied, qkv_bias=qkv_bias, family=family, **extra)


VISION_NOTE = ("the language model of a vision-language checkpoint: the vision tower and its projector "
               "({:,} parameters more) are not counted.")


def _gemma(name, d, inter, layers, heads, kv, head_dim, vocab, family, window, query_pre_attn_scalar=256,
           vision=0):
    """Gemma 2 (soft-capped attention and logits, every other layer sliding) or Gemma 3 (five sliding layers
    to one global, no soft-capping); embeddings tied."""
    gemma2 = family == "gemma2"
    return ModelSpec(name=name, hidden_size=d, intermediate_size=inter, num_layers=layers, num_heads=heads,
                     num_kv_heads=kv, head_dim=head_dim, vocab_size=vocab, tie_embeddings=True, family=family,
                     attn_softcap=50.0 if gemma2 else 0.0, final_softcap=30.0 if gemma2 else 0.0,
                     sliding_window=window, sliding_pattern=2 if gemma2 else 6,
                     query_pre_attn_scalar=query_pre_attn_scalar,
                     notes=(VISION_NOTE.format(vision),) if vision else ())


# Values from each model's published config.json; totals are asserted in tests/test_specs.py.
PRESETS: Dict[str, ModelSpec] = {
    "llama-2-7b": _llama("llama-2-7b", 4096, 11008, 32, 32, 32, 32000),
    "llama-2-13b": _llama("llama-2-13b", 5120, 13824, 40, 40, 40, 32000),
    "llama-2-70b": _llama("llama-2-70b", 8192, 28672, 80, 64, 8, 32000),
    "llama-3-8b": _llama("llama-3-8b", 4096, 14336, 32, 32, 8, 128256),
    "llama-3-70b": _llama("llama-3-70b", 8192, 28672, 80, 64, 8, 128256),
    "llama-3.1-8b": _llama("llama-3.1-8b", 4096, 14336, 32, 32, 8, 128256),
    "llama-3.1-70b": _llama("llama-3.1-70b", 8192, 28672, 80, 64, 8, 128256),
    "llama-3.1-405b": _llama("llama-3.1-405b", 16384, 53248, 126, 128, 8, 128256),
    "llama-3.2-1b": _llama("llama-3.2-1b", 2048, 8192, 16, 32, 8, 128256, head_dim=64, tied=True),
    "llama-3.2-3b": _llama("llama-3.2-3b", 3072, 8192, 28, 24, 8, 128256, head_dim=128, tied=True),
    "mistral-7b": _llama("mistral-7b", 4096, 14336, 32, 32, 8, 32000, family="mistral"),
    "qwen2.5-0.5b": _llama("qwen2.5-0.5b", 896, 4864, 24, 14, 2, 151936, tied=True, qkv_bias=True, family="qwen2"),
    "qwen2.5-7b": _llama("qwen2.5-7b", 3584, 18944, 28, 28, 4, 152064, qkv_bias=True, family="qwen2"),
    "qwen2.5-72b": _llama("qwen2.5-72b", 8192, 29568, 80, 64, 8, 152064, qkv_bias=True, family="qwen2"),
    "gpt2": ModelSpec(name="gpt2", hidden_size=768, intermediate_size=3072, num_layers=12,
                      num_heads=12, num_kv_heads=12, head_dim=64, vocab_size=50257,
                      tie_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True, max_positions=1024,
                      family="gpt2"),
    "mistral-nemo-12b": _llama("mistral-nemo-12b", 5120, 14336, 40, 32, 8, 131072, head_dim=128, family="mistral"),
    "qwen3-8b": _llama("qwen3-8b", 4096, 12288, 36, 32, 8, 151936, head_dim=128, family="qwen3"),
    "gemma-2-2b": _gemma("gemma-2-2b", 2304, 9216, 26, 8, 4, 256, 256000, "gemma2", 4096),
    "gemma-2-9b": _gemma("gemma-2-9b", 3584, 14336, 42, 16, 8, 256, 256000, "gemma2", 4096),
    "gemma-3-1b": _gemma("gemma-3-1b", 1152, 6912, 26, 4, 1, 256, 262144, "gemma3_text", 512),
    # Gemma 3 4B and 27B: published totals 4,300,079,472 and 27,432,406,640 with the vision tower.
    "gemma-3-4b": _gemma("gemma-3-4b", 2560, 10240, 34, 8, 4, 256, 262208, "gemma3_text", 1024,
                         vision=419_816_304),
    "gemma-3-27b": _gemma("gemma-3-27b", 5376, 21504, 62, 32, 16, 128, 262208, "gemma3_text", 1024,
                          query_pre_attn_scalar=168, vision=423_060_336),
    "phi-3-mini": _llama("phi-3-mini", 3072, 8192, 32, 32, 32, 32064, family="phi3"),
    "phi-4": _llama("phi-4", 5120, 17920, 40, 40, 10, 100352, family="phi3"),
    "olmo-2-7b": _llama("olmo-2-7b", 4096, 11008, 32, 32, 32, 100352, family="olmo2"),
    "mixtral-8x7b": _llama("mixtral-8x7b", 4096, 0, 32, 32, 8, 32000, family="mixtral", num_experts=8,
                           experts_per_token=2, expert_intermediate_size=14336),
    "qwen1.5-moe-a2.7b": _llama("qwen1.5-moe-a2.7b", 2048, 5632, 24, 16, 16, 151936, qkv_bias=True,
                                family="qwen2_moe", num_experts=60, experts_per_token=4,
                                expert_intermediate_size=1408, shared_expert_gate=True),
    "qwen3-30b-a3b": _llama("qwen3-30b-a3b", 2048, 0, 48, 32, 4, 151936, head_dim=128, family="qwen3_moe",
                            num_experts=128, experts_per_token=8, expert_intermediate_size=768),
    # A small Llama-shaped model for CPU verification runs (not a published model).
    "tiny-llama": _llama("tiny-llama", 256, 688, 4, 8, 4, 4096),
}


def from_name(name: str) -> ModelSpec:
    """The preset called name (case-insensitive).

    Raises:
        LorabenchError: no such preset; the message suggests near names.
    """
    key = name.strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    near = difflib.get_close_matches(key, PRESETS, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(near)}?" if near else ""
    raise LorabenchError(f"unknown model '{name}'.{hint} Run 'lorabench models' for the presets, or give a "
                         "Hugging Face Hub id (ORG/NAME) or --config.")


def from_dimension(d: int, layers: int = 1) -> ModelSpec:
    """One d x d weight matrix per layer: the worked example of the "Neurons, Weights & Fine-Tuning" deep dive (d=4096, r=8)."""
    if d <= 0 or layers <= 0:
        raise LorabenchError("--d and --layers must be positive integers.")
    return ModelSpec(name=f"d={d}" + (f" x{layers}" if layers > 1 else ""), hidden_size=d,
                     intermediate_size=d, num_layers=layers, num_heads=1, num_kv_heads=1,
                     head_dim=d, vocab_size=0, single_matrix=True)
