"""The trace's rule for a mixture of experts whose step allocates by its routing (experts run one by one over
the tokens routed to each: DBRX): the routing is given, balanced. Fake tensors hold no values, so the router's
choice cannot be traced; its top-k over the experts is replaced by a fixed choice, token t's j-th expert
(t k + j) mod E, which sends every expert T k / E tokens (the remainder one each), the balance the analytic model
assumes for every mixture of experts. The choice is a constant the fake tensors hold (measure.images.holding), so
what is computed from it alone (one_hot, nonzero, where) is computed for real and every expert's batch has its
balanced size; the weights are the router's own values at those experts (gather), so gradients flow as through
top-k. The same rule runs on real tensors, so that a real CPU step can be held to the trace.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._mode_utils import no_dispatch
from torch.utils._python_dispatch import TorchDispatchMode

from lorabench.measure.images import held_tensor, holding

aten = torch.ops.aten


# Where transformers' configs give a mixture of experts' count of routed experts (DBRX: in its ffn_config)
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def experts(model) -> int:
    """The model's count of routed experts (0: no mixture of experts)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for where in (text, getattr(text, "ffn_config", None)):
        found = next((v for k in EXPERT_KEYS for v in (getattr(where, k, None),) if isinstance(v, int) and v > 1), 0)
        if found:
            return found
    return 0


def balanced_choice(rows: int, k: int, experts: int) -> torch.Tensor:
    """[rows, k] int64: row t's j-th expert (t k + j) mod experts (k distinct experts a row for k <= experts)."""
    return (torch.arange(rows)[:, None] * k + torch.arange(k)[None, :]) % experts


class BalancedRouting(TorchDispatchMode):
    """Every top-k over `experts` values on the last dimension answered by balanced_choice (module docstring)."""

    def __init__(self, experts: int, mode: Optional[FakeTensorMode]):
        super().__init__()
        self.experts, self.mode = experts, mode

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket is aten.topk and self._routes(args, kwargs):
            x, k = args[0], args[1]
            with no_dispatch():
                choice = balanced_choice(x.numel() // self.experts, k, self.experts).reshape(*x.shape[:-1], k)
            index = held_tensor(choice, self.mode) if self.mode is not None else choice.to(x.device)
            return aten.gather.default(x, -1, index), index
        return func(*args, **kwargs)

    def _routes(self, args, kwargs) -> bool:
        x = args[0]
        dim = kwargs.get("dim", args[2] if len(args) > 2 else -1)
        return x.shape[-1] == self.experts and dim in (-1, x.dim() - 1)


@contextlib.contextmanager
def balanced(experts: int, mode: Optional[FakeTensorMode]):
    """The rule (module docstring) while a step runs: enter it after the fake mode (None: real tensors) and
    before the tracker. experts 0: nothing."""
    if not experts:
        yield
        return
    with contextlib.ExitStack() as stack:
        if mode is not None:
            stack.enter_context(holding(mode))
        stack.enter_context(BalancedRouting(experts, mode))
        yield


ROUTING_NOTE = ("its experts run one by one over the tokens routed to each, so its memory depends on the routing, "
                "which fake tensors do not hold: traced with the routing given, balanced (token t's j-th expert "
                "(t k + j) mod E, T k / E tokens an expert), as the analytic model assumes for every mixture of "
                "experts.")

__all__ = ["EXPERT_KEYS", "experts", "balanced_choice", "BalancedRouting", "balanced", "ROUTING_NOTE"]
