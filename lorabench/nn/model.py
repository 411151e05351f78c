"""A decoder-only transformer built from a ModelSpec: Llama layout (RMSNorm, RoPE, GQA, SwiGLU) or gpt2's.

The ops mirror Hugging Face's LlamaForCausalLM and GPT2LMHeadModel one for one (RMSNorm in float32,
rotate_half RoPE, SDPA attention, HF's shifted cross-entropy), because the memory estimator models the
tensors these exact ops save for backward. Projections are named by target (`layers[i].attn.q`,
`layers[i].mlp.down`, ...) so an adapter target maps to one attribute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorabench.errors import LorabenchError
from lorabench.specs import ModelSpec

# Which block attribute holds each target projection.
TARGET_PARENTS = {"q": "attn", "k": "attn", "v": "attn", "qkv": "attn", "o": "attn",
                  "gate": "mlp", "up": "mlp", "down": "mlp"}
# HF's initializer_range: weights start as N(0, 0.02) in Llama and gpt2.
INIT_STD = 0.02


class RMSNorm(nn.Module):
    """Root-mean-square norm exactly as HF's LlamaRMSNorm (Zhang & Sennrich 2019).

    The statistics are taken in float32 whatever the input dtype; the estimator counts the float32
    copy of x and the normalized tensor that this order of ops saves for backward.
    """

    def __init__(self, dim: int, eps: float = 1e-5, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, S, D]
        input_dtype = x.dtype
        x32 = x.to(torch.float32)
        var = x32.pow(2).mean(-1, keepdim=True)
        x32 = x32 * torch.rsqrt(var + self.eps)
        return self.weight * x32.to(input_dtype)


def make_norm(spec: ModelSpec, eps: float, dtype: Optional[torch.dtype]) -> nn.Module:
    """The spec's norm: LayerNorm with bias (gpt2) or RMSNorm (Llama)."""
    if spec.norm == "layernorm":
        return nn.LayerNorm(spec.hidden_size, eps=eps, dtype=dtype)
    return RMSNorm(spec.hidden_size, eps=eps, dtype=dtype)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device: torch.device,
                 dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of rotary embeddings (Su et al. 2021, arXiv:2104.09864), HF layout.

    Computed in float32 then cast, as HF's LlamaRotaryEmbedding does; once per forward, shared by all
    layers.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    pos = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)  # freqs: [S, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # emb: [S, hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dim: HF's pairing of rotary halves (not interleaved)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate q or k by position, as HF's apply_rotary_pos_emb."""
    # x: [B, H, S, hd]; cos, sin: [S, hd]
    return x * cos + rotate_half(x) * sin


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal SDPA; grouped-query heads are broadcast by the kernel, not copied (Ainslie et al. 2023).

    Falls back to repeating k and v per query group only where this torch's SDPA lacks enable_gqa
    (a TypeError); other errors, out-of-memory included, propagate. Which kernel runs is torch's choice:
    flash attention takes GQA natively (fp16/bf16 on CUDA); where no fused kernel accepts it, torch's
    math path expands k and v itself.
    """
    # q: [B, H, S, hd]; k, v: [B, KV, S, hd]
    if k.shape[1] == q.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    try:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    except TypeError:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Attention(nn.Module):
    """Multi-head attention with separate q, k, v (Llama) or one fused qkv projection (gpt2)."""

    def __init__(self, spec: ModelSpec, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.spec = spec
        d = spec.hidden_size
        if spec.fused_qkv:
            self.qkv = nn.Linear(d, spec.q_dim + 2 * spec.kv_dim, bias=spec.qkv_bias, dtype=dtype)
        else:
            self.q = nn.Linear(d, spec.q_dim, bias=spec.qkv_bias, dtype=dtype)
            self.k = nn.Linear(d, spec.kv_dim, bias=spec.qkv_bias, dtype=dtype)
            self.v = nn.Linear(d, spec.kv_dim, bias=spec.qkv_bias, dtype=dtype)
        self.o = nn.Linear(spec.q_dim, d, bias=spec.o_bias, dtype=dtype)

    def forward(self, x: torch.Tensor, rope: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        # x: [B, S, D]
        B, S, _ = x.shape
        s = self.spec
        if s.fused_qkv:
            q, k, v = self.qkv(x).split([s.q_dim, s.kv_dim, s.kv_dim], dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = q.view(B, S, s.num_heads, s.head_dim).transpose(1, 2)  # q: [B, H, S, hd]
        k = k.view(B, S, s.num_kv_heads, s.head_dim).transpose(1, 2)  # k: [B, KV, S, hd]
        v = v.view(B, S, s.num_kv_heads, s.head_dim).transpose(1, 2)  # v: [B, KV, S, hd]
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = attention(q, k, v)  # y: [B, H, S, hd]
        return self.o(y.transpose(1, 2).contiguous().view(B, S, -1))


class MLP(nn.Module):
    """SwiGLU down(silu(gate x) * up x) (Shazeer 2020, arXiv:2002.05202) or gpt2's down(gelu(up x))."""

    def __init__(self, spec: ModelSpec, dtype: Optional[torch.dtype] = None):
        super().__init__()
        d, i, bias = spec.hidden_size, spec.intermediate_size, spec.mlp_bias
        self.gated = spec.gated_mlp
        if self.gated:
            self.gate = nn.Linear(d, i, bias=bias, dtype=dtype)
        self.up = nn.Linear(d, i, bias=bias, dtype=dtype)
        self.down = nn.Linear(i, d, bias=bias, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, S, D] -> hidden [B, S, I] -> [B, S, D]
        if self.gated:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        # gpt2's "gelu_new" is the tanh approximation.
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm x), then x + mlp(norm x)."""

    def __init__(self, spec: ModelSpec, eps: float, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.attn_norm = make_norm(spec, eps, dtype)
        self.attn = Attention(spec, dtype)
        self.mlp_norm = make_norm(spec, eps, dtype)
        self.mlp = MLP(spec, dtype)

    def forward(self, x: torch.Tensor, rope: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope)
        return x + self.mlp(self.mlp_norm(x))


@dataclass
class CausalLMOutput:
    """What a forward returns: logits [B, S, V] and the mean loss when labels were given."""

    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """HF's ForCausalLMLoss: float32 logits, labels padded on the right by one and shifted.

    Padding the labels rather than slicing logits[:, :-1] avoids a copy of the logits.
    """
    # logits: [B, S, V]; labels: [B, S]
    logits = logits.float()
    labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:].contiguous()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=ignore_index)


class Transformer(nn.Module):
    """Decoder-only language model built from a ModelSpec. No dropout anywhere.

    Args:
        spec: the model's shape; spec.with_layers(n) for a short real model.
        dtype: parameter dtype (None: torch's default).
        eps: norm epsilon (Llama-2 and gpt2 use 1e-5).
        rope_theta: rotary base (10000 as Llama-2; Llama-3 uses 500000).

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
        self.pos_embed = (nn.Embedding(spec.max_positions, spec.hidden_size, dtype=dtype)
                          if spec.max_positions else None)
        self.layers = nn.ModuleList(Block(spec, eps, dtype) for _ in range(spec.num_layers))
        self.norm = make_norm(spec, eps, dtype)
        self.head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False, dtype=dtype)
        # Gradient checkpointing (Chen et al. 2016) per block, as transformers' gradient_checkpointing_enable
        # with use_reentrant=False: each block keeps its input and is recomputed in backward.
        self.grad_checkpointing = False
        if spec.tie_embeddings:
            self.head.weight = self.embed.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """HF's init: linear and embedding weights N(0, 0.02), biases 0, norms 1 (skipped on meta)."""
        if self.embed.weight.is_meta:
            return
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, INIT_STD)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None) -> CausalLMOutput:
        """Logits for input_ids [B, S], and HF's causal LM loss when labels [B, S] are given.

        Raises:
            LorabenchError: a sequence longer than a learned position table.
        """
        B, S = input_ids.shape
        x = self.embed(input_ids)  # x: [B, S, D]
        rope = None
        if self.pos_embed is not None:
            if S > self.spec.max_positions:
                raise LorabenchError(f"sequence length {S} exceeds {self.spec.name}'s "
                                     f"{self.spec.max_positions} positions.")
            x = x + self.pos_embed(torch.arange(S, device=input_ids.device))
        else:
            rope = rope_cos_sin(S, self.spec.head_dim, self.rope_theta, x.device, x.dtype)
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            x = checkpoint(layer, x, rope, use_reentrant=False) if ckpt else layer(x, rope)
        logits = self.head(self.norm(x))  # logits: [B, S, V]
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits, loss)


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


__all__ = ["Transformer", "CausalLMOutput", "RMSNorm", "build_model", "causal_lm_loss", "iter_targets",
           "count_module_params", "rope_cos_sin", "apply_rope", "rotate_half", "TARGET_PARENTS"]
