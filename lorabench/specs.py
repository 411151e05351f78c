"""Model specifications for decoder-only transformers: presets and raw d x d (config.json: lorabench.hfconfig).

Pure Python: no torch import. Every preset's parameter total equals the real model's
(checked in tests against transformers models built on the meta device).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace
from typing import Dict, Tuple

from lorabench.errors import LorabenchError

# Short names for the projections a method can target, in PEFT's module names (llama family).
LINEAR_NAMES = ("q", "k", "v", "o", "gate", "up", "down")
# gpt2 fuses q, k and v into one Conv1D (c_attn): its targets are qkv, o, up, down.
FUSED_LINEAR_NAMES = ("qkv", "o", "up", "down")


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a decoder-only transformer, enough to count every parameter and activation.

    Attributes:
        name: preset name or where the spec came from.
        hidden_size: d, the residual width.
        intermediate_size: MLP width.
        num_layers: decoder blocks.
        num_heads: query heads.
        num_kv_heads: key/value heads (grouped-query attention when < num_heads).
        head_dim: width of one head (hidden_size // num_heads unless the config says otherwise).
        vocab_size: embedding rows and output-head columns.
        tie_embeddings: the output head shares the embedding matrix.
        qkv_bias: q, k and v projections have biases (Qwen2, gpt2).
        o_bias: the attention output projection has a bias (gpt2).
        mlp_bias: MLP projections have biases (gpt2).
        gated_mlp: SwiGLU (gate, up, down) rather than a plain up/down MLP.
        norm: "rmsnorm" (weight only) or "layernorm" (weight and bias).
        fused_qkv: q, k and v live in one matrix (gpt2's c_attn), so adapters see one qkv target.
        max_positions: rows of a learned position embedding, 0 for rotary models.
        family: "llama" or "gpt2": which Hugging Face layout the spec mirrors.
        single_matrix: the spec is one d x d matrix per layer (the `--d` worked example), no model around it.
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
    gated_mlp: bool = True
    norm: str = "rmsnorm"
    fused_qkv: bool = False
    max_positions: int = 0
    family: str = "llama"
    single_matrix: bool = False

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def target_names(self) -> Tuple[str, ...]:
        """The projection names this model's adapters can target."""
        if self.single_matrix:
            return ("w",)
        return FUSED_LINEAR_NAMES if self.fused_qkv else tuple(
            n for n in LINEAR_NAMES if self.gated_mlp or n != "gate")

    @property
    def default_targets(self) -> Tuple[str, ...]:
        """PEFT's default LoRA targets for the family: q_proj, v_proj (llama) or c_attn (gpt2)."""
        if self.single_matrix:
            return ("w",)
        return ("qkv",) if self.fused_qkv else ("q", "v")

    def linear_shapes(self) -> Dict[str, Tuple[int, int, bool]]:
        """(in_features, out_features, has_bias) of each projection in one decoder layer."""
        d, i = self.hidden_size, self.intermediate_size
        if self.single_matrix:
            return {"w": (d, d, False)}
        shapes: Dict[str, Tuple[int, int, bool]] = {}
        if self.fused_qkv:
            shapes["qkv"] = (d, self.q_dim + 2 * self.kv_dim, self.qkv_bias)
        else:
            shapes["q"] = (d, self.q_dim, self.qkv_bias)
            shapes["k"] = (d, self.kv_dim, self.qkv_bias)
            shapes["v"] = (d, self.kv_dim, self.qkv_bias)
        shapes["o"] = (self.q_dim, d, self.o_bias)
        if self.gated_mlp:
            shapes["gate"] = (d, i, self.mlp_bias)
        shapes["up"] = (d, i, self.mlp_bias)
        shapes["down"] = (i, d, self.mlp_bias)
        return shapes

    @property
    def norm_params(self) -> int:
        """Parameters of one norm layer: RMSNorm has a weight, LayerNorm a weight and a bias."""
        return self.hidden_size * (2 if self.norm == "layernorm" else 1)

    def with_layers(self, num_layers: int) -> "ModelSpec":
        """The same model cut (or grown) to num_layers decoder blocks."""
        return replace(self, num_layers=num_layers)


def _llama(name, d, inter, layers, heads, kv, vocab, head_dim=None, tied=False, qkv_bias=False):
    return ModelSpec(name=name, hidden_size=d, intermediate_size=inter, num_layers=layers,
                     num_heads=heads, num_kv_heads=kv, head_dim=head_dim or d // heads,
                     vocab_size=vocab, tie_embeddings=tied, qkv_bias=qkv_bias)


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
    "mistral-7b": _llama("mistral-7b", 4096, 14336, 32, 32, 8, 32000),
    "qwen2.5-0.5b": _llama("qwen2.5-0.5b", 896, 4864, 24, 14, 2, 151936, tied=True, qkv_bias=True),
    "qwen2.5-7b": _llama("qwen2.5-7b", 3584, 18944, 28, 28, 4, 152064, qkv_bias=True),
    "qwen2.5-72b": _llama("qwen2.5-72b", 8192, 29568, 80, 64, 8, 152064, qkv_bias=True),
    "gpt2": ModelSpec(name="gpt2", hidden_size=768, intermediate_size=3072, num_layers=12,
                      num_heads=12, num_kv_heads=12, head_dim=64, vocab_size=50257,
                      tie_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True,
                      gated_mlp=False, norm="layernorm", fused_qkv=True, max_positions=1024,
                      family="gpt2"),
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
    """One d x d weight matrix per layer: the seed's worked example (d=4096, r=8)."""
    if d <= 0 or layers <= 0:
        raise LorabenchError("--d and --layers must be positive integers.")
    return ModelSpec(name=f"d={d}" + (f" x{layers}" if layers > 1 else ""), hidden_size=d,
                     intermediate_size=d, num_layers=layers, num_heads=1, num_kv_heads=1,
                     head_dim=d, vocab_size=0, gated_mlp=False, single_matrix=True)
