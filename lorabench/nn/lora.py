"""LoRA (and LoRA-FA) and DoRA wrappers around a frozen nn.Linear, in PEFT's orientation (delta W = B @ A)."""

from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.nn.quant import dense_weight, is_quantized


def _freeze(base: nn.Linear) -> nn.Linear:
    for p in base.parameters():
        p.requires_grad_(False)
    return base


def init_lora_a(rank: int, in_features: int, device: torch.device, dtype: torch.dtype,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """A [r, in] drawn as PEFT's default (kaiming_uniform_ with a=sqrt(5), as nn.Linear), from generator.

    Drawn on the CPU so a seed gives the same A on every device; left uninitialized on meta.
    """
    if torch.device(device).type == "meta":
        return torch.empty(rank, in_features, device=device, dtype=dtype)
    a = torch.empty(rank, in_features, dtype=torch.float32)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    return a.to(device=device, dtype=dtype)


class LoRALinear(nn.Module):
    """h = W x + b + (alpha / r) B A x with W and b frozen (Hu et al. 2021, arXiv:2106.09685).

    A and B are kept in adapter dtype (float32, as PEFT keeps them) and cast to x's dtype inside forward,
    so backward keeps x itself (shared by every adapter fed by the same x) rather than a float32 copy.
    With train_a=False this is LoRA-FA (Zhang et al. 2023, arXiv:2308.03303): A is a frozen random
    projection, so `F.linear(x, A)` saves no x and backward keeps only the r-wide projection A x.

    Args:
        base: the Linear to adapt; its parameters are frozen.
        rank: r.
        alpha: scale numerator; the update is scaled by alpha / r.
        dropout: dropout probability on the adapter input (0: no dropout op at all).
        train_a: A gets gradients (False for LoRA-FA).
        dtype: adapter parameter dtype.
        generator: draws A.

    Raises:
        ValueError: rank is not positive.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, train_a: bool = True,
                 dtype: torch.dtype = torch.float32, generator: Optional[torch.Generator] = None):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"rank must be positive, got {rank}.")
        self.base = _freeze(base)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.scale = rank, alpha / rank
        device = base.weight.device
        self.lora_a = nn.Parameter(init_lora_a(rank, self.in_features, device, dtype, generator),
                                   requires_grad=train_a)
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def adapter_params(self) -> List[nn.Parameter]:
        return [self.lora_a, self.lora_b]

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """(alpha / r) B A x in x's dtype."""
        # x: [B, S, in] -> ax: [B, S, r] -> [B, S, out]
        h = self.dropout(x) if self.dropout is not None else x
        ax = F.linear(h, self.lora_a.to(x.dtype))
        # Scaling the r-wide projection rather than the out-wide result: same math, smaller temporary.
        return F.linear(ax * self.scale, self.lora_b.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.delta(x)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) B A [out, in] in adapter dtype (for tests and merging)."""
        return self.scale * (self.lora_b @ self.lora_a)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}, train_a={self.lora_a.requires_grad}"


class DoRALinear(LoRALinear):
    """h = m / ||W + s B A||_row * (W x + s B A x) + b (Liu et al. 2024, arXiv:2402.09353).

    m [out] starts at the row norms of W (norm over in_features, one per output, as PEFT). The norm is
    detached, as the paper's sec. 4.3 suggests and PEFT does: it is computed under no_grad (one W-sized
    temporary, no saved tensors). PEFT writes the same output as (g - 1) W x + g s B A x added to the base
    result; this form saves one out-wide tensor (W x + s B A x) for m's gradient instead of two.

    On a bitsandbytes base (QDoRA) W x is the quantized layer's own product (less its bias), and W in the
    norm is the layer's weight dequantized (lorabench.nn.quant.dense_weight, as PEFT's
    dequantize_bnb_weight), m starting at the dequantized rows' norms.

    Args:
        base: the Linear to adapt; its parameters are frozen.
        rank: r.
        alpha: the update is scaled by alpha / r.
        dropout: dropout probability on the adapter input (0: no dropout op).
        dtype: adapter parameter dtype (m, A, B).
        generator: draws A.
        train_a: A gets gradients (False: A frozen random, as LoRA-FA's).

    Raises:
        ValueError: rank is not positive.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32, generator: Optional[torch.Generator] = None,
                 train_a: bool = True):
        super().__init__(base, rank, alpha, dropout, train_a, dtype, generator)
        device = base.weight.device
        if base.weight.is_meta:
            norm = torch.empty(self.out_features, device=device, dtype=dtype)
        else:
            with torch.no_grad():
                norm = torch.linalg.vector_norm(dense_weight(base, dtype), dim=1)  # norm: [out]
        self.magnitude = nn.Parameter(norm)

    def adapter_params(self) -> List[nn.Parameter]:
        return [self.lora_a, self.lora_b, self.magnitude]

    def weight_norm(self, dtype: torch.dtype) -> torch.Tensor:
        """||W + s B A|| per output row, detached; one out x in temporary via addmm (a dequantized W is a
        fresh tensor: s B A is added to it in place)."""
        with torch.no_grad():
            b, a = self.lora_b.to(dtype), self.lora_a.to(dtype)
            if is_quantized(self.base):
                w = dense_weight(self.base, dtype).addmm_(b, a, alpha=self.scale)
            else:
                w = torch.addmm(self.base.weight.to(dtype), b, a, alpha=self.scale)
            return torch.linalg.vector_norm(w, dim=1)

    def _base_product(self, x: torch.Tensor) -> torch.Tensor:
        """W x without the bias: a bitsandbytes layer computes its own product (it adds its bias)."""
        if not is_quantized(self.base):
            return F.linear(x, self.base.weight)
        wx = self.base(x)
        return wx if self.base.bias is None else wx - self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, S, in] -> y: [B, S, out]
        y = self._base_product(x) + self.delta(x)
        g = self.magnitude.to(x.dtype) / self.weight_norm(x.dtype)  # g: [out]
        y = g * y
        return y if self.base.bias is None else y + self.base.bias

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}"
