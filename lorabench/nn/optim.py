"""The optimizers lorabench.estimator.optimizer.OPTIMIZERS describes, built in torch or bitsandbytes."""

from __future__ import annotations

from typing import List, Optional, Union

import torch

from lorabench.errors import LorabenchError
from lorabench.estimator.optimizer import OPTIMIZERS


def make_optimizer(name: str, groups: List[dict], lr: float, weight_decay: float = 0.0,
                   device: Union[str, torch.device] = "cpu", foreach: Optional[bool] = None) -> torch.optim.Optimizer:
    """The optimizer the estimator models under name (its OPTIMIZERS row).

    adamw: torch AdamW (two states per trainable parameter); sgd: no state; sgd-momentum: momentum 0.9
    (one state); adamw-8bit, paged-adamw-8bit, paged-adamw: bitsandbytes' AdamW8bit, PagedAdamW8bit,
    PagedAdamW (Dettmers et al. 2021, arXiv:2110.02861; paged: states in CUDA unified memory). bitsandbytes'
    optimizers run on CPU tensors too (bitsandbytes >= 0.48 has CPU kernels for the 8-bit blockwise update); a
    paged one falls back to ordinary memory there. foreach: torch's multi-tensor step (None: torch's choice, which
    is foreach for CUDA tensors and the per-tensor loop on the CPU); a trace of a CUDA step asks for it.

    Raises:
        LorabenchError: unknown name, or a bitsandbytes optimizer without bitsandbytes.
    """
    row = OPTIMIZERS.get(name)
    if row is None:
        names = sorted(OPTIMIZERS, key=lambda n: OPTIMIZERS[n].bnb_class is not None)  # torch's, then bitsandbytes'
        raise LorabenchError(f"unknown optimizer '{name}'; choose from {', '.join(names)}.")
    if row.bnb_class is None:
        kwargs = {"momentum": row.momentum} if row.momentum else {}
        if foreach is not None:
            kwargs["foreach"] = foreach
        return getattr(torch.optim, row.torch_class)(groups, lr=lr, weight_decay=weight_decay, **kwargs)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise LorabenchError(f"{name} needs bitsandbytes: pip install 'lorabench[qlora]'.") from None
    return getattr(bnb.optim, row.bnb_class)(groups, lr=lr, weight_decay=weight_decay)


__all__ = ["make_optimizer"]
