"""The norms of the model families (Arch.norm), each written op for op as its transformers modeling file.

The three RMSNorms (Zhang & Sennrich 2019) all take the statistics in float32; they differ in where the weight
is applied and in which dtype, which decides the tensors autograd keeps for backward.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

RMS_KINDS = ("rmsnorm", "rmsnorm-fp32", "rmsnorm-plus1")


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim, as one of three transformers variants.

    kind "rmsnorm" is LlamaRMSNorm (weight * x.to(dtype)); "rmsnorm-fp32" is Olmo2RMSNorm ((weight * x).to(dtype),
    the product in float32); "rmsnorm-plus1" is Gemma2RMSNorm/Gemma3RMSNorm (x * (1 + weight.float()) then
    type_as(x); the weight starts at 0, so the scale starts at 1). Autograd keeps x in float32 (x itself when
    already float32), the [..., 1] reciprocal RMS, and the normalized x: in x's dtype for "rmsnorm", in float32
    for the other two.

    Raises:
        ValueError: an unknown kind.
    """

    def __init__(self, dim: int, eps: float = 1e-5, dtype: Optional[torch.dtype] = None, kind: str = "rmsnorm"):
        super().__init__()
        if kind not in RMS_KINDS:
            raise ValueError(f"unknown RMSNorm kind {kind!r}; choose from {', '.join(RMS_KINDS)}.")
        self.kind = kind
        start = torch.zeros if kind == "rmsnorm-plus1" else torch.ones
        self.weight = nn.Parameter(start(dim, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., D]
        input_dtype = x.dtype
        x32 = x.to(torch.float32)
        var = x32.pow(2).mean(-1, keepdim=True)
        x32 = x32 * torch.rsqrt(var + self.eps)
        if self.kind == "rmsnorm":
            return self.weight * x32.to(input_dtype)
        if self.kind == "rmsnorm-fp32":
            return (self.weight * x32).to(input_dtype)
        return (x32 * (1.0 + self.weight.float())).type_as(x)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, kind={self.kind}"


def make_norm(kind: str, dim: int, eps: float, dtype: Optional[torch.dtype]) -> nn.Module:
    """A norm of Arch.norm's kind over dim: LayerNorm with bias (gpt2) or one of the RMSNorms."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, dtype=dtype)
    return RMSNorm(dim, eps=eps, dtype=dtype, kind=kind)


__all__ = ["RMSNorm", "make_norm", "RMS_KINDS"]
