"""Sweeps of the estimation core as rows of plain numbers: one dict per (method, rank).

These rows are the public JSON contract of `lorabench params` / `lorabench memory` (see README):
renderers format them, nothing here turns a number into a string.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from lorabench.errors import LorabenchError
from lorabench.spelling import option
from lorabench.estimator.case import Case
from lorabench.estimator.compute import StepTime, device_for_gpu, estimate_step_time
from lorabench.estimator.cost import CostSetup, estimate_training_cost
from lorabench.estimator.flops import estimate_flops
from lorabench.gpus import GPU
from lorabench.estimator.comms import comm_volume, parallel_step_time
from lorabench.estimator.batches import batch_fields, typical_setup
from lorabench.estimator.memory import ALLOCATOR_ALLOWANCE, estimate_from_parts, estimate_memory, step_parts
from lorabench.estimator.setup import TrainingSetup
from lorabench.methods import Method
from lorabench.estimator.params import count_active_params, count_base_params, count_params
from lorabench.estimator.sharding import (MAX_GPUS, Parallel, Plan, fit_on_gpu, gpus_needed_note, padding_note,
                                rank_memory)
from lorabench.models.spec import ModelSpec


def _cases(methods: Sequence[Method], ranks: Sequence[int]):
    """(method, rank) pairs; methods without a rank (full) appear once, with rank None."""
    for method in methods:
        if method.uses_rank:
            for rank in ranks:
                yield method, rank
        else:
            yield method, None


def usable_methods(spec: ModelSpec, methods: Sequence[Method], ranks: Sequence[int],
                   targets) -> Tuple[List[Method], List[Tuple[Method, LorabenchError]]]:
    """The methods that can adapt spec's targets at every rank, and (method, why) for each one left out.

    A method only this model refuses (PEFT's DoRA cannot adapt a mixture of experts' fused experts) is left
    out with its reason; targets or ranks that no adapter method takes for this model are an error.

    Raises:
        LorabenchError: every adapter method asked for refuses spec's targets or ranks.
    """
    kept, refused = [], []
    for method in methods:
        try:
            for rank in ranks if method.uses_rank else [None]:
                count_params(spec, method, rank, targets)
            kept.append(method)
        except LorabenchError as exc:
            refused.append((method, exc))
    if refused and not any(m.uses_rank for m in kept):
        raise refused[0][1]  # bad input for this model, not one method's limit: the error
    return kept, refused


def spec_notes(spec: ModelSpec, targets: Optional[Iterable[str] | str]) -> List[str]:
    """What the answer for spec leaves out or assumes: the spec's own notes, a default target set PEFT does
    not define for the family, and a mixture of experts' active parameters."""
    notes = list(spec.notes)
    if targets is None and spec.arch.note_default and not spec.single_matrix:
        notes.append(f"PEFT has no default LoRA targets for {spec.arch.label}: "
                     f"{', '.join(spec.peft_name(t) for t in spec.default_targets)} assumed (-t to choose).")
    if spec.moe:
        notes.append(f"{spec.num_experts} experts, {spec.experts_per_token} per token: "
                     f"{count_active_params(spec):,} of {count_base_params(spec):,} parameters are active per "
                     "token (FLOPs use these); every expert's weights are resident.")
    return notes


def positions_note(spec: ModelSpec, seq_len: int) -> Optional[str]:
    """A note when the sequence is longer than a model's learned positions (GPT-2's 1,024): the model cannot
    run it, so the estimate is for one that could (what `bench` skips)."""
    if spec.max_positions and seq_len > spec.max_positions:
        return (f"{seq_len:,} tokens exceed {spec.name}'s {spec.max_positions:,} learned positions: the model cannot "
                f"run them (bench skips them); the figures are for a model with positions enough.")
    return None


def param_rows(spec: ModelSpec, methods: Sequence[Method], ranks: Sequence[int],
               targets: Optional[Iterable[str] | str] = None) -> List[Dict]:
    """Parameter counts for every (method, rank)."""
    rows = []
    notes = spec_notes(spec, targets)
    for method, rank in _cases(methods, ranks):
        c = count_params(spec, method, rank, targets)
        rows.append({
            "model": spec.name, "method": method.name, "rank": rank, "targets": ",".join(c.targets),
            "trainable_params": c.trainable_params, "total_params": c.total_params,
            "trainable_pct": c.trainable_pct, "base_params": c.base_params,
            "adapter_params": c.adapter_params, "pct_of_full": c.pct_of_full,
            "reduction": c.reduction, "shared_buffer_numel": c.shared_buffer_numel,
            "updates_base_weights": c.updates_base_weights, "active_params": count_active_params(spec),
            "family": spec.family, "notes": notes,
        })
    return rows


