"""A traced step (lorabench.measure.traced's result) as a `memory` row: the fields, names and units of the analytic
rows (estimator.rows.memory_rows), with "engine": "trace" and what the trace assumed in its notes. Pure Python.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from lorabench.estimator.batches import batch_fields
from lorabench.estimator.compute import StepTime, device_for_gpu, time_of_ops
from lorabench.estimator.cost import CostSetup
from lorabench.estimator.ops import Op
from lorabench.estimator.stepwork import MOE_STALL_S
from lorabench.estimator.rows import cost_fields, step_time_fields
from lorabench.estimator.fit import overflow, smallest_gpu_holding
from lorabench.estimator.memory import CUBLAS_WORKSPACE_BYTES, CUDA_CONTEXT_BYTES
from lorabench.estimator.parallel import Parallel
from lorabench.estimator.setup import PHASES, TrainingSetup
from lorabench.estimator.tuner import Tuner
from lorabench.gpus import GPU

ASSUMED = ("traced with transformers and PEFT on fake tensors (no memory allocated): the CPU's kernels stand for "
           "CUDA's (SDPA's flash kernel keeps the same output and [B, H, S] float32 log-sum-exp on both in bf16 and "
           "fp16); every row one unpadded, unpacked sequence.")


def assumed(setup: TrainingSetup) -> str:
    """What the trace assumed (ASSUMED), for the setup's batch."""
    if not setup.batched:
        return ASSUMED
    text = ASSUMED.replace("every row one unpadded, unpacked sequence.", "the longest batch, its mask and "
                           "position_ids as transformers builds them (CUDA's memory-efficient kernel pads a mask to "
                           "a multiple of 8 keys, the CPU's does not: at most 7 keys a row more per masked layer).")
    if setup.padding_free and setup.device == "cuda":
        text += (" Padding-free on CUDA is traced without a mask, as FlashAttention's variable-length kernel runs "
                 "it; its attention time is taken over the whole row (the kernel's is each example's).")
    return text


FOREACH = ("the optimizer steps with torch's multi-tensor (foreach) kernels, as it does on CUDA tensors: one "
           "temporary the size of the states it updates.")


def targets_text(got) -> str:
    """The targets PEFT resolved (a list of module names, or its own spelling such as "all-linear") as a row's."""
    return ",".join(got) if isinstance(got, list) else (got or "")


def required_bytes(result: Dict, setup: TrainingSetup, runtime: bool = True) -> int:
    """What a traced step needs of a GPU: its peak over the phases, plus (runtime) the CUDA context and cuBLAS
    workspace outside the allocator on a CUDA device."""
    peak = max(result[f"measured_{p}_peak_bytes"] for p in PHASES)
    return peak + (CUDA_CONTEXT_BYTES + CUBLAS_WORKSPACE_BYTES if runtime and setup.device == "cuda" else 0)


def needed_bytes(result: Dict, setup: TrainingSetup, allowance: float) -> Tuple[int, int]:
    """(required_bytes, that plus the allocator allowance on the peak): what 'fits' compares with a GPU's memory."""
    required = required_bytes(result, setup)
    return required, required + int(allowance * required_bytes(result, setup, runtime=False))


def depth_note(result: Dict) -> str:
    traced, depth = result["layers_traced"], result["depth"]
    if traced == [depth]:
        return ""
    kinds = result["layer_kinds"]
    return (f"{depth} layers: {' and '.join(map(str, traced))} traced and the rest summed per layer kind "
            f"({kinds} kind{'s' if kinds > 1 else ''}; each kind's layers hold and save alike).")


def rank_note(parallel: Parallel) -> str:
    if parallel.single:
        return ""
    return (f"rank 0 of {parallel.gpus} under {parallel.sharding}, traced in a fake process group (torch's \"fake\" "
            "backend: collectives keep their shapes, move nothing); the memory fields are its own. Collectives "
            "are not counted: the comm_* fields stay 0.")


