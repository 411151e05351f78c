"""Optimizer state per trainable tensor. Pure Python: no torch import."""

from __future__ import annotations

import math
from typing import Optional, Tuple

from lorabench.methods import Method
from lorabench.estimator.params import adapter_tensors, base_tensors
from lorabench.models.spec import ModelSpec

# Optimizer states per trainable element. Torch keeps AdamW's exp_avg/exp_avg_sq and SGD's momentum
# buffer in the parameter's dtype (zeros_like); bitsandbytes' 8-bit AdamW keeps two uint8 states with an
# fp32 absmax per 256-element block, and fp32 states for tensors under 4096 elements (min_8bit_size).
BNB_OPTIMIZERS = ("adamw-8bit", "paged-adamw-8bit", "paged-adamw")  # bitsandbytes': one fused kernel per tensor
OPTIMIZERS = ("adamw",) + BNB_OPTIMIZERS + ("sgd", "sgd-momentum")
BNB_BLOCK = 256
BNB_MIN_8BIT_SIZE = 4096


def trainable_tensors(spec: ModelSpec, method: Method, rank: Optional[int],
                       targets: Tuple[str, ...]) -> Tuple[Tuple[int, int], ...]:
    """(numel, count) of each kind of trainable tensor: bnb's 8-bit optimizer decides per tensor."""
    L = spec.num_layers
    if not method.base_trainable:
        out = []
        for t in targets:
            out += [(numel, L) for numel, trains in adapter_tensors(spec, method, rank, t) if trains]
        return tuple(out)
    return base_tensors(spec)


def optimizer_state_bytes(optimizer: str, numel: int, param_bytes: int) -> int:
    """Optimizer state of one trainable tensor of numel elements stored in param_bytes each."""
    if optimizer == "adamw":
        return 2 * numel * param_bytes
    if optimizer == "sgd-momentum":
        return numel * param_bytes
    if optimizer == "paged-adamw":  # bitsandbytes' 32-bit AdamW: fp32 states whatever the parameter's dtype
        return 2 * numel * 4
    if optimizer in ("adamw-8bit", "paged-adamw-8bit"):  # paging moves the states, it does not shrink them
        if numel < BNB_MIN_8BIT_SIZE:
            return 2 * numel * 4
        return 2 * numel + 2 * 4 * math.ceil(numel / BNB_BLOCK)
    return 0