def step_time_fields(t: StepTime) -> Dict:
    """The step time's JSON fields (see README, "Time and cost")."""
    return {"mfu": t.mfu, "matmul_efficiency": t.matmul_efficiency, "step_ms": t.step_ms,
            "tokens_per_s": t.tokens_per_s, "step_ms_forward": t.forward_ms, "step_ms_backward": t.backward_ms,
            "step_ms_optimizer": t.optimizer_ms, "step_ms_matmul": t.matmul_ms, "step_ms_memory": t.memory_ms,
            "step_ms_overhead": t.overhead_ms}



def error_pct(estimate: Optional[int], measured: Optional[int]) -> Optional[float]:
    """How far an estimate is from what was measured, in % of the measurement (None without both)."""
    if estimate is None or not measured:
        return None
    return 100.0 * (estimate - measured) / measured


def cost_fields(t: StepTime, tokens_per_gpu_step: int, run: Optional[Parallel], cost: CostSetup,
                gpu: Optional[GPU]) -> Dict:
    """A training run's JSON fields on run's GPUs, t.step_ms driving them all (train_step_ms): None throughout
    when no number of GPUs holds the step (run None), or no tokens."""
    train = None if run is None else estimate_training_cost(t, tokens_per_gpu_step, run.gpus, cost, gpu)
    keys = ("train_tokens", "train_gpus", "train_sharding", "train_step_ms", "train_steps", "train_hours",
            "gpu_hours", "price_per_gpu_hour", "price_source", "cost_usd")
    if train is None:
        return dict.fromkeys(keys)
    return dict(zip(keys, (train.train_tokens, train.gpus, run.sharding, t.step_ms, train.train_steps,
                           train.train_hours, train.gpu_hours, train.price_per_gpu_hour, train.price_source,
                           train.cost_usd)))


def training_run(plan: Plan, parallel: Parallel, fit, t: StepTime, gpu: GPU) -> Tuple[Optional[Parallel], StepTime,
                                                                                    Optional[str]]:
    """The GPUs a training run takes and the step time that drives it: the GPUs asked for when they hold the
    step; else the fewest that do under the same sharding (fully sharded from one GPU or from DDP, which
    cannot spread a replica). On several GPUs the step is t with its communication overlapped. Returns (the
    Parallel, the step, None), or (None, t, why no run is priced)."""
    run = parallel
    if not fit.fits:
        sharding = parallel.sharding if parallel.strategy.shards_params else "fsdp"
        n = fit.gpus_needed_zero2 if sharding == "zero2" else fit.gpus_needed_fsdp
        if n is None:
            return None, t, (f"no training time or cost: no count of {gpu.name} GPUs up to {MAX_GPUS:,} holds "
                             f"the step under {sharding}.")
        run = Parallel() if n == 1 else Parallel(n, sharding, parallel.cpu_offload)
    if run.single:
        return run, t, None
    step = parallel_step_time(t, comm_volume(plan, run), run, gpu).step_ms_overlap
    if step is None:
        return None, t, (f"no training time or cost: no network between {gpu.name} servers is known for "
                         f"{run.gpus:,} GPUs.")
    return run, replace(t, step_ms=step), None


# The fields a row takes from one GPU's share when the step is spread over several (sharding.RankMemory).
RANK_FIELDS = ("weights_bytes", "adapter_bytes", "gradients_bytes", "optimizer_bytes", "master_bytes",
               "method_state_bytes", "forward_peak_bytes", "backward_peak_bytes", "optimizer_peak_bytes",
               "peak_bytes", "peak_phase", "device_bytes")


def parallel_fields(plan: Plan, parallel: Parallel) -> Dict:
    """The row's multi-GPU fields (see README, "Past one GPU"): how the GPUs share the step, what one GPU (the
    largest, rank 0) holds beyond the one-GPU components, and the bytes it sends per step."""
    rm = rank_memory(plan, parallel)
    volume = comm_volume(plan, parallel)
    return {"gpus": parallel.gpus, "sharding": parallel.sharding, "cpu_offload": parallel.cpu_offload,
            "bucket_bytes": rm.bucket_bytes, "gather_bytes": rm.gather_bytes,
            "reduce_scatter_bytes": rm.reduce_scatter_bytes, "cpu_offload_bytes": rm.cpu_offload_bytes,
            "comm_all_gather_bytes": volume.all_gather_bytes, "comm_reduce_scatter_bytes": volume.reduce_scatter_bytes,
            "comm_all_reduce_bytes": volume.all_reduce_bytes, "comm_bytes": volume.total_bytes}


