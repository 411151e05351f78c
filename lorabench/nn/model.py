"""A decoder-only transformer built from a ModelSpec, one Block for every family in models.families.FAMILIES.

The ops mirror transformers 5's modeling files one for one (each family's RMSNorm, rotate_half RoPE, SDPA or
Gemma 2's eager attention, the experts' grouped matmuls, HF's shifted cross-entropy), because the memory
estimator models the tensors these exact ops save for backward. What differs between families is data
(spec.arch), read here: norms and their layout, q/k norms, fused projections, GeGLU, embedding scale,
soft-capping, sliding windows, experts. Projections are named by target (`layers[i].attn.q`,
`layers[i].mlp.down`, ...) so an adapter target maps to one attribute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorabench.errors import LorabenchError
from lorabench.nn.attention import (LOCAL_ROPE_THETA, Attention, Rope, apply_rope, attention,
                                    causal_masks, rope_cos_sin, rotate_half, runs_eager)
from lorabench.nn.moe import Experts, Router, SparseMoE
from lorabench.nn.norms import RMSNorm, make_norm
from lorabench.models.spec import ModelSpec

# Which block attribute holds each target projection (a mixture of experts keeps its shared expert's
# gate, up, down and shared_gate on the MoE module, `mlp`).
TARGET_PARENTS = {"q": "attn", "k": "attn", "v": "attn", "qkv": "attn", "o": "attn",
                  "gate": "mlp", "up": "mlp", "gate_up": "mlp", "down": "mlp", "shared_gate": "mlp"}
# HF's initializer_range: weights start as N(0, 0.02) in every family here.
INIT_STD = 0.02


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation: transformers' gelu_pytorch_tanh (Gemma). gpt2's gelu_new is the same
    function, which transformers writes out in Python ops (NewGELUActivation)."""
    return F.gelu(x, approximate="tanh")


# lorabench's layers compute gpt2's gelu_new fused too: transformers writes it out op by op (NewGELUActivation)
ACTIVATIONS = {"silu": F.silu, "gelu-tanh": gelu_tanh, "gelu-new": gelu_tanh}


class MLP(nn.Module):
    """SwiGLU down(silu(gate x) * up x) (Shazeer 2020, arXiv:2002.05202), GeGLU with tanh-GELU (Gemma), Phi-3's
    fused gate_up (split by chunk, then up * act(gate)), or gpt2's down(gelu(up x))."""

    def __init__(self, spec: ModelSpec, dtype: Optional[torch.dtype] = None):
        super().__init__()
        d, i, bias, arch = spec.hidden_size, spec.intermediate_size, spec.mlp_bias, spec.arch
        self.act = ACTIVATIONS[arch.activation]
        self.gated, self.fused = arch.gated_mlp, arch.fused_gate_up
        if self.fused:
            self.gate_up = nn.Linear(d, 2 * i, bias=bias, dtype=dtype)
        else:
            if self.gated:
                self.gate = nn.Linear(d, i, bias=bias, dtype=dtype)
            self.up = nn.Linear(d, i, bias=bias, dtype=dtype)
        self.down = nn.Linear(i, d, bias=bias, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, S, D] -> hidden [B, S, I] -> [B, S, D]
        if self.fused:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return self.down(up * self.act(gate))
        if self.gated:
            return self.down(self.act(self.gate(x)) * self.up(x))
        return self.down(self.act(self.up(x)))


