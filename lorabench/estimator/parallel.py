"""What is shared over GPUs, as data: the strategies (what each shards) and a Parallel setting (--gpus,
--sharding, --cpu-offload). Read by sharding (one GPU's bytes) and fsdp_memory (FSDP2's rules), which import it
and not each other; a Plan (one step and the model's tensors) is in plan.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

from lorabench.errors import LorabenchError
from lorabench.spelling import option

# --gpus and the fewest-GPUs search stop here: data parallelism alone (DDP, ZeRO, FSDP) over more GPUs than
# this is not how anyone fine-tunes, and FSDP2's padding only grows with N past a tensor's dim 0.
MAX_GPUS = 4096


@dataclass(frozen=True)
class Strategy:
    """What a data-parallel strategy splits over N GPUs (the rest every GPU holds whole).

    Attributes:
        label: what people call it.
        shards_params: parameters rest as 1/N shards, all-gathered per layer to compute.
        shards_grads: gradients are reduce-scattered into 1/N shards.
        shards_optimizer: optimizer states and master weights are for the GPU's 1/N.
        keeps_gathered: layers stay gathered from their forward to their backward (ZeRO-2), rather than
            freed after forward and gathered again (ZeRO-3).
        buckets: DDP's all-reduce buckets, a flat copy of every trainable gradient.
        offloads_params: with --cpu-offload, the sharded parameters and gradients go to the host too (FSDP2's
            CPUOffloadPolicy); the optimizer states and master weights go under every strategy.
        source: what it is, and where its rules come from.
    """

    name: str
    label: str
    shards_params: bool
    shards_grads: bool
    shards_optimizer: bool
    keeps_gathered: bool
    buckets: bool
    offloads_params: bool
    source: str


STRATEGIES: Dict[str, Strategy] = {s.name: s for s in (
    Strategy("none", "one GPU", False, False, False, False, False, False,
             "one GPU runs the whole step (lorabench.estimator.memory)"),
    Strategy("ddp", "DDP, a replica each", False, False, False, False, True, False,
             "torch DistributedDataParallel (torch.nn.parallel.distributed; Li et al. 2020, arXiv:2006.15704): a "
             "whole replica per GPU; trainable gradients all-reduced in buckets of bucket_cap_mb=25 MiB, the "
             "first 1 MiB; with gradient_as_bucket_view=False (the default) the Reducer's flat buckets hold a "
             "second copy of every trainable gradient for the model's life"),
    Strategy("zero2", "ZeRO-2: FSDP2 without resharding after forward", True, True, True, True, False, True,
             "ZeRO stage 2, P_os+g (Rajbhandari et al. 2020, arXiv:1910.02054, sec. 5): gradients and optimizer "
             "states partitioned, parameters whole through forward and backward; as torch runs it, fully_shard "
             "with reshard_after_forward=False (FSDP1's SHARD_GRAD_OP): parameters rest as 1/N shards, each "
             "layer is gathered once in forward and kept until its backward"),
    Strategy("fsdp", "FSDP2, ZeRO-3", True, True, True, False, False, True,
             "ZeRO stage 3, P_os+g+p (Rajbhandari et al. 2020, sec. 5): parameters partitioned too; torch's "
             "FSDP2 (fully_shard on each decoder layer and the root; the FSDP2 design notes, "
             "pytorch/pytorch#114299): a layer is gathered for its forward and again for its backward"),
)}


@dataclass(frozen=True)
class Parallel:
    """How many GPUs share the step and how (`--gpus`, `--sharding`, `--cpu-offload`)."""

    gpus: int = 1
    sharding: str = "none"
    cpu_offload: bool = False

    def validate(self) -> None:
        """Raises LorabenchError for a bad count or strategy, or several GPUs with no strategy."""
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or not 1 <= self.gpus <= MAX_GPUS:
            raise LorabenchError(f"GPUs must be an integer from 1 to {MAX_GPUS:,}, got {self.gpus!r}.")
        if self.sharding not in STRATEGIES:
            raise LorabenchError(f"unknown sharding '{self.sharding}'; choose from {', '.join(STRATEGIES)}.")
        if self.gpus > 1 and self.sharding == "none":
            raise LorabenchError(f"{option('gpus', self.gpus)} needs {option('sharding')} ddp, zero2 or fsdp: how "
                                 "the GPUs share the step.")

    @property
    def strategy(self) -> Strategy:
        return STRATEGIES[self.sharding]

    @property
    def single(self) -> bool:
        """One GPU running the whole step: the one-GPU estimate as it is."""
        return self.sharding == "none" and not self.cpu_offload