def traced_row(name: str, tuner: Tuner, result: Dict, setup: TrainingSetup, notes: List[str],
               parallel: Parallel = Parallel()) -> Dict:
    """The memory row of one traced step, rank 0's under parallel (no GPU fields: gpu_fields adds them)."""
    peaks = {p: result[f"measured_{p}_peak_bytes"] for p in PHASES}
    phase = max(peaks, key=peaks.get)
    overhead = required_bytes(result, setup) - peaks[phase]
    tokens = setup.tokens * setup.grad_accum
    total = result["total_params"]
    logits = result["logits_bytes"] if setup.loss == "standard" else 0
    row = {
        "model": name, "engine": "trace", "method": tuner.name, "rank": tuner.rank,
        "targets": targets_text(result.get("targets")),
        "trainable_params": result["trainable_params"], "total_params": total,
        "trainable_pct": 100.0 * result["trainable_params"] / total if total else 0.0,
        "weights_bytes": result["measured_weights_bytes"], "adapter_bytes": result["measured_adapter_bytes"],
        "gradients_bytes": result["measured_gradients_bytes"], "optimizer_bytes": result["measured_optimizer_bytes"],
        "master_bytes": 0, "method_state_bytes": result["measured_method_state_bytes"],
        "activations_bytes": max(0, result["measured_activations_bytes"] - logits), "logits_bytes": logits,
        "overhead_bytes": overhead, "forward_peak_bytes": peaks["forward"], "backward_peak_bytes": peaks["backward"],
        "optimizer_peak_bytes": peaks["optimizer"], "peak_bytes": peaks[phase], "peak_phase": phase,
        "device_bytes": peaks[phase] + overhead, "updates_base_weights": tuner.updates_base,
        "notes": [n for n in dict.fromkeys(notes + list(result.get("notes", ())) + [
            depth_note(result), rank_note(parallel), assumed(setup), FOREACH if setup.device == "cuda" else ""]) if n],
        "batch_size": setup.batch_size, "seq_len": setup.seq_len, "dtype": setup.dtype,
        "optimizer": setup.optimizer, "grad_checkpointing": setup.grad_checkpointing, "loop": setup.loop,
        "autocast": setup.autocast, "grad_accum": setup.grad_accum, "tokens_per_step": tokens, "loss": setup.loss,
        "kbit_prepare": setup.kbit_prepare, "max_positions": None,
        "step_flops": result["flops"], "flops_per_token": result["flops"] / tokens,
        "gpus": parallel.gpus, "sharding": parallel.sharding, "cpu_offload": parallel.cpu_offload,
        "bucket_bytes": 0, "gather_bytes": 0, "reduce_scatter_bytes": 0, "cpu_offload_bytes": 0,
        "comm_all_gather_bytes": 0, "comm_reduce_scatter_bytes": 0, "comm_all_reduce_bytes": 0, "comm_bytes": 0,
        "attention": result["attention"], "layers_traced": result["layers_traced"],
        "layer_kinds": result["layer_kinds"], "trace_seconds": result["trace_seconds"],
        "trace_cached": bool(result.get("cached")),
        # a vision-language step's images per sequence, their size as traced, their tokens in each sequence
        "images": result.get("images", 0), "image_size": result.get("image_size"),
        "image_tokens": result.get("image_tokens", 0),
        **batch_fields(setup),
        "offload_host_bytes": result.get("measured_host_bytes", 0),
    }
    if setup.batched:
        row["typical_peak_bytes"] = None  # (the longest batch is traced; time and cost are its own)
    return row


def step_time(row: Dict, result: Dict, gpu: GPU, mfu: Optional[float]) -> Optional[StepTime]:
    """The traced step's time on gpu: each of its ops (measure.oplog) at its roofline bound, as the analytic
    model times its own (estimator.compute.time_of_ops); None for a trace without its ops."""
    if "ops" not in result:
        return None
    ops = []
    for phase, kind, flops, moved, dtype, runs in result["ops"]:
        if kind == ROUTING:  # flops: the experts; a forward's routing also stalls the backward through it
            ops.append(Op("", phase, "stall", 0.0, 0.0, runs=runs, seconds=MOE_STALL_S["forward"] + flops
                          * MOE_STALL_S["forward_per_expert"]))
            if phase == "forward":
                ops.append(Op("", "backward", "stall", 0.0, 0.0, runs=runs, seconds=MOE_STALL_S["backward"]))
        else:
            ops.append(Op("", phase, kind, flops, moved, dtype, runs))
    return time_of_ops(ops, device_for_gpu(gpu, mfu), row["step_flops"], row["tokens_per_step"])


