"""Attention of every family: rotary tables, masks, SDPA or eager attention, q/k norms, fused qkv.

Written op for op as transformers 5's modeling files and integrations/sdpa_attention.py, because the memory
estimator counts the tensors these exact ops keep for backward (an extra copy or a float32 score matrix
changes the answer).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.nn.norms import RMSNorm
from lorabench.models.spec import ModelSpec

Rope = Optional[Tuple[torch.Tensor, torch.Tensor]]
# Gemma 3's rope_local_base_freq: its sliding layers rotate with this base, its global layers with rope_theta.
LOCAL_ROPE_THETA = 10000.0
# SDPA takes grouped k and v (enable_gqa) only without a mask and for head_dim up to this
# (transformers' use_gqa_in_sdpa); otherwise k and v are repeated per query group first.
SDPA_GQA_MAX_HEAD_DIM = 256


def layer_kind(spec: ModelSpec, index: int) -> str:
    """"sliding" or "full": transformers' layer_types[index] (sliding_pattern N: every Nth layer is full)."""
    p = spec.sliding_pattern
    if spec.sliding_window and p and (p == 1 or (index + 1) % p):
        return "sliding"
    return "full"


def runs_eager(spec: ModelSpec) -> bool:
    """The family runs eager attention (Gemma 2), or its scores are soft-capped, which SDPA cannot do
    (transformers refuses SDPA then too)."""
    return spec.arch.attention == "eager" or bool(spec.attn_softcap)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device: torch.device,
                 dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of rotary embeddings (Su et al. 2021, arXiv:2104.09864), HF layout.

    Computed in float32 then cast, as HF's rotary embedding modules do; once per forward and table, shared by
    the layers that use it.
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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cat: bool = False) -> torch.Tensor:
    """Rotate q or k by position, as HF's apply_rotary_pos_emb (cat: Phi-3's partial-rotary form).

    Float32 tables (OLMo 2) give a float32 product, cast back to x's dtype; otherwise the cast is a no-op.
    """
    # x: [B, H, S, hd]; cos, sin: [S, hd]
    if not cat:
        return (x * cos + rotate_half(x) * sin).to(x.dtype)
    rotary_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat([x_rot * cos + rotate_half(x_rot) * sin, x_pass], dim=-1)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, KV, S, hd] -> [B, KV * groups, S, hd], each kv head copied for its query group (HF's repeat_kv)."""
    if groups == 1:
        return x
    B, kv, S, hd = x.shape
    return x[:, :, None, :, :].expand(B, kv, groups, S, hd).reshape(B, kv * groups, S, hd)


def causal_masks(spec: ModelSpec, batch: int, seq_len: int, eager: bool, dtype: torch.dtype,
                 device: torch.device) -> Dict[str, Optional[torch.Tensor]]:
    """One mask per layer kind, made once per forward as transformers' create_causal_mask and
    create_sliding_window_causal_mask do.

    SDPA needs none (is_causal) for full layers, nor for sliding ones while the sequence is shorter than the
    window; otherwise a boolean [B, 1, S, S] (a broadcast view). Eager attention adds a float [B, 1, S, S]:
    0 where a query sees a key, the dtype's minimum elsewhere.
    """
    masks: Dict[str, Optional[torch.Tensor]] = {}
    for kind in ("full", "sliding") if spec.sliding_window else ("full",):
        window = spec.sliding_window if kind == "sliding" else 0
        if not eager and (not window or seq_len < window):
            masks[kind] = None
            continue
        q = torch.arange(seq_len, device=device)[None, None, :, None]
        kv = torch.arange(seq_len, device=device)[None, None, None, :]
        allowed = kv <= q
        if window:
            allowed = (kv > q - window) & allowed
        allowed = allowed.expand(batch, -1, seq_len, seq_len)
        if eager:
            allowed = torch.where(allowed, torch.zeros((), device=device, dtype=dtype), torch.finfo(dtype).min)
        masks[kind] = allowed
    return masks


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
              scale: Optional[float] = None) -> torch.Tensor:
    """SDPA as transformers' sdpa_attention_forward: causal through is_causal when there is no mask.

    Grouped-query heads (Ainslie et al. 2023) go to the kernel unrepeated (enable_gqa) when there is no mask
    and head_dim <= 256; otherwise, or where this torch's SDPA lacks enable_gqa (a TypeError), k and v are
    repeated per query group. Other errors, out-of-memory included, propagate.
    """
    # q: [B, H, S, hd]; k, v: [B, KV, S, hd]; mask: None or [B, 1, S, S]
    groups = q.shape[1] // k.shape[1]
    causal = mask is None and q.shape[2] > 1
    if groups > 1 and mask is None and k.shape[-1] <= SDPA_GQA_MAX_HEAD_DIM:
        try:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=causal,
                                                  enable_gqa=True)
        except TypeError:
            pass
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=causal)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                    scale: float, softcap: Optional[float] = None) -> torch.Tensor:
    """Gemma 2's eager_attention_forward: the [B, H, S, S] scores materialized, soft-capped as
    cap * tanh(s / cap) (Gemma Team 2024, arXiv:2408.00118), masked, softmax in float32.

    Autograd keeps q, k and v repeated to H heads (copies), and three [B, H, S, S] tensors: tanh's output
    (soft-capped only), softmax's float32 output and the probabilities cast to q's dtype.
    """
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale  # scores: [B, H, S, S]
    if softcap:
        scores = scores / softcap
        scores = torch.tanh(scores)
        scores = scores * softcap
    if mask is not None:
        scores = scores + mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