class Block(nn.Module):
    """One decoder layer, its norms laid out as spec.arch.norm_layout:

    pre (Llama): x + attn(norm x), then x + mlp(norm x);
    sandwich (Gemma 2/3): x + post_norm(attn(norm x)), then x + post_norm(mlp(norm x));
    post (OLMo 2): x + post_norm(attn x), then x + post_norm(mlp x).
    Pre norms are `attn_norm`/`mlp_norm`, post norms `attn_post_norm`/`mlp_post_norm`.
    """

    def __init__(self, spec: ModelSpec, eps: float, dtype: Optional[torch.dtype] = None, index: int = 0):
        super().__init__()
        layout, d = spec.arch.norm_layout, spec.hidden_size
        pre, post = layout in ("pre", "sandwich"), layout in ("sandwich", "post")
        self.attn_norm = make_norm(spec.norm, d, eps, dtype) if pre else None
        self.attn = Attention(spec, index, eps, dtype)
        self.attn_post_norm = make_norm(spec.norm, d, eps, dtype) if post else None
        self.mlp_norm = make_norm(spec.norm, d, eps, dtype) if pre else None
        self.mlp = SparseMoE(spec, dtype) if spec.moe else MLP(spec, dtype)
        self.mlp_post_norm = make_norm(spec.norm, d, eps, dtype) if post else None

    def forward(self, x: torch.Tensor, rope: Rope = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.attn(self.attn_norm(x) if self.attn_norm is not None else x, rope, mask)
        if self.attn_post_norm is not None:
            h = self.attn_post_norm(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x) if self.mlp_norm is not None else x)
        if self.mlp_post_norm is not None:
            h = self.mlp_post_norm(h)
        return x + h


@dataclass
class CausalLMOutput:
    """What a forward returns: logits [B, S, V] and the mean loss when labels were given. Indexing follows
    transformers' ModelOutput (the fields that are set, loss first), which is how Trainer reads a loss."""

    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None

    def __getitem__(self, index):
        return tuple(t for t in (self.loss, self.logits) if t is not None)[index]


IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """labels [B, S] as transformers' ForCausalLMLoss shifts them: padded on the right by one ignore_index and
    shifted left, so position s is scored against token s + 1. Padding the labels rather than slicing
    logits[:, :-1] avoids a copy of the logits."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:].contiguous()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """HF's ForCausalLMLoss: float32 logits, labels shifted (shift_labels)."""
    # logits: [B, S, V]; labels: [B, S]
    logits = logits.float()
    labels = shift_labels(labels, ignore_index)
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=ignore_index)


