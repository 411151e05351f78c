"""A mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE) as transformers 5 runs it by default.

The router is each family's *TopKRouter; the experts are fused 3-D weights computed by transformers'
grouped_mm_experts_forward (integrations/moe.py): token-expert pairs sorted by expert, one grouped matmul
for gate and up and one for down, weighted, unsorted, summed over the k experts of each token. Neither is
an nn.Linear, so lorabench's adapter layers do not wrap them (PEFT's lora.ParamWrapper does).
"""

from __future__ import annotations

import re
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.models.spec import ModelSpec

_TORCH = tuple(int(p) for p in re.match(r"(\d+)\.(\d+)\.(\d+)", torch.__version__).groups())


class Router(nn.Module):
    """Top-k router (Shazeer et al. 2017, arXiv:1701.06538): weight [E, d], softmax in float32, top k."""

    def __init__(self, spec: ModelSpec, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.top_k = spec.experts_per_token
        self.routing = spec.arch.routing
        self.weight = nn.Parameter(torch.empty(spec.num_experts, spec.hidden_size, dtype=dtype))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # x: [T, D] -> weights [T, k], expert indices [T, k]
        logits = F.linear(x, self.weight)  # logits: [T, E]
        if self.routing.upcast_logits:
            probs = F.softmax(logits.float(), dim=-1)
        else:
            probs = F.softmax(logits, dtype=torch.float, dim=-1)
        top, index = torch.topk(probs, self.top_k, dim=-1)
        if self.routing.renormalize:
            top /= top.sum(dim=-1, keepdim=True)
        if self.routing.cast_back:
            top = top.to(logits.dtype)
        return top, index


class _GroupedMMFallback(torch.autograd.Function):
    """transformers' _grouped_mm_fallback where no grouped_mm kernel runs: one mm per expert's rows; keeps
    input and weight for backward."""

    @staticmethod
    def forward(ctx, x, weight, offsets):
        ctx.save_for_backward(x, weight)
        ctx.offsets = offsets
        out = torch.zeros(x.size(0), weight.size(2), device=x.device, dtype=x.dtype)
        start = 0
        for i, end in enumerate(offsets.tolist()):
            if start != end:
                torch.mm(x[start:end], weight[i], out=out[start:end])
            start = end
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x, grad_w = torch.zeros_like(x), torch.zeros_like(weight)
        start = 0
        for i, end in enumerate(ctx.offsets.tolist()):
            if start != end:
                torch.mm(grad[start:end], weight[i].T, out=grad_x[start:end])
                torch.mm(x[start:end].T, grad[start:end], out=grad_w[i])
            start = end
        return grad_x, grad_w, None


def _can_use_grouped_mm(weight: torch.Tensor, x: torch.Tensor) -> bool:
    """transformers' _can_use_grouped_mm, outside torch.compile."""
    has_f, has_private = hasattr(F, "grouped_mm"), hasattr(torch, "_grouped_mm")
    if weight.device.type == "cpu" and (_TORCH <= (2, 8, 0) or _TORCH <= (2, 10, 0) and (
            weight.data_ptr() % 16 or x.data_ptr() % 16)):
        return False
    if weight.device.type == "cuda":
        capability = torch.cuda.get_device_capability(weight.device)
        if has_f or has_private and _TORCH >= (2, 9, 0):
            return capability >= (8, 0)
        return has_private and capability[0] == 9
    return has_f or has_private


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [S, in] rows sorted by expert, weight [E, in, out], offsets [E] cumulative rows -> [S, out]."""
    if _can_use_grouped_mm(weight, x):
        mm = F.grouped_mm if hasattr(F, "grouped_mm") else torch._grouped_mm
        return mm(x.to(weight.dtype), weight, offs=offsets)
    return _GroupedMMFallback.apply(x.to(weight.dtype), weight, offsets)


class Experts(nn.Module):
    """E SwiGLU experts as transformers 5 stores them: gate_up_proj [E, 2I, d], down_proj [E, d, I].

    For the S = T k token-expert pairs autograd keeps the gathered input [S, d], the gate_up output [S, 2I]
    (gate and up are views of it), silu(gate) and the product [S, I] each, the down output [S, d], the
    sorted routing weights [S] (float32 for Mixtral) and the sort and gather indices.
    """

    def __init__(self, spec: ModelSpec, dtype: Optional[torch.dtype] = None):
        super().__init__()
        e, i, d = spec.num_experts, spec.expert_intermediate_size, spec.hidden_size
        self.num_experts = e
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, d, dtype=dtype))
        self.down_proj = nn.Parameter(torch.empty(e, d, i, dtype=dtype))

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # x: [T, D]; index, weights: [T, k]. S = T * k token-expert pairs.
        k, tokens, d = index.size(-1), x.size(0), x.size(-1)
        sample_weights, expert_ids = weights.reshape(-1), index.reshape(-1)  # [S]
        expert_ids_g, perm = torch.sort(expert_ids)
        x_g = x[perm // k]  # x_g: [S, D], grouped by expert
        sample_weights_g = sample_weights[perm]
        # histc counts float ids on CPU and MPS, int ids elsewhere (as transformers).
        ids = expert_ids_g.float() if x.device.type in ("cpu", "mps") else expert_ids_g.int()
        per_expert = torch.histc(ids, bins=self.num_experts, min=0, max=self.num_experts - 1)
        offsets = torch.cumsum(per_expert, dim=0, dtype=torch.int32)
        h = grouped_mm(x_g, self.gate_up_proj.transpose(-2, -1), offsets)  # h: [S, 2I]
        gate, up = h.chunk(2, dim=-1)
        h = F.silu(gate) * up  # h: [S, I]
        h = grouped_mm(h, self.down_proj.transpose(-2, -1), offsets)  # h: [S, D]
        weighted = h * sample_weights_g.unsqueeze(-1)
        inv_perm = torch.empty_like(perm)
        inv_perm[perm] = torch.arange(perm.size(0), device=x.device)
        weighted = weighted[inv_perm]
        return weighted.view(tokens, k, d).sum(dim=1).to(x.dtype)


class SparseMoE(nn.Module):
    """Router plus experts; Qwen2-MoE adds a shared SwiGLU expert (gate, up, down of width intermediate_size)
    scaled by sigmoid(shared_gate x). The shared expert's projections sit on this module under their target
    names, so adapters find them as they find a dense MLP's."""

    def __init__(self, spec: ModelSpec, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.router = Router(spec, dtype)
        self.experts = Experts(spec, dtype)
        self.shared = bool(spec.intermediate_size)
        if self.shared:
            d, i = spec.hidden_size, spec.intermediate_size
            self.gate = nn.Linear(d, i, bias=False, dtype=dtype)
            self.up = nn.Linear(d, i, bias=False, dtype=dtype)
            self.down = nn.Linear(i, d, bias=False, dtype=dtype)
        self.shared_gate = nn.Linear(spec.hidden_size, 1, bias=False, dtype=dtype) if spec.shared_expert_gate \
            else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, S, D] -> tokens [T, D] -> [B, S, D]
        B, S, d = x.shape
        x = x.view(-1, d)
        shared = self.down(F.silu(self.gate(x)) * self.up(x)) if self.shared else None
        weights, index = self.router(x)
        out = self.experts(x, index, weights)
        if shared is None:
            return out.reshape(B, S, d)
        if self.shared_gate is not None:
            shared = torch.sigmoid(self.shared_gate(x)) * shared
        return (out + shared).reshape(B, S, d)


__all__ = ["SparseMoE", "Router", "Experts", "grouped_mm"]
