"""VeRA: one frozen random A, B pair shared by every adapted layer, trainable per-layer scaling vectors.

Kopiczko et al. 2023, arXiv:2310.11454. Layout and initialization follow PEFT's tuners/vera: A is
[r, max in], B is [max out, r], both drawn by kaiming-uniform (gain sqrt(2)) from one CPU generator
seeded with projection_prng_key, and each layer uses the slices A[:, :in] and B[:out, :].
"""

from __future__ import annotations

import math
from typing import List

import torch
import torch.nn.functional as F
from torch import nn


def _kaiming(shape, generator: torch.Generator) -> torch.Tensor:
    # PEFT's vera._kaiming_init: uniform(-b, b) with b = sqrt(3) * sqrt(2) / sqrt(fan_in).
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRAProjections(nn.Module):
    """The shared frozen projections, held as buffers (not parameters) of one module.

    Every VeRALinear registers this same module as a child (as PEFT shares its BufferDict), so
    `model.to(...)` converts the pair once and every layer keeps slicing the same storage.

    Args:
        rank: r.
        max_in: widest input of the adapted layers.
        max_out: widest output of the adapted layers.
        seed: PEFT's projection_prng_key.
        device: where the buffers live ("meta" leaves them uninitialized).
        dtype: buffer dtype.
    """

    def __init__(self, rank: int, max_in: int, max_out: int, seed: int = 0,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__()
        if torch.device(device).type == "meta":
            a = torch.empty(rank, max_in, device=device, dtype=dtype)
            b = torch.empty(max_out, rank, device=device, dtype=dtype)
        else:
            generator = torch.Generator(device="cpu").manual_seed(seed)
            a = _kaiming((rank, max_in), generator).to(device=device, dtype=dtype)
            b = _kaiming((max_out, rank), generator).to(device=device, dtype=dtype)
        self.register_buffer("a", a)  # a: [r, max_in]
        self.register_buffer("b", b)  # b: [max_out, r]


class VeRALinear(nn.Module):
    """h = W x + b + lambda_b * (B[:out] (lambda_d * (A[:, :in] x))), W, A, B frozen.

    The order of ops is PEFT's `lambda_b * F.linear(lambda_d * F.linear(x, A), B)`. A and B are frozen,
    so backward keeps no copy of x for the adapter: it saves A x ([B, S, r], for lambda_d's gradient)
    and B (lambda_d A x) ([B, S, out], for lambda_b's gradient).

    Args:
        base: the Linear to adapt; its parameters are frozen.
        shared: the VeRAProjections common to all adapted layers.
        dropout: dropout probability on the adapter input (0: no dropout op).
        d_initial: starting value of lambda_d (PEFT's default 0.1); lambda_b starts at zero.
        dtype: dtype of the trainable vectors.

    Raises:
        ValueError: the shared projections are narrower than this layer.
    """

    def __init__(self, base: nn.Linear, shared: VeRAProjections, dropout: float = 0.0, d_initial: float = 0.1,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if shared.a.shape[1] < base.in_features or shared.b.shape[0] < base.out_features:
            raise ValueError("VeRA's shared projections are smaller than the layer they adapt.")
        for p in base.parameters():
            p.requires_grad_(False)
        self.base = base
        self.shared = shared
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank = shared.a.shape[0]
        device = base.weight.device
        self.lambda_d = nn.Parameter(torch.full((self.rank,), d_initial, device=device, dtype=dtype))
        self.lambda_b = nn.Parameter(torch.zeros(self.out_features, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    @property
    def vera_a(self) -> torch.Tensor:
        """This layer's view A[:, :in] of the shared projection."""
        return self.shared.a[:, : self.in_features]

    @property
    def vera_b(self) -> torch.Tensor:
        """This layer's view B[:out, :] of the shared projection."""
        return self.shared.b[: self.out_features, :]

    def adapter_params(self) -> List[nn.Parameter]:
        return [self.lambda_d, self.lambda_b]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, S, in]
        h = self.dropout(x) if self.dropout is not None else x
        ax = F.linear(h, self.vera_a.to(x.dtype))  # ax: [B, S, r]
        bx = F.linear(self.lambda_d.to(x.dtype) * ax, self.vera_b.to(x.dtype))  # bx: [B, S, out]
        return self.base(x) + self.lambda_b.to(x.dtype) * bx

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """diag(lambda_b) B diag(lambda_d) A [out, in] (for tests and merging)."""
        return (self.lambda_b[:, None] * self.vera_b) @ (self.lambda_d[:, None] * self.vera_a)

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


__all__ = ["VeRAProjections", "VeRALinear"]
