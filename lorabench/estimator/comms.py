"""Communication per step under DDP, ZeRO-2 and FSDP, its time on the GPUs' links, and the step time with and
without overlap. Pure Python.

Volumes are bytes one GPU sends per optimizer step (it receives as many) with NCCL's ring algorithms: an
all-gather or reduce-scatter of S bytes in N equal chunks sends N - 1 chunks of S / N from each GPU; an
all-reduce is a reduce-scatter then an all-gather, 2 (N - 1) / N S (Patarasuk & Yuan 2009; the ZeRO paper,
Rajbhandari et al. 2020, sec. 7.1, counts the same per GPU at large N: 2 Psi for DDP and ZeRO-2, 3 Psi for
ZeRO-3, Psi the parameters' bytes). Here S is what the engine moves:
- ddp: the trainable gradients (the Reducer's buckets) all-reduced;
- zero2 and fsdp: each group's padded buffer (N ceil(dim0/N) rows of each tensor) all-gathered, and the
  trainable gradients' padded buffer reduce-scattered. fsdp gathers each layer in forward and again in
  backward, the root once (it is not resharded after forward); zero2 gathers every group once. Frozen
  parameters (a LoRA base) are all-gathered but never reduce-scattered: under fsdp a LoRA step moves the frozen
  base twice, while DDP moves only the adapters' gradients.
Every micro-batch communicates (DDP all-reduces and fully_shard reduce-scatters each backward unless told not
to: no_sync / set_requires_gradient_sync(False)); so does every gathered forward and backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lorabench.estimator.compute import StepTime
from lorabench.gpus import GPU, node_of
from lorabench.estimator.sharding import Parallel, Plan, padded_rows


@dataclass(frozen=True)
class CommVolume:
    """Bytes one GPU sends per optimizer step, per collective (ring algorithms; it receives as many)."""

    all_gather_bytes: int
    reduce_scatter_bytes: int
    all_reduce_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.all_gather_bytes + self.reduce_scatter_bytes + self.all_reduce_bytes


def comm_volume(plan: Plan, parallel: Parallel) -> CommVolume:
    """Bytes one GPU sends in one optimizer step (all micro-batches) under parallel (see the module docstring).
    The all-reduce of S bytes sends 2 (N - 1) S / N, rounded down; the others are whole padded chunks."""
    parallel.validate()
    n, s, k = parallel.gpus, parallel.strategy, plan.setup.grad_accum
    if n == 1 or parallel.sharding == "none":
        return CommVolume(0, 0, 0)
    if not s.shards_params:  # ddp
        return CommVolume(0, 0, k * (2 * (n - 1) * plan.parts.gradients_bytes // n))
    layout = plan.layout

    def chunk(tensors, trainable_only: bool = False) -> int:  # one GPU's padded shard of a group, in bytes
        return sum(padded_rows(t.dim0, n) * t.rest * t.elem_bytes for t in tensors
                   if t.sharded and (t.trainable or not trainable_only))

    gathers = 1 if s.keeps_gathered else 2
    gathered = chunk(layout.root) + gathers * layout.num_layers * chunk(layout.layer)
    reduced = chunk(layout.root, True) + layout.num_layers * chunk(layout.layer, True)
    return CommVolume(k * (n - 1) * gathered, k * (n - 1) * reduced, 0)


@dataclass(frozen=True)
class Link:
    """The link a ring over `gpus` GPUs is bound by: the interconnect within a server, the network across."""

    name: str
    bytes_s: float  # per direction: a ring sends and receives at once, each at this rate
    across_nodes: bool


def ring_link(gpu: GPU, gpus: int) -> Optional[Link]:
    """The slowest link a ring over `gpus` of `gpu` crosses, at its per-direction rate: half the catalog's
    both-directions figure (gpus.GPU.interconnect_bytes_s, gpus.Node.network_bytes_s). None across servers where
    the catalog knows no network (PCIe cards)."""
    node = node_of(gpu)
    if gpus <= node.gpus:
        return Link(gpu.interconnect, gpu.interconnect_bytes_s / 2, False)
    if not node.network_bytes_s:
        return None
    return Link(node.network, node.network_bytes_s / 2, True)


@dataclass(frozen=True)
class ParallelTime:
    """One optimizer step on each of N GPUs, communication included.

    Attributes:
        comm_ms: the step's collectives at the link's per-direction rate (None: no link known).
        compute_ms: forward and backward of this GPU's batch (compute.estimate_step_time).
        optimizer_ms: the optimizer step over this GPU's share (1/N of the elements under zero2/fsdp).
        step_ms_no_overlap: compute + communication + optimizer, one after another.
        step_ms_overlap: max(compute, communication) + optimizer: the collectives hidden behind forward and
            backward as far as they last (FSDP's prefetch, DDP's bucketed all-reduce); the optimizer step waits
            for the last gradient. A bound: the first all-gather and the last reduce-scatter are never hidden.
        link: the link's name; link_bytes_s: its per-direction rate.
    """

    comm_ms: Optional[float]
    compute_ms: float
    optimizer_ms: float
    step_ms_no_overlap: Optional[float]
    step_ms_overlap: Optional[float]
    link: Optional[str]
    link_bytes_s: Optional[float]


def parallel_step_time(step: StepTime, volume: CommVolume, parallel: Parallel, gpu: GPU) -> ParallelTime:
    """The step time of one GPU (step: its own batch, whole optimizer) with communication, with and without
    overlap. No NCCL efficiency is applied: the link's datasheet rate, so comm_ms is a lower bound."""
    shares = parallel.strategy.shards_optimizer
    optimizer = step.optimizer_ms / parallel.gpus if shares else step.optimizer_ms
    compute = step.forward_ms + step.backward_ms
    if not volume.total_bytes:
        return ParallelTime(0.0, compute, optimizer, compute + optimizer, compute + optimizer, None, None)
    link = ring_link(gpu, parallel.gpus)
    if link is None:
        return ParallelTime(None, compute, optimizer, None, None, None, None)
    comm = 1e3 * volume.total_bytes / link.bytes_s
    return ParallelTime(comm, compute, optimizer, compute + comm + optimizer, max(compute, comm) + optimizer,
                        link.name, link.bytes_s)
