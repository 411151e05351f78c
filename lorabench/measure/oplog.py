"""Every op of a traced step, as the step-time model counts ops (lorabench.estimator.ops.Op): a matrix product with
its FLOPs, a fused attention kernel with its FLOPs, or a memory-bound op with the bytes it reads and writes, in its
phase. Read off the dispatcher while the step runs on fake tensors, so the ops are the ones transformers, PEFT and
torch's optimizer run, not a description of them.

- FLOPs: torch.utils.flop_counter's formulas (what FlopCounterMode counts); the CPU's flash attention kernels
  (the trace's stand-ins for CUDA's, measure.traced) and grouped expert products counted by the same rules; a
  causal attention kernel at half its formula's count, the blocks FlashAttention does not skip (the analytic
  model's s / 2 keys a query).
- Bytes: each tensor argument and result, at most its storage (a broadcast operand is read once).
- A mixture of experts' routing (the router's top-k over its experts) is kept as an op of its own: its measured
  stall on a GPU (estimator.stepwork.MOE_STALL_S) is charged for it, as the analytic model charges it.
- Views, aliases, allocations without a kernel (empty, detach, reshape to a view) and what is not aten's (a
  tensor's device, profiler marks) are not ops.

Ops are kept as counts of identical ones, {(phase, kind, flops, bytes, dtype bytes): runs}, which add and subtract
across cuts of a model (measure.traced sums the depth with them).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from lorabench.estimator.traced_rows import ROUTING

aten = torch.ops.aten
OpKey = Tuple[str, str, int, int, int]  # phase, kind, flops, bytes, dtype bytes


# The CPU's fused attention, counted as CUDA's flash kernel is (same arguments first)
ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu: aten._scaled_dot_product_flash_attention,
             aten._scaled_dot_product_flash_attention_for_cpu_backward:
                 aten._scaled_dot_product_flash_attention_backward}
FUSED_ATTENTION = {aten._scaled_dot_product_flash_attention, aten._scaled_dot_product_flash_attention_backward,
                   aten._scaled_dot_product_efficient_attention,
                   aten._scaled_dot_product_efficient_attention_backward,
                   aten._scaled_dot_product_cudnn_attention, aten._scaled_dot_product_cudnn_attention_backward,
                   aten._flash_attention_forward, aten._flash_attention_backward,
                   aten._efficient_attention_forward, aten._efficient_attention_backward}
# No kernel: metadata, allocation without a fill, a scalar read
NOT_KERNELS = {aten.detach, aten.alias, aten.lift_fresh, aten._unsafe_view, aten.empty, aten.empty_like,
               aten.empty_strided, aten.new_empty, aten.new_empty_strided, aten._local_scalar_dense,
               aten.set_, aten.resize_, aten.sym_size, aten.sym_stride, aten.sym_numel, aten.sym_storage_offset}


def _bytes(t: torch.Tensor) -> int:
    """What reading or writing t moves: its elements, at most its storage (a broadcast view's is smaller)."""
    n = t.numel() * t.element_size()
    try:
        return min(n, t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return n


def _written(func, args, kwargs) -> List[torch.Tensor]:
    """The tensors an op's schema marks written (Tensor(a!) and Tensor(a!)[] arguments)."""
    out = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            given = kwargs.get(arg.name, args[i] if i < len(args) else None)
            out += [t for t in tree_flatten(given)[0] if isinstance(t, torch.Tensor)]
    return out


def _causal(func, args, kwargs) -> bool:
    """Whether an attention kernel runs causally (its is_causal argument): FlashAttention then skips the blocks
    above the diagonal, half the products, where torch's formulas count them all."""
    for i, arg in enumerate(func._schema.arguments):
        if arg.name == "is_causal":
            return bool(kwargs.get("is_causal", args[i] if i < len(args) else arg.default_value))
    return False


def _grouped_mm_flops(args) -> int:
    """torch._grouped_mm (transformers' grouped experts): [tokens, k] by each group's [k, n], 2 tokens k n."""
    a, b = args[0], args[1]
    return 2 * a.shape[0] * a.shape[-1] * b.shape[-1] if a.dim() == 2 and b.dim() == 3 else 0


class OpLog(TorchDispatchMode):
    """Counts the ops of a step by phase, each in the phase whose mark closes it (the loops' marks: "start", then
    "forward", "backward" per micro-batch and "optimizer"), as the memory probe reads each phase's peak. Holds
    no tensor."""

    def __init__(self, experts: int = 0) -> None:
        super().__init__()
        self.experts = experts  # a mixture of experts' count: its router's top-k marks a routing (a stall)
        self.open = False
        self.pending: Dict[Tuple[str, int, int, int], int] = {}
        self.ops: Dict[OpKey, int] = {}
        self.flops = 0

    def mark(self, name: str) -> None:
        if name in ("forward", "backward", "optimizer") and self.open:
            for (kind, flops, moved, dtype), n in self.pending.items():
                key = (name, kind, flops, moved, dtype)
                self.ops[key] = self.ops.get(key, 0) + n
        self.open = name != "optimizer"
        self.pending = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.open:
            self._count(func, args, kwargs, out)
        return out

    def _count(self, func, args, kwargs, out) -> None:
        packet = func.overloadpacket
        if func.namespace != "aten" or packet in NOT_KERNELS or func.is_view:  # prim.device, profiler marks: no kernel
            return
        if packet is aten.topk and self.experts and args[0].shape[-1] == self.experts:  # a router picks experts
            key = (ROUTING, self.experts, 0, 0)
            self.pending[key] = self.pending.get(key, 0) + 1
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        # what it writes: its results, or, where an in-place op returns nothing (torch._foreach_mul_), the
        # arguments its schema marks written
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)] or _written(func, args, kwargs)
        moved = sum(_bytes(t) for t in inputs + outputs)
        flops, kind = 0, "stream"
        counted = ATTENTION.get(packet, packet)
        if counted in flop_registry:
            flops = int(flop_registry[counted](*args, **kwargs, out_val=out))
            kind = "attention" if counted in FUSED_ATTENTION else "gemm"
            if kind == "attention" and _causal(func, args, kwargs):  # s / 2 keys a query, as the analytic model
                flops //= 2
        elif packet is getattr(aten, "_grouped_mm", None):
            flops, kind = _grouped_mm_flops(args), "gemm"
        dtype = inputs[0].element_size() if inputs and kind != "stream" else 2
        key = (kind, flops, moved, dtype)
        self.pending[key] = self.pending.get(key, 0) + 1
        self.flops += flops


def as_list(ops: Dict[OpKey, int]) -> List[List]:
    """ops as JSON keeps them: [[phase, kind, flops, bytes, dtype bytes, runs], ...]."""
    return [list(k) + [n] for k, n in sorted(ops.items())]


__all__ = ["OpLog", "as_list"]
