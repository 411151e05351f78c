"""Model specifications for decoder-only transformers: a ModelSpec's sizes, its family's structure (one row of
lorabench.models.families.FAMILIES) and the raw d x d matrix (presets: lorabench.models.presets; config.json:
lorabench.models.hfconfig).

Pure Python: no torch import.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Tuple

from lorabench.errors import LorabenchError
from lorabench.spelling import option
from lorabench.models.families import FAMILIES, MOE_TARGETS, Arch, Family


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
        family: the Hugging Face model_type whose layout the spec mirrors (a key of FAMILIES: its row is
            `family_row`, its structure `arch`).
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
    def family_row(self) -> Family:
        return FAMILIES[self.family]

    @property
    def arch(self) -> Arch:
        return FAMILIES[self.family].arch

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
        return self.family_row.peft_names[target]

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
        return self.num_layers if p == 1 else self.num_layers - self.num_layers // p  # all but each p-th

    def slides(self, layer: int) -> bool:
        """Layer `layer` (from 0) attends within a sliding window: every layer (pattern 1), or all but each Nth."""
        if not self.sliding_window or not self.sliding_pattern:
            return False
        return self.sliding_pattern == 1 or bool((layer + 1) % self.sliding_pattern)

    def attended_keys(self, seq_len: int, sliding: bool) -> float:
        """Keys a causal query attends to on average in a sequence of seq_len: (s + 1) / 2 taken as s / 2, and
        within a sliding window of w, w (1 - w / 2s) (the first w queries see fewer). FlashAttention skips the
        blocks outside the window, so this is the work too."""
        w = self.sliding_window if sliding else 0
        return seq_len / 2 if not w or w >= seq_len else w * (1 - w / (2 * seq_len))

    def with_layers(self, num_layers: int) -> "ModelSpec":
        """The same model cut (or grown) to num_layers decoder blocks."""
        return replace(self, num_layers=num_layers)


def from_dimension(d: int, layers: int = 1) -> ModelSpec:
    """One d x d weight matrix per layer: the worked example of the "Neurons, Weights & Fine-Tuning" deep dive (d=4096, r=8)."""
    if d <= 0 or layers <= 0:
        raise LorabenchError(f"{option('d')} and {option('layers')} must be positive integers.")
    return ModelSpec(name=f"d={d}" + (f" x{layers}" if layers > 1 else ""), hidden_size=d,
                     intermediate_size=d, num_layers=layers, num_heads=1, num_kv_heads=1,
                     head_dim=d, vocab_size=0, single_matrix=True)