def memory_rows(spec: ModelSpec, methods: Sequence[Method], ranks: Sequence[int],
                targets: Optional[Iterable[str] | str], setup: TrainingSetup,
                gpu: Optional[GPU] = None, mfu: Optional[float] = None,
                allowance: float = ALLOCATOR_ALLOWANCE, cost: Optional[CostSetup] = None,
                parallel: Parallel = Parallel()) -> List[Dict]:
    """Memory (and, with a GPU, fit and step time; with cost, training time and dollars) for every (method, rank).

    mfu: the achievable fraction of the GPU's dense peak in large matrix products (None: the time model's
    default, compute.MATMUL_EFFICIENCY); the row's "mfu" is the model-FLOPs utilisation the estimate implies.
    parallel: GPUs sharing the step; every memory field is then one GPU's (the largest, rank 0).
    """
    parallel.validate()
    rows = []
    for method, rank in _cases(methods, ranks):
        c = count_params(spec, method, rank, targets)
        case = Case(spec, method, rank, targets, setup, parallel)
        parts = step_parts(case, counts=c)
        plan = Plan(case, parts)
        est = estimate_from_parts(parts)
        row = {"model": spec.name, "engine": "analytic"}
        row.update(asdict(est))
        if not parallel.single:
            one_gpu = asdict(rank_memory(plan, parallel))
            row.update({k: one_gpu[k] for k in RANK_FIELDS})
        row["targets"] = ",".join(est.targets)
        extra = [positions_note(spec, setup.seq_len), padding_note(plan, parallel)]
        if gpu is not None and setup.uses_bf16 and not gpu.has_bf16:
            extra.append(f"the {gpu.name} has no bf16 arithmetic (NVIDIA's comes with Ampere): torch refuses or "
                         f"emulates a bf16 step there; {option('dtype')} fp16 or fp32 (with "
                         f"{option('adapter_dtype', 'fp32')}) is what it runs.")
        row["notes"] = list(dict.fromkeys(spec_notes(spec, targets) + list(est.notes) + [n for n in extra if n]))
        row.update({"batch_size": setup.batch_size, "seq_len": setup.seq_len, "dtype": setup.dtype,
                    "optimizer": setup.optimizer, "grad_checkpointing": setup.grad_checkpointing,
                    "loop": setup.loop, "autocast": setup.autocast, "grad_accum": setup.grad_accum,
                    "tokens_per_step": setup.tokens * setup.grad_accum, "loss": setup.loss,
                    "kbit_prepare": setup.kbit_prepare, "max_positions": spec.max_positions or None})
        typical = replace(case, targets=c.targets, setup=typical_setup(setup))
        row.update(batch_fields(setup))
        if setup.batched:
            row["typical_peak_bytes"] = estimate_memory(typical).peak_bytes
        real = row["real_tokens_per_step"]
        flops = estimate_flops(typical)
        row["step_flops"] = flops.step_flops
        row["flops_per_token"] = flops.flops_per_token
        row.update(parallel_fields(plan, parallel))
        if gpu is not None:
            fit = fit_on_gpu(plan, gpu, parallel, allowance=allowance)
            row["notes"] += [n for n in (gpus_needed_note(plan, fit, parallel.cpu_offload, allowance),) if n]
            t = estimate_step_time(typical, device_for_gpu(gpu, mfu), flops)
            if real != setup.tokens * setup.grad_accum:  # padding trains nothing: the real tokens per second
                t = replace(t, tokens_per_s=real / (t.step_ms / 1e3))
            row.update({"gpu": gpu.name, "gpu_memory_bytes": fit.gpu_memory_bytes, "fits": fit.fits,
                        "gpus_needed": fit.gpus_needed, "per_gpu_bytes": fit.per_gpu_bytes,
                        "allowance_fraction": allowance, "allowance_bytes": fit.allowance_bytes,
                        "spare_bytes": fit.spare_bytes})
            row.update(step_time_fields(t))
            pt = parallel_step_time(t, comm_volume(plan, parallel), parallel, gpu)
            row.update({"gpus_needed_ddp": fit.gpus_needed_ddp, "gpus_needed_zero2": fit.gpus_needed_zero2,
                        "gpus_needed_fsdp": fit.gpus_needed_fsdp, "link": pt.link, "link_bytes_s": pt.link_bytes_s,
                        "comm_ms": pt.comm_ms, "step_ms_no_overlap": pt.step_ms_no_overlap,
                        "step_ms_overlap": pt.step_ms_overlap})
            if cost is not None:  # one step time drives the run: on several GPUs, with communication overlapped
                run, timed, why = training_run(plan, parallel, fit, t, gpu)
                row.update(cost_fields(timed, real, run, cost, gpu))
                if run is not None and run != parallel:
                    why = (f"the training time is for {run.gpus:,} x {gpu.name}"
                           + (f" under {run.sharding}" if not run.single else "")
                           + ", the fewest that hold the step as given.")
                if why:
                    row["notes"].append(why)
        rows.append(row)
    return rows