class Transformer(nn.Module):
    """Decoder-only language model built from a ModelSpec. No dropout anywhere.

    Args:
        spec: the model's shape; spec.with_layers(n) for a short real model.
        dtype: parameter dtype (None: torch's default).
        eps: norm epsilon (Llama-2 and gpt2 use 1e-5).
        rope_theta: rotary base (10000 as Llama-2; Llama-3 uses 500000); Gemma 3's global layers use it,
            its sliding layers LOCAL_ROPE_THETA.

    Raises:
        LorabenchError: the spec is a bare d x d matrix, not a model.
    """

    def __init__(self, spec: ModelSpec, dtype: Optional[torch.dtype] = None, eps: float = 1e-5,
                 rope_theta: float = 10000.0):
        super().__init__()
        if spec.single_matrix:
            raise LorabenchError(f"'{spec.name}' is a single d x d matrix, not a model to build.")
        self.spec = spec
        self.rope_theta = rope_theta
        self.embed = nn.Embedding(spec.vocab_size, spec.hidden_size, dtype=dtype)
        # Gemma multiplies embeddings by sqrt(d), cast to the weight dtype (sqrt(3072) = 55.43 is 55.5 in bf16).
        self.embed_scale: Optional[torch.Tensor]
        self.register_buffer("embed_scale", torch.tensor(spec.hidden_size ** 0.5) if spec.arch.embed_scale
                             else None, persistent=False)
        self.pos_embed = (nn.Embedding(spec.max_positions, spec.hidden_size, dtype=dtype)
                          if spec.max_positions else None)
        self.layers = nn.ModuleList(Block(spec, eps, dtype, i) for i in range(spec.num_layers))
        self.norm = make_norm(spec.norm, spec.hidden_size, eps, dtype)
        self.head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False, dtype=dtype)
        # Gradient checkpointing (Chen et al. 2016) per block, as transformers' gradient_checkpointing_enable
        # with use_reentrant=False: each block keeps its input and is recomputed in backward.
        self.grad_checkpointing = False
        if spec.tie_embeddings:
            self.head.weight = self.embed.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """HF's init: linear, embedding, router and expert weights N(0, 0.02), biases 0, norms as built
        (1, or 0 for Gemma's 1 + weight); skipped on meta."""
        if self.embed.weight.is_meta:
            return
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding, Router)):
                module.weight.normal_(0.0, INIT_STD)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()
            if isinstance(module, Experts):
                module.gate_up_proj.normal_(0.0, INIT_STD)
                module.down_proj.normal_(0.0, INIT_STD)

    def rope_tables(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> Dict[str, Rope]:
        """Rotary cos/sin per layer kind in use, as HF's rotary embedding: one table, or Gemma 3's two
        (sliding layers with LOCAL_ROPE_THETA, full layers with rope_theta); in dtype, or float32 for
        OLMo 2."""
        kinds = {layer.attn.kind for layer in self.layers}
        if self.spec.arch.float32_rope:
            dtype = torch.float32
        if self.spec.arch.rope_tables == 1:
            table = rope_cos_sin(seq_len, self.spec.head_dim, self.rope_theta, device, dtype)
            return {kind: table for kind in kinds}
        return {kind: rope_cos_sin(seq_len, self.spec.head_dim,
                                   LOCAL_ROPE_THETA if kind == "sliding" else self.rope_theta, device, dtype)
                for kind in sorted(kinds)}

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None) -> CausalLMOutput:
        """Logits for input_ids [B, S], and HF's causal LM loss when labels [B, S] are given.

        Raises:
            LorabenchError: a sequence longer than a learned position table.
        """
        logits = self.head(self.hidden_states(input_ids))  # logits: [B, S, V]
        if self.spec.final_softcap:
            # Gemma 2's final logit soft-capping: cap * tanh(logits / cap).
            logits = logits / self.spec.final_softcap
            logits = torch.tanh(logits)
            logits = logits * self.spec.final_softcap
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits, loss)

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The final norm's output [B, S, D] for input_ids [B, S]: what the output head reads.

        Raises:
            LorabenchError: a sequence longer than a learned position table.
        """
        B, S = input_ids.shape
        spec = self.spec
        x = self.embed(input_ids)  # x: [B, S, D]
        if self.embed_scale is not None:
            x = x * self.embed_scale.to(self.embed.weight.dtype)
        ropes: Dict[str, Rope] = {"full": None, "sliding": None}
        if self.pos_embed is not None:
            if S > spec.max_positions:
                raise LorabenchError(f"sequence length {S} exceeds {spec.name}'s {spec.max_positions} positions.")
            x = x + self.pos_embed(torch.arange(S, device=input_ids.device))
        else:
            ropes = self.rope_tables(S, x.device, x.dtype)
        masks = causal_masks(spec, B, S, runs_eager(spec), x.dtype, x.device)
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            rope, mask = ropes[layer.attn.kind], masks[layer.attn.kind]
            x = checkpoint(layer, x, rope, mask, use_reentrant=False) if ckpt else layer(x, rope, mask)
        return self.norm(x)


def build_model(spec: ModelSpec, device: torch.device | str = "cpu", dtype: Optional[torch.dtype] = None,
                layers: Optional[int] = None, seed: Optional[int] = None, **kwargs) -> Transformer:
    """A Transformer for spec created directly on device (use "meta" to count a full-size model).

    Args:
        layers: cut the model to this many decoder blocks (None keeps spec.num_layers).
        seed: seeds torch's generator before the weights are drawn.
        kwargs: passed to Transformer (eps, rope_theta).

    Raises:
        LorabenchError: the spec is not a buildable model.
    """
    if layers is not None:
        spec = spec.with_layers(layers)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        return Transformer(spec, dtype=dtype, **kwargs)


def iter_targets(model: Transformer, targets: Tuple[str, ...]) -> Iterator[Tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) of every target projection, layer by layer in target order."""
    for block in model.layers:
        for name in targets:
            parent = getattr(block, TARGET_PARENTS[name])
            yield parent, name, getattr(parent, name)


def count_module_params(model: nn.Module) -> Tuple[int, int]:
    """(trainable, total) parameters of model, shared tensors counted once, buffers not at all."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


__all__ = ["Transformer", "Block", "MLP", "CausalLMOutput", "RMSNorm", "build_model", "causal_lm_loss",
           "iter_targets", "count_module_params", "rope_cos_sin", "apply_rope", "rotate_half", "attention",
           "TARGET_PARENTS"]
