"""Past one GPU: what each GPU holds, component by component, under DDP, ZeRO-2 and FSDP. Pure Python.

STRATEGIES is one table of what each strategy shards. rank_memory gives one GPU's bytes (GPU `gpu_rank` of
`gpus`) as the engine holds them, from the model's tensors (lorabench.estimator.layout) and the one-GPU step
(lorabench.estimator.memory.StepParts): activations, logits and the runtime are each GPU's own, whatever the strategy,
since each GPU runs its own batch of `batch_size` sequences.

FSDP2 (torch.distributed.fsdp.fully_shard), the engine of zero2 and fsdp here, is lorabench.estimator.fsdp_memory: each
parameter a dim-0 DTensor shard padded to ceil(dim0 / N) rows (padded_rows, shard_rows), and what is gathered
and reduce-scattered at each moment of the step. DDP keeps a whole replica and a flat copy of the trainable
gradients in its buckets. Every rule was checked against measured steps on 2 and 3 CPU processes (gloo) with
`lorabench bench --nproc` (tests/test_distributed.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from lorabench.errors import LorabenchError
from lorabench.gpus import GPU
# (the estimator's API: these names are read from here too)
from lorabench.estimator.fsdp_memory import floor_held, padded_rows, shard_rows, sharded_held  # noqa: F401
from lorabench.estimator.parallel import MAX_GPUS, STRATEGIES, Parallel, Strategy  # noqa: F401
from lorabench.estimator.plan import Plan, plan_step  # noqa: F401
from lorabench.estimator.memory import ALLOCATOR_ALLOWANCE, Held, need_bytes

@dataclass(frozen=True)
class RankMemory:
    """What one GPU of `gpus` holds, component by component (bytes), and its peak per phase.

    Attributes:
        weights_bytes, adapter_bytes: base and adapter parameters on the GPU: padded shards under zero2/fsdp,
            plus what no strategy shards (buffers, quantization constants).
        gradients_bytes: gradients on the GPU after backward (padded shards under zero2/fsdp).
        optimizer_bytes, master_bytes, method_state_bytes: for the GPU's own (unpadded) elements under
            zero2/fsdp.
        bucket_bytes: DDP's all-reduce buckets.
        gather_bytes: parameters all-gathered for compute, alive through forward and backward: fsdp the root's
            and two layers' (one computing, one prefetched); zero2 every layer's and the root's.
        reduce_scatter_bytes: the larger of a layer's and of the root's unsharded gradients with their padded
            reduce-scatter input (zero2/fsdp).
        optimizer_temp_bytes: the optimizer step's temporaries on the GPU.
        cpu_offload_bytes: what this GPU's process keeps in host memory (--cpu-offload).
        forward_peak_bytes ... peak_bytes, peak_phase: as in MemoryEstimate, for this GPU.
        device_bytes: peak_bytes + overhead_bytes (the runtime, each GPU's own).
    """

    gpus: int
    sharding: str
    cpu_offload: bool
    gpu_rank: int
    weights_bytes: int
    adapter_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    master_bytes: int
    method_state_bytes: int
    bucket_bytes: int
    gather_bytes: int
    reduce_scatter_bytes: int
    optimizer_temp_bytes: int
    cpu_offload_bytes: int
    activations_bytes: int
    logits_bytes: int
    overhead_bytes: int
    forward_peak_bytes: int
    backward_peak_bytes: int
    optimizer_peak_bytes: int
    peak_bytes: int
    peak_phase: str
    device_bytes: int
    held: Optional[Held] = field(repr=False, compare=False, default=None)  # what phase_peaks was given


def rank_memory(plan: Plan, parallel: Parallel = Parallel(), gpu_rank: int = 0) -> RankMemory:
    """What GPU `gpu_rank` of parallel.gpus holds, per component and at its peak per phase. Rank 0 holds the
    most (torch.chunk gives it a full chunk of every tensor): it is the GPU the answers are for.

    Raises:
        LorabenchError: a bad Parallel, or gpu_rank not in [0, gpus).
    """
    parallel.validate()
    n, s, off, parts = parallel.gpus, parallel.strategy, parallel.cpu_offload, plan.parts
    if not (isinstance(gpu_rank, int) and 0 <= gpu_rank < n):
        raise LorabenchError(f"gpu rank must be an integer from 0 to {n - 1}, got {gpu_rank!r}.")
    if s.shards_params:
        c, held = sharded_held(plan, parallel, gpu_rank)
        weights, adapter, grads, buckets = c["weights"], c["adapter"], held.grads_bytes, 0
        optim, master, method_state, temp = c["optim"], c["master"], c["method_state"], held.optimizer_temp_bytes
        gather, rs, host = c["gather"], c["reduce_scatter"], c["host"]
        if off:
            weights, adapter, optim, master = c["weights_replicated"], c["adapter_replicated"], 0, 0
    else:
        weights, adapter, grads = parts.weights_bytes, parts.adapter_bytes, parts.gradients_bytes
        optim, master, method_state = parts.optimizer_bytes, parts.master_bytes, parts.method_state_bytes
        temp, gather, rs = parts.optimizer_temp_bytes, 0, 0
        buckets = grads if s.buckets else 0
        host = 0
        if off:  # the optimizer steps on the host, with a host copy of the gradients (as ZeRO-Offload)
            host, optim, master, temp = optim + master + temp + grads, 0, 0, 0
        one = parts.held()
        held = Held(weights + adapter + optim + master + method_state + buckets, grads, one.accum_bytes,
                    one.backward_grads_bytes, one.end_grads_bytes, temp)
    phases = parts.phase_peaks(held)
    phase = max(phases, key=phases.get)
    return RankMemory(gpus=n, sharding=parallel.sharding, cpu_offload=off, gpu_rank=gpu_rank, weights_bytes=weights,
                      adapter_bytes=adapter, gradients_bytes=grads, optimizer_bytes=optim, master_bytes=master,
                      method_state_bytes=method_state, bucket_bytes=buckets, gather_bytes=gather,
                      reduce_scatter_bytes=rs, optimizer_temp_bytes=temp, cpu_offload_bytes=host,
                      activations_bytes=parts.act.saved_bytes, logits_bytes=parts.act.logits_backward_bytes,
                      overhead_bytes=parts.overhead_bytes, forward_peak_bytes=phases["forward"],
                      backward_peak_bytes=phases["backward"], optimizer_peak_bytes=phases["optimizer"],
                      peak_bytes=phases[phase], peak_phase=phase, device_bytes=phases[phase] + parts.overhead_bytes,
                      held=held)


def plan_need_bytes(plan: Plan, parallel: Parallel = Parallel(), allowance: float = ALLOCATOR_ALLOWANCE) -> int:
    """What each GPU must have (its largest, rank 0): peak, runtime and the allocator allowance."""
    if parallel.single:
        return need_bytes(plan.parts, allowance)
    return need_bytes(plan.parts, allowance, rank_memory(plan, parallel).held)


def one_gpu_need(plan: Plan, sharding: str, allowance: float = ALLOCATOR_ALLOWANCE, cpu_offload: bool = False) -> int:
    """What one GPU needs to hold the step under `sharding` at its best: the whole step; with --cpu-offload
    also fully sharded on the one GPU, which sends its parameters and gradients to the host (FSDP2's
    CPUOffloadPolicy) where the whole step keeps them."""
    need = plan_need_bytes(plan, Parallel(1, "none", cpu_offload), allowance)
    if cpu_offload and STRATEGIES[sharding].offloads_params:
        need = min(need, plan_need_bytes(plan, Parallel(1, sharding, True), allowance))
    return need


def fewest_gpus(plan: Plan, sharding: str, capacity: int, allowance: float = ALLOCATOR_ALLOWANCE,
                cpu_offload: bool = False, max_gpus: int = MAX_GPUS) -> Optional[int]:
    """The fewest GPUs of `capacity` bytes that hold the step under `sharding`: 1 when one GPU holds it whole
    (ddp: when one replica, buckets included, fits, since each GPU holds one); None when no count up to
    max_gpus does.

    Counted up from 2, every count tried: the need per GPU is not monotone in N. FSDP2 pads each tensor's dim 0
    to a multiple of N and all-gathers the padding, so past a tensor's dim 0 (a mixture's fused experts have
    E rows) each GPU holds more as N grows, and a count that fits can lie below one that does not. The only
    shortcut is a floor that no count goes under (fsdp_memory.floor_held): the activations, logits and
    temporaries, which each GPU holds whole whatever the strategy, and what is gathered or replicated."""
    if sharding == "ddp":
        fits = plan_need_bytes(plan, Parallel(1, "ddp", cpu_offload), allowance) <= capacity
        return 1 if fits else None
    if one_gpu_need(plan, sharding, allowance, cpu_offload) <= capacity:
        return 1
    if need_bytes(plan.parts, allowance, floor_held(plan, Parallel(2, sharding, cpu_offload))) > capacity:
        return None
    return next((n for n in range(2, max_gpus + 1)
                 if plan_need_bytes(plan, Parallel(n, sharding, cpu_offload), allowance) <= capacity), None)


def padding_note(plan: Plan, parallel: Parallel) -> Optional[str]:
    """A note when FSDP2's padding makes each of parallel.gpus GPUs hold more than each of fewer GPUs would
    (checked at N/2, N/4, ..., 2): torch.chunk pads every tensor's dim 0 to N ceil(dim0 / N) rows and the
    all-gathers carry the padding, so past a tensor's dim 0 more GPUs only add bytes. Names the tensor that
    wastes the most."""
    n = parallel.gpus
    if not parallel.strategy.shards_params or n <= 2:
        return None
    here = rank_memory(plan, parallel).peak_bytes
    peaks, m = {}, n // 2
    while m >= 2:
        peaks[m] = rank_memory(plan, replace(parallel, gpus=m)).peak_bytes
        m //= 2
    best = min(peaks, key=peaks.get) if peaks else None
    if best is None or here <= peaks[best]:
        return None
    there = peaks[best]
    waste = {t.name: (n * padded_rows(t.dim0, n) - t.dim0) * t.rest * t.elem_bytes * count
             for t, count in plan.layout.tensors() if t.sharded}
    name = max(waste, key=waste.get)
    dim0 = next(t.dim0 for t, _ in plan.layout.tensors() if t.name == name)
    return (f"each GPU holds {here / 2 ** 30:,.2f} GiB at {n:,} GPUs under {parallel.sharding}, more than the "
            f"{there / 2 ** 30:,.2f} GiB at {best:,}: FSDP2 pads each tensor's dim 0 to a multiple of the GPU count "
            f"and all-gathers the padding; {plan.spec.name}'s {name} has {dim0:,} rows. Past that, more GPUs add "
            "bytes.")


def gpus_needed_note(plan: Plan, fit: "Fit", cpu_offload: bool = False,
                     allowance: float = ALLOCATOR_ALLOWANCE) -> Optional[str]:
    """Why a strategy's gpus_needed is null, for each that is: DDP's replica (its buckets a second copy of the
    trainable gradients) exceeds one GPU, or what each GPU of zero2/fsdp holds whatever their count (the
    activations, logits and temporaries, a gathered layer) does."""
    why = []
    if fit.gpus_needed_ddp is None:
        need = plan_need_bytes(plan, Parallel(1, "ddp", cpu_offload), allowance)
        why.append(f"ddp: a replica with its buckets needs {need / 2 ** 30:,.2f} GiB on each GPU")
    floors = {s: need_bytes(plan.parts, allowance, floor_held(plan, Parallel(2, s, cpu_offload)))
              for s in ("zero2", "fsdp") if getattr(fit, f"gpus_needed_{s}") is None}
    for s, need in floors.items():
        if need > fit.gpu_memory_bytes:
            why.append(f"{s}: what each GPU holds whatever their count (activations, logits, a gathered layer) "
                       f"needs {need / 2 ** 30:,.2f} GiB")
        else:
            why.append(f"{s}: no count up to {MAX_GPUS:,} leaves each GPU under its "
                       f"{fit.gpu_memory_bytes / 2 ** 30:,.2f} GiB (FSDP2 pads each tensor to the count)")
    if not why:
        return None
    return f"no number of {fit.gpu} GPUs holds the step under " + "; ".join(why) + "."


@dataclass(frozen=True)
class Fit:
    """Whether a step fits its GPUs, and the fewest GPUs each strategy needs.

    Attributes:
        fits: each of parallel.gpus GPUs holds its share (peak, runtime and allowance).
        allowance_bytes: the allocator allowance counted on one GPU (fraction x its peak).
        spare_bytes: memory left on one GPU after peak, runtime and allowance (negative: it does not fit).
        gpus_needed: gpus_needed_fsdp, the public field of old.
        gpus_needed_ddp: 1 when a replica fits one GPU, else None.
        gpus_needed_zero2, gpus_needed_fsdp: the fewest GPUs (1: it fits one whole); None when no number does.
        per_gpu_bytes: what each of gpus_needed GPUs holds under fsdp (peak and runtime).
    """

    gpu: str
    gpu_memory_bytes: int
    fits: bool
    gpus_needed: Optional[int]
    per_gpu_bytes: Optional[int]
    allowance_bytes: int
    spare_bytes: int
    gpus_needed_ddp: Optional[int]
    gpus_needed_zero2: Optional[int]
    gpus_needed_fsdp: Optional[int]


def fit_on_gpu(plan: Plan, gpu: GPU, parallel: Parallel = Parallel(), allowance: float = ALLOCATOR_ALLOWANCE,
               max_gpus: int = MAX_GPUS) -> Fit:
    """Whether parallel.gpus of `gpu` hold the step under parallel.sharding, and how many each strategy needs
    (with the same --cpu-offload). Activations, logits and the runtime stay whole on every GPU; each GPU also
    keeps `allowance` x its peak free for the allocator (memory.ALLOCATOR_ALLOWANCE)."""
    cap = gpu.memory_bytes
    peak = rank_memory(plan, parallel).peak_bytes if not parallel.single else max(plan.parts.phase_peaks().values())
    spare = cap - plan_need_bytes(plan, parallel, allowance)
    off = parallel.cpu_offload
    needed = {s: fewest_gpus(plan, s, cap, allowance, off, max_gpus) for s in ("ddp", "zero2", "fsdp")}
    n = needed["fsdp"]
    per_gpu = (None if n is None else one_gpu_need(plan, "fsdp", 0.0, off) if n == 1
               else plan_need_bytes(plan, Parallel(n, "fsdp", off), 0.0))
    return Fit(gpu.name, cap, spare >= 0, n, per_gpu, int(allowance * peak), spare, needed["ddp"], needed["zero2"],
               needed["fsdp"])
