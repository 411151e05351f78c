"""The optimizers (OPTIMIZERS: one row each, read by the memory and step-time estimates, FSDP's shares and the
torch side, lorabench.nn.optim), and their state per trainable tensor. Pure Python: no torch import."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Optional, Tuple

from lorabench.estimator.params import adapter_tensors, base_tensors
from lorabench.models.families import MOE_TARGETS

if TYPE_CHECKING:  # case.py imports setup.py, which imports OPTIMIZER_NAMES from here
    from lorabench.estimator.case import Case

# bitsandbytes' 8-bit states: one fp32 absmax per block of 256 elements, and fp32 states for tensors under 4096
# elements (min_8bit_size).
BNB_BLOCK = 256
BNB_MIN_8BIT_SIZE = 4096


@dataclass(frozen=True)
class Optimizer:
    """One optimizer: what its states weigh, what its step moves, and what builds it.

    Attributes:
        name: the CLI name.
        states: states per trainable element (AdamW's exp_avg and exp_avg_sq, SGD's momentum buffer).
        state_kind: "param": torch keeps them in the parameter's dtype (zeros_like; fp32 with master weights);
            "fp32": bitsandbytes' 32-bit states whatever the parameter's dtype; "8bit": bitsandbytes' blockwise
            uint8 states (BNB_BLOCK, BNB_MIN_8BIT_SIZE). Paging moves the states, it does not shrink them.
        step_state_reads: bytes the step reads or writes per parameter, in units of the state's element size:
            torch's AdamW (weight decay 0) lerp_(m, g), mul_(v), addcmul_(v, g, g), sqrt(v), div_, add_(eps),
            addcdiv_(p, m, denom): 19; SGD add_: 3; with momentum mul_, add_, add_: 8; bitsandbytes' fused
            kernel reads and writes p, reads g: 3.
        step_extra_bytes: bytes per parameter the step moves beyond those (bitsandbytes' two states read and
            written: 1-byte states 4, fp32 states 16).
        launches: eager ops of one step per tensor (or per list of tensors, where foreach).
        foreach: torch's foreach kernels on CUDA (tensors in lists of 32 per launch); bitsandbytes runs one
            fused kernel per tensor.
        step_temporaries: torch's AdamW makes temporaries in its step: a list the size of all exp_avg_sq
            (foreach, on CUDA), or two of the largest tensor (the per-tensor loop, on the CPU).
        torch_class: the torch.optim class, or bitsandbytes.optim's where bnb_class is set.
        bnb_class: the bitsandbytes.optim class, None for torch's.
        momentum: SGD's momentum (0: none).
    """

    name: str
    states: int
    state_kind: str
    step_state_reads: int
    step_extra_bytes: int
    launches: int
    foreach: bool
    step_temporaries: bool
    torch_class: Optional[str] = None
    bnb_class: Optional[str] = None
    momentum: float = 0.0

    def state_bytes(self, numel: int, param_bytes: int) -> int:
        """Bytes of this optimizer's states for one trainable tensor of numel elements stored in param_bytes
        each (its states' element size: the parameter's, or fp32 with master weights)."""
        if self.state_kind == "param":
            return self.states * numel * param_bytes
        if self.state_kind == "fp32" or numel < BNB_MIN_8BIT_SIZE:
            return self.states * numel * 4
        return self.states * numel + self.states * 4 * math.ceil(numel / BNB_BLOCK)


# In the order the CLI lists them (--optimizer).
OPTIMIZERS: Dict[str, Optimizer] = {o.name: o for o in (
    Optimizer("adamw", 2, "param", 19, 0, 8, True, True, torch_class="AdamW"),
    Optimizer("adamw-8bit", 2, "8bit", 3, 4, 1, False, False, bnb_class="AdamW8bit"),
    Optimizer("paged-adamw-8bit", 2, "8bit", 3, 4, 1, False, False, bnb_class="PagedAdamW8bit"),
    Optimizer("paged-adamw", 2, "fp32", 3, 16, 1, False, False, bnb_class="PagedAdamW"),
    Optimizer("sgd", 0, "param", 3, 0, 1, True, False, torch_class="SGD"),
    Optimizer("sgd-momentum", 1, "param", 8, 0, 3, True, False, torch_class="SGD", momentum=0.9),
)}
OPTIMIZER_NAMES = tuple(OPTIMIZERS)


def trainable_tensors(case: Case) -> Tuple[Tuple[int, int], ...]:
    """(numel, count) of each kind of trainable tensor: bnb's 8-bit optimizer decides per tensor."""
    spec, method, rank, targets = case.spec, case.method, case.rank, case.targets
    L = spec.num_layers
    if not method.base_trainable:
        out = []
        for t in targets:
            out += [(numel, L) for numel, trains in adapter_tensors(spec, method, rank, t) if trains]
        return tuple(out)
    return base_tensors(spec)


def group_numels(case: "Case", trainable: int) -> Tuple[int, ...]:
    """Trainable elements per optimizer parameter group. torch's foreach step runs group by group, so its
    temporaries are the largest group's. LoRA+ (peft.optimizers.create_loraplus_optimizer, lorabench.nn's
    param_groups) puts every A in one group and B with the 1-D vectors in another; else one group."""
    method = case.method
    if method.b_lr_ratio == 1.0 or method.base_trainable:
        return (trainable,)
    a = 0
    for t in case.targets:
        tensors = adapter_tensors(case.spec, method, case.rank, t)
        # a linear target's A comes first; a mixture of experts' wrapped weights come as (A, B) pairs
        a += sum(n for j, (n, trains) in enumerate(tensors) if trains and (j % 2 == 0 if t in MOE_TARGETS else j == 0))
    a *= case.spec.num_layers
    return a, trainable - a


def optimizer_state_bytes(optimizer: str, numel: int, param_bytes: int) -> int:
    """Optimizer state of one trainable tensor of numel elements stored in param_bytes each."""
    return OPTIMIZERS[optimizer].state_bytes(numel, param_bytes)