class Attention(nn.Module):
    """Multi-head attention: separate q, k, v (Llama) or one fused qkv (gpt2, Phi-3); optional q/k norms over
    each head (Qwen3, Gemma 3) or the full projection width (OLMo 2); SDPA, or eager where scores are
    soft-capped or the family runs eager (Gemma 2).

    Args:
        spec: the model's shape; spec.arch gives the structure.
        index: the layer's index, which decides whether it slides (layer_kind).
        eps: epsilon of the q/k norms.
    """

    def __init__(self, spec: ModelSpec, index: int = 0, eps: float = 1e-5, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.spec = spec
        self.kind = layer_kind(spec, index)
        d, arch = spec.hidden_size, spec.arch
        if spec.fused_qkv:
            self.qkv = nn.Linear(d, spec.q_dim + 2 * spec.kv_dim, bias=spec.qkv_bias, dtype=dtype)
        else:
            self.q = nn.Linear(d, spec.q_dim, bias=spec.qkv_bias, dtype=dtype)
            self.k = nn.Linear(d, spec.kv_dim, bias=spec.qkv_bias, dtype=dtype)
            self.v = nn.Linear(d, spec.kv_dim, bias=spec.qkv_bias, dtype=dtype)
        self.o = nn.Linear(spec.q_dim, d, bias=spec.o_bias, dtype=dtype)
        self.qk_norm = arch.qk_norm
        if arch.qk_norm:
            q_width, kv_width = (spec.q_dim, spec.kv_dim) if arch.qk_norm == "full" else (spec.head_dim,) * 2
            self.q_norm = RMSNorm(q_width, eps, dtype, spec.norm)
            self.k_norm = RMSNorm(kv_width, eps, dtype, spec.norm)
        # Gemma: 1 / sqrt(query_pre_attn_scalar); everyone else 1 / sqrt(head_dim).
        self.scale = (spec.query_pre_attn_scalar or spec.head_dim) ** -0.5
        self.softcap = spec.attn_softcap or None
        self.eager = runs_eager(spec)
        self.sliced_qkv = spec.arch.sliced_qkv
        self.cat_rope = spec.arch.rope_copies

    def forward(self, x: torch.Tensor, rope: Rope = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        # x: [B, S, D]
        B, S, _ = x.shape
        s = self.spec
        if s.fused_qkv:
            qkv = self.qkv(x)
            qd, kvd = s.q_dim, s.kv_dim
            if self.sliced_qkv:
                q, k, v = qkv[..., :qd], qkv[..., qd:qd + kvd], qkv[..., qd + kvd:]
            else:
                q, k, v = qkv.split([qd, kvd, kvd], dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, S, s.num_heads, s.head_dim)
        k = k.view(B, S, s.num_kv_heads, s.head_dim)
        if self.qk_norm == "head":
            # Qwen3 norms before the transpose, Gemma 3 after: the same ops, values and saved bytes.
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # q: [B, H, S, hd]; k: [B, KV, S, hd]
        v = v.view(B, S, s.num_kv_heads, s.head_dim).transpose(1, 2)  # v: [B, KV, S, hd]
        if rope is not None:
            q, k = apply_rope(q, *rope, cat=self.cat_rope), apply_rope(k, *rope, cat=self.cat_rope)
        if self.eager:
            y = eager_attention(q, k, v, mask, self.scale, self.softcap)
        else:
            y = attention(q, k, v, mask, self.scale)
        # y: [B, H, S, hd] -> [B, S, H * hd]
        return self.o(y.transpose(1, 2).contiguous().view(B, S, -1))


__all__ = ["Attention", "attention", "eager_attention", "causal_masks", "layer_kind", "runs_eager",
           "repeat_kv", "rope_cos_sin", "rotate_half", "apply_rope", "LOCAL_ROPE_THETA"]
