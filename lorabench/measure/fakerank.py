"""Rank 0 of a data-parallel step, traced in one process: torch's fake process group (backend "fake",
torch.testing._internal.distributed.fake_pg: every collective a no-op that keeps its tensors' shapes, the way
torch's own FSDPMemTracker runs one rank) joined for the trace alone, and the bench's strategies
(lorabench.measure.distributed.parallelize) applied to the fake-tensor model as to a real rank's.

Traced: ZeRO-2 and FSDP2 (fully_shard), whose DTensor shards and all-gather buffers are fake tensors made by ops
the live-tensor tracker sees (and UntypedStorage.resize_, which it wraps). Collectives are not counted (their bytes
stay 0 in the rows; the analytic model's comm_* fields count them).

Not traced: DDP. Its C++ Reducer allocates the gradient buckets with the parameters' options outside any
dispatch mode (real CPU memory, as large as the trainable gradients, unseen by the tracker), and under the fake
mode its set-up reads tensor data (the ranks' parameter shapes and, before the second forward, the bucket order);
the fake group's all-reduce also completes with no value, which its built-in hook refuses.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence

import torch

from lorabench.errors import LorabenchError
from lorabench.measure.answer import TRACED_SHARDINGS, not_traced
from lorabench.measure.distributed import parallelize

@contextlib.contextmanager
def fake_process_group(world: int) -> Iterator[None]:
    """This process as rank 0 of `world` in a fake process group, destroyed on the way out (also on an error).

    Raises:
        LorabenchError: a real process group is already initialised here (a torchrun worker): the trace would
            replace it.
    """
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    if dist.is_initialized():
        raise LorabenchError("a process group is already initialised in this process: a sharded step is traced "
                             "in a fake one of its own, so trace it from a process outside torchrun.")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def rank_wrap(sharding: str, layers: Sequence[torch.nn.Module]) -> Callable[[torch.nn.Module], torch.nn.Module]:
    """The strategy as a builder's wrap, for rank 0 under fake_process_group; layers: the decoder layers FSDP
    shards one by one.

    Raises:
        LorabenchError: a strategy not traced.
    """
    if sharding not in TRACED_SHARDINGS:
        raise LorabenchError(not_traced(sharding))
    return lambda model: parallelize(model, sharding, torch.device("cpu"), layers=layers)


def sharded_wrap(first: Optional[Callable], then: Callable) -> Callable:
    """A wrap that runs `first` (making the tensors fake; None: nothing), then `then` (the strategy)."""
    return then if first is None else (lambda model: then(first(model)))


__all__ = ["fake_process_group", "rank_wrap", "sharded_wrap"]