# A mixture of experts' routing in a trace's ops (measure.oplog: the router's top-k over the experts), kept as
# ("routing", experts, 0, 0): the step time charges a GPU's measured routing stall for it (MOE_STALL_S)
ROUTING = "routing"
TIME_FIELDS = ("mfu", "matmul_efficiency", "step_ms", "tokens_per_s", "step_ms_forward", "step_ms_backward",
               "step_ms_optimizer", "step_ms_matmul", "step_ms_memory", "step_ms_overhead")
TIME_NOTE = ("step time of a traced model: each op the trace ran (matrix products and attention at their FLOPs, the "
             "rest at the bytes it moves) at its roofline bound on the GPU, plus its host time, as the analytic model "
             "times its own ops, a mixture of experts' routing stalls (measured on an H100) included.")


def gpu_fields(row: Dict, result: Dict, gpu: Optional[GPU], allowance: float, mfu: Optional[float],
               setup: TrainingSetup, cost: Optional[CostSetup] = None, parallel: Parallel = Parallel()) -> None:
    """Adds the GPU's verdict to a traced row in place: fits (the peak, the runtime and the allocator allowance),
    the spare bytes, the largest component, the step's time (step_time) and, with cost, the training run's; without
    a GPU, the smallest catalog GPU that holds the step."""
    peak = row["peak_bytes"]
    need = needed_bytes(result, setup, allowance)[1]
    if gpu is None:
        row["smallest_gpu"] = smallest_gpu_holding(need, bf16=setup.uses_bf16)
        return
    fits = need <= gpu.memory_bytes
    single = row["sharding"] == "none"  # else the row is rank 0's of row["gpus"]: the counts of others untraced
    one = 1 if fits and single else None  # a step that fits one GPU needs one under every strategy
    t = step_time(row, result, gpu, mfu)
    name, big, _ = overflow(row, gpu.memory_bytes)
    row.update({"gpu": gpu.name, "gpu_memory_bytes": gpu.memory_bytes, "fits": fits,
                "gpus_needed": (1 if single else row["gpus"]) if fits else None, "per_gpu_bytes": need,
                "allowance_fraction": allowance, "allowance_bytes": int(allowance * peak),
                "spare_bytes": gpu.memory_bytes - need})
    row.update(step_time_fields(t) if t is not None else dict.fromkeys(TIME_FIELDS))
    step_ms = row["step_ms"]
    row.update({"gpus_needed_ddp": one, "gpus_needed_zero2": one, "gpus_needed_fsdp": one, "link": None,
                "link_bytes_s": None, "comm_ms": 0.0, "step_ms_no_overlap": step_ms, "step_ms_overlap": step_ms,
                "largest_component": name, "largest_component_bytes": big, "fix": None, "fix_alternative": None})
    row["notes"].append(TIME_NOTE + ("" if one else " The GPUs a step that does not fit one needs under ZeRO-2 "
                                     "or FSDP2 are not traced (null)."))
    if cost is not None:
        row.update(cost_fields(t, row["real_tokens_per_step"], parallel if fits and t is not None else None, cost, gpu))
        if not fits:
            row["notes"].append("no training time or cost: the step does not fit as given, and the fewest GPUs "
                                "that hold it are not traced.")
        elif not parallel.single:
            row["notes"].append("the training time is the step's own on each GPU: communication is not traced.")


__all__ = ["ASSUMED", "assumed", "ROUTING", "TIME_NOTE", "targets_text", "required_bytes", "needed_bytes", "depth_note",
           "rank_note", "traced_row", "step_time", "gpu_fields"]
