"""Model FLOPs of one training step, its time on a device, and what a training run costs. Pure Python.

Model FLOPs (estimate_flops) follow the references: a [t, in] x [in, out] product costs 2 t in out FLOPs
(Kaplan et al. 2020, sec. 2.1; PaLM, Chowdhery et al. 2022, appendix B); backward costs one such product
for the input gradient and one for the weight gradient; a frozen weight skips the second, which is why
adapters train at about 2/3 of full fine-tuning's FLOPs per token. Elementwise work is left out there, as in
those references, and the MFU is taken over these FLOPs.

The step time (estimate_step_time) counts what each method really runs: every op of lorabench.estimator.stepwork,
matrix products and memory-bound work alike, each at its roofline bound on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

from lorabench.errors import LorabenchError
from lorabench.gpus import GPU, PRICES
from lorabench.estimator.setup import TrainingSetup
from lorabench.methods import Method
from lorabench.models.spec import ModelSpec
from lorabench.estimator.stepwork import PHASES, Op, step_ops


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step.

    Attributes:
        forward_flops: the forward pass (and the loss head).
        backward_flops: input and weight gradients.
        recompute_flops: the extra forward of gradient checkpointing.
        update_flops: per-step matrix work outside forward/backward (DoRA's weight norm, Delta-LoRA's W update).
        step_flops: their sum.
        flops_per_token: step_flops / tokens.
    """

    forward_flops: int
    backward_flops: int
    recompute_flops: int
    update_flops: int
    step_flops: int
    flops_per_token: float


def _attention_flops_per_token(spec: ModelSpec, seq_len: int) -> int:
    """QK^T and AV for one token, summed over the layers, causal: 2 products of 2 q_dim FLOPs per key the query
    attends to (ModelSpec.attended_keys: half the sequence, or about the window on a sliding-window layer).
    FlashAttention-2 (Dao 2023) counts causal attention at half the dense FLOPs; so do we."""
    sliding = spec.sliding_layers()
    keys = (sliding * spec.attended_keys(seq_len, True)
            + (spec.num_layers - sliding) * spec.attended_keys(seq_len, False))
    return round(4 * spec.q_dim * keys)


def _first_layer_skipped_flops(spec: ModelSpec, method: Method, rank: Optional[int], targets: Tuple[str, ...],
                               seq_len: int) -> int:
    """Per token: the backward products of the first layer (the first matrix of --d matrices) that autograd does
    not run, as lorabench.estimator.stepwork._layer times them: on a frozen base nothing before the first adapted
    projection needs a gradient, so neither do the input gradients of the projections (and adapters) up to it,
    nor the attention's backward before it, nor the routed experts' (unless PEFT merges them)."""
    if method.base_trainable:
        return 0
    shapes = spec.linear_shapes()
    rank = rank or 0

    def adapted(name: str) -> bool:
        return method.uses_rank and name in targets

    def dx(names) -> int:  # the base's input gradient, and the adapter's through A
        return sum(2 * i * o + (2 * rank * i if adapted(n) else 0)
                   for n, (i, o, _) in shapes.items() if n in names)

    if spec.single_matrix:
        return dx(("w",))
    arch, skipped = spec.arch, 0
    qkv = ("qkv",) if arch.fused_qkv else ("q", "k", "v")
    skipped += dx(qkv)
    live = any(adapted(n) for n in qkv)
    if not live:
        keys = spec.attended_keys(seq_len, spec.sliding_layers() > 0)
        skipped += 2 * round(4 * spec.q_dim * keys)  # the attention's backward: twice its forward
        skipped += dx(("o",))
    live = live or adapted("o")
    if spec.moe:
        merged = method.uses_rank and "experts" in targets  # (PEFT's merged experts compute their input grad)
        if not live and not merged:
            skipped += 2 * spec.experts_per_token * spec.expert_params
        live = live or any(adapted(n) for n in ("router", "experts"))
        if not live and spec.shared_expert_gate:
            skipped += dx(("gate", "up", "shared_gate", "down"))
        return skipped
    gate_up = ("gate_up",) if arch.fused_gate_up else ("gate", "up") if arch.gated_mlp else ("up",)
    if not live:
        skipped += dx(gate_up)
    live = live or any(adapted(n) for n in gate_up)
    return skipped + (0 if live else dx(("down",)))


def estimate_flops(spec: ModelSpec, method: Method, rank: Optional[int],
                   targets: Tuple[str, ...], setup: TrainingSetup) -> StepFlops:
    """FLOPs of one optimizer step of method on spec at setup's batch and sequence length, over its
    setup.grad_accum micro-batches."""
    t = setup.tokens
    shapes = spec.linear_shapes()
    linear = sum(i * o for i, o, _ in shapes.values())
    if spec.moe:  # the router, and the experts each token is routed to (its active parameters)
        linear += spec.num_experts * spec.hidden_size + spec.experts_per_token * spec.expert_params
    layer_fwd = 2 * linear  # per token
    layer_bwd = 2 * linear * (2 if method.base_trainable else 1)
    update = 0
    for name in targets if method.uses_rank else ():
        if name not in shapes:  # a mixture of experts' router and experts (PEFT's ParamWrapper)
            continue
        i, o, _ = shapes[name]
        # Adapter products: A (r x in) then B (out x r). VeRA runs the same two shapes (shared A, B).
        adapter = 2 * rank * (i + o)
        layer_fwd += adapter
        # (a shared pair's vectors learn by elementwise work)
        weight_grads = (2 * rank * i if method.trains_a else 0) + (2 * rank * o if method.trains_b else 0)
        layer_bwd += adapter + weight_grads
        if method.adapter.magnitude:
            update += spec.num_layers * 2 * rank * i * o  # B A for ||W + s B A|| each step
        if method.delta_update:
            update += spec.num_layers * 2 * (2 * rank) * i * o  # W += [B' B][A'; -A] in one product
    attn = 0 if spec.single_matrix else _attention_flops_per_token(spec, setup.seq_len)  # every layer's
    head = 0 if spec.single_matrix else 2 * spec.hidden_size * spec.vocab_size
    head_bwd = head * (2 if method.base_trainable else 1)
    fwd = t * (spec.num_layers * layer_fwd + attn + head)
    bwd = t * (spec.num_layers * layer_bwd + 2 * attn + head_bwd  # dQ, dK, dV, dP: twice the forward products
               - _first_layer_skipped_flops(spec, method, rank, targets if method.uses_rank else (), setup.seq_len))
    recompute = t * (spec.num_layers * layer_fwd + attn) if setup.grad_checkpointing else 0
    k = setup.grad_accum  # micro-batches per optimizer step: forward and backward run k times, the update once
    fwd, bwd, recompute = k * fwd, k * bwd, k * recompute
    total = fwd + bwd + recompute + update
    return StepFlops(fwd, bwd, recompute, update, total, total / (t * k))


# --------------------------------------------------------------------------------------------------
# Step time: a roofline per op (Williams et al. 2009), summed over the ops of lorabench.estimator.stepwork.

# Achievable fraction of the datasheet dense peak in large matrix products (what --mfu sets): the lowest bf16
# 8192^3 ceiling `lorabench bench` measured on an H100 SXM, 672 TFLOP/s of its 989 (reports/gpu-sweep-h100,
# matmul_tflops: 672-731). The same fraction is taken of the fp32 (non-tensor) peak.
MATMUL_EFFICIENCY = 0.68
# Achievable fraction of the datasheet memory bandwidth in eager elementwise kernels: torch's foreach
# AdamW step of full fine-tuning (Llama-3-8B at 4 layers, 1.92e9 bf16 parameters, 19 elements read or
# written each: 73 GB) took 29.1 ms on the H100 SXM, 2.5 TB/s of its 3.35 (reports/gpu-sweep-h100).
BANDWIDTH_EFFICIENCY = 0.75
# Fused attention against the device's achievable matmul rate: FlashAttention-2 reaches about 335 TFLOP/s
# forward and backward on an H100 SXM (Dao 2023, arXiv:2307.08691, sec. 4.1), about half of what its
# large products reach (above).
ATTENTION_EFFICIENCY = 0.5
# An elementwise op with a transposed operand (PEFT's DoRA adds W to (B A eye)^T) reads it across strides,
# which a GPU's coalesced loads do at a fraction of the bandwidth. Fitted: PEFT's DoRA on all-linear
# (Llama-3-8B, 4 layers, reports/gpu-sweep-h100) measured 45.5 ms forward; at the full bandwidth the model
# gives 40.0 ms, at half of it 47.0. A CPU's caches hold these operands: 1 there.
STRIDED_EFFICIENCY = 0.5
# Host time per eager op on a GPU machine (dispatch, launch, and the Python of transformers' and PEFT's
# modules around it), which the GPU hides while its queue holds work: it decides only where kernels are
# short (small models, few tokens). Taken at 20 us; between 10 and 40 us no committed H100 row moves by more
# than a few percent.
GPU_HOST_OP_S = 20e-6
# Device time a GPU loses per matrix product beyond FLOPs / rate: the last wave of output tiles runs on part
# of the SMs and each kernel ramps up and drains. On an H100 SXM one wave of 128 x 256 tiles at K = 4096 takes
# about 50 us at the achievable rate, so about half a wave per product; it scales with the card's speed. It
# is what makes 2048-token products slower than the 8192^3 ceiling (reports/gpu-sweep-h100: without it,
# steps came out 5-10% short).
GEMM_TAIL_S = 20e-6
GEMM_TAIL_PEAK = 989.4e12  # the H100 SXM's dense bf16 peak, which GEMM_TAIL_S was taken at


@dataclass(frozen=True)
class Device:
    """What the step-time model needs of a device: achievable rates, not datasheet peaks.

    Attributes:
        name: the device.
        matmul_flops: dense matrix products in bf16/fp16, FLOP/s.
        fp32_flops: fp32 matrix products (torch keeps TF32 off for matmuls by default), FLOP/s: PEFT runs
            the adapters' products in fp32.
        bandwidth_bytes_s: what streaming elementwise kernels move, bytes/s.
        peak_flops: the dense bf16 peak the reported MFU is taken against.
        attention_efficiency: fraction of matmul_flops fused attention reaches.
        host_op_s: host time per eager op (Python, PyTorch's dispatch, the kernel launch).
        host_overlaps: the device runs behind the host (a GPU's queue), so a phase takes the longer of the
            two; False for a CPU, which runs each op in turn and pays both.
        gemm_tail_s: device time per matrix product beyond its FLOPs (a GPU's last partial wave of tiles; a
            CPU's fixed cost of a small product).
        strided_efficiency: fraction of the bandwidth an op reading a transposed operand reaches.
    """

    name: str
    matmul_flops: float
    fp32_flops: float
    bandwidth_bytes_s: float
    peak_flops: float
    attention_efficiency: float = ATTENTION_EFFICIENCY
    host_op_s: float = 0.0
    host_overlaps: bool = True
    gemm_tail_s: float = 0.0
    strided_efficiency: float = 1.0

    @property
    def matmul_efficiency(self) -> float:
        return self.matmul_flops / self.peak_flops


def device_for_gpu(gpu: GPU, matmul_efficiency: Optional[float] = None) -> Device:
    """A catalog GPU at achievable rates: matmul_efficiency (MATMUL_EFFICIENCY when None) of its dense
    peaks, BANDWIDTH_EFFICIENCY of its memory bandwidth."""
    eff = MATMUL_EFFICIENCY if matmul_efficiency is None else matmul_efficiency
    return Device(gpu.name, gpu.bf16_flops * eff, gpu.fp32_flops * eff,
                  gpu.bandwidth_bytes_s * BANDWIDTH_EFFICIENCY, gpu.bf16_flops, host_op_s=GPU_HOST_OP_S,
                  gemm_tail_s=GEMM_TAIL_S * GEMM_TAIL_PEAK / gpu.bf16_flops, strided_efficiency=STRIDED_EFFICIENCY)


def measured_device(name: str, matmul_flops: float, bandwidth_bytes_s: float, fp32_flops: Optional[float] = None,
                    host_op_s: float = 0.0, host_overlaps: bool = False, gemm_tail_s: float = 0.0,
                    attention_efficiency: float = ATTENTION_EFFICIENCY) -> Device:
    """A device described by what was measured on it (a CPU, or a GPU outside the catalog): its matmul
    ceiling (`lorabench bench`'s matmul_tflops), its streaming bandwidth and per-op host cost. The MFU
    is then taken against the measured ceiling."""
    return Device(name, matmul_flops, fp32_flops or matmul_flops, bandwidth_bytes_s, matmul_flops,
                  attention_efficiency, host_op_s, host_overlaps, gemm_tail_s)


# The CPU the committed CPU reports ran on (2 cores of an AMD EPYC, family 26, AVX-512 with bf16; Linux under
# KVM; torch 2.13.0+cpu) measured besides the bf16 matmul ceiling each row records. Measured on a machine of
# the same kind (`python benchmarks/check_steptime.py --measure-cpu`, torch.utils.benchmark medians, 2026-11-26):
# fp32 over bf16 matmul rate at 1024^3 (0.113 of 0.497 TFLOP/s); what out-of-place bf16 elementwise ops move at
# activation sizes (512 x 688: 41 GB/s; tensors past the 32 MiB L3 that are freshly allocated run far slower,
# 6 GB/s, but a step's activations stay in cache); the host time of an op with autograd recording it inside a
# module call (about 10 us; a bare op 1-1.4 us, an nn.Linear call 5 us); and what a small product costs
# beyond its FLOPs ([512, 256] x [256, 8] in bf16: 20 us for 4 us of FLOPs).
CPU_FP32_RATIO = 0.23
CPU_BANDWIDTH_BYTES_S = 40e9
CPU_OP_OVERHEAD_S = 10e-6
CPU_GEMM_TAIL_S = 20e-6


def cpu_device(matmul_flops: float, fp32_flops: Optional[float] = None) -> Device:
    """The CPU as `lorabench bench` sees it: its measured bf16 matmul ceiling, its fp32 one where measured
    (measure.cpu_matmul_rates; else CPU_FP32_RATIO of bf16's, as on the CPU the committed reports ran on), and
    the CPU_* figures above."""
    fp32 = CPU_FP32_RATIO * matmul_flops if fp32_flops is None else fp32_flops
    return measured_device("cpu", matmul_flops, CPU_BANDWIDTH_BYTES_S, fp32, CPU_OP_OVERHEAD_S,
                           gemm_tail_s=CPU_GEMM_TAIL_S)


@dataclass(frozen=True)
class StepTime:
    """Estimated time of one training step on a device, and how it splits.

    Attributes:
        device: the device's name.
        step_ms: the whole step.
        forward_ms, backward_ms, optimizer_ms: its phases (recomputation under checkpointing is backward's).
        matmul_ms: time in matrix products and attention, each at its roofline bound (compute or memory).
        memory_ms: time in memory-bound ops: norms, activations, casts, the loss, the optimizer step.
        overhead_ms: host time the device does not hide (per-op host time on a CPU; a GPU's measured stalls).
        matmul_efficiency: the fraction of the peak the device's matrix products were taken at.
        mfu: model FLOPs (StepFlops.step_flops) per second over the dense peak: the utilisation this time implies.
        tokens_per_s: tokens / step time.
    """

    device: str
    step_ms: float
    forward_ms: float
    backward_ms: float
    optimizer_ms: float
    matmul_ms: float
    memory_ms: float
    overhead_ms: float
    matmul_efficiency: float
    mfu: float
    tokens_per_s: float


def op_seconds(op: Op, device: Device) -> Tuple[float, float]:
    """(device seconds, host overhead seconds) of all runs of op: the larger of its compute and its memory
    time, as a roofline bounds a kernel."""
    if op.kind == "stall":  # a GPU's measured idle time (its queue drained); a CPU pays host time per op instead
        return (op.runs * op.seconds if device.host_overlaps else 0.0), 0.0
    bandwidth = device.bandwidth_bytes_s * (device.strided_efficiency if op.strided else 1.0)
    rate = device.fp32_flops if op.dtype_bytes >= 4 else device.matmul_flops
    if op.kind == "attention":
        rate *= device.attention_efficiency
    busy = max(op.flops / rate if op.flops else 0.0, op.bytes / bandwidth)
    if op.kind == "gemm":
        busy += device.gemm_tail_s
    return op.runs * busy, op.runs * op.launches * device.host_op_s


def estimate_step_time(spec: ModelSpec, method: Method, rank: Optional[int], targets: Tuple[str, ...],
                       setup: TrainingSetup, device: Device, flops: Optional[StepFlops] = None) -> StepTime:
    """Time of one step: every op of lorabench.estimator.stepwork at its roofline bound on device, summed (ops run one
    after another), plus per-op host time where the device does not hide it."""
    flops = flops or estimate_flops(spec, method, rank, targets, setup)
    busy = dict.fromkeys(PHASES, 0.0)
    host = dict.fromkeys(PHASES, 0.0)
    matmul = memory = 0.0
    for op in step_ops(spec, method, rank, targets, setup):
        dev, cpu = op_seconds(op, device)
        busy[op.phase] += dev
        host[op.phase] += cpu
        if op.kind == "stream":
            memory += dev
        elif op.kind != "stall":  # a stall is overhead: neither matrix nor memory work
            matmul += dev
    if device.host_overlaps:  # the slower of the host's queueing and the device's work, phase by phase
        phase = {p: max(busy[p], host[p]) for p in PHASES}
    else:
        phase = {p: busy[p] + host[p] for p in PHASES}
    seconds = sum(phase.values())
    overhead = max(0.0, seconds - matmul - memory)  # host time the device did not hide
    return StepTime(device.name, 1e3 * seconds, 1e3 * phase["forward"], 1e3 * phase["backward"],
                    1e3 * phase["optimizer"], 1e3 * matmul, 1e3 * memory, 1e3 * overhead,
                    device.matmul_efficiency, flops.step_flops / seconds / device.peak_flops,
                    setup.tokens * setup.grad_accum / seconds)


# --------------------------------------------------------------------------------------------------
# Training time and cost.


@dataclass(frozen=True)
class CostSetup:
    """How much to train and at what price.

    Attributes:
        tokens: tokens to train on in all (epochs included); or None to give dataset_tokens and epochs.
        dataset_tokens: tokens in the dataset, trained over `epochs` times.
        epochs: passes over the dataset (fractions allowed).
        price_per_gpu_hour: US dollars per GPU-hour; None takes the catalog's default for the GPU.
    """

    tokens: Optional[int] = None
    dataset_tokens: Optional[int] = None
    epochs: float = 1.0
    price_per_gpu_hour: Optional[float] = None

    @property
    def train_tokens(self) -> Optional[int]:
        if self.tokens is not None:
            return self.tokens
        if self.dataset_tokens is not None:
            return math.ceil(self.dataset_tokens * self.epochs)
        return None

    def validate(self) -> None:
        """Raises LorabenchError for a combination or value that cannot be priced."""
        if self.tokens is not None and self.dataset_tokens is not None:
            raise LorabenchError("give --tokens (all tokens trained) or --dataset-tokens with --epochs, not both.")
        for name, value in (("tokens", self.tokens), ("dataset tokens", self.dataset_tokens)):
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise LorabenchError(f"{name} must be a positive integer, got {value!r}.")
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            raise LorabenchError(f"epochs must be a positive number, got {self.epochs!r}.")
        if self.price_per_gpu_hour is not None and not (math.isfinite(self.price_per_gpu_hour)
                                                        and self.price_per_gpu_hour >= 0):
            raise LorabenchError(f"price must be a non-negative number, got {self.price_per_gpu_hour!r}.")


@dataclass(frozen=True)
class TrainingCost:
    """A training run: steps, wall-clock hours, GPU-hours and dollars.

    Attributes:
        train_tokens: tokens trained on in all.
        gpus: GPUs working together (data-parallel replicas, or the fewest that hold the step sharded).
        tokens_per_step: tokens one optimizer step takes over all GPUs.
        train_steps: optimizer steps (the last one partial, counted whole).
        train_hours: wall-clock hours at the estimated step time.
        gpu_hours: train_hours x gpus.
        price_per_gpu_hour: dollars per GPU-hour used (given, or the catalog's), None when unknown.
        price_source: where the price comes from.
        cost_usd: gpu_hours x price, None without a price.
    """

    train_tokens: int
    gpus: int
    tokens_per_step: int
    train_steps: int
    train_hours: float
    gpu_hours: float
    price_per_gpu_hour: Optional[float]
    price_source: Optional[str]
    cost_usd: Optional[float]


def estimate_training_cost(step: StepTime, tokens_per_gpu_step: int, gpus: int, cost: CostSetup,
                           gpu: Optional[GPU] = None) -> Optional[TrainingCost]:
    """Steps, hours, GPU-hours and dollars to train cost.train_tokens at step's time per step, each of `gpus`
    GPUs taking tokens_per_gpu_step tokens per step (data parallel; time spent communicating is not added).
    The price is cost.price_per_gpu_hour, else the catalog's default for gpu (lorabench.gpus.PRICES).
    None when no tokens were given."""
    cost.validate()
    tokens = cost.train_tokens
    if tokens is None:
        return None
    per_step = tokens_per_gpu_step * gpus
    steps = -(-tokens // per_step)
    hours = steps * step.step_ms / 3.6e6
    price, source = cost.price_per_gpu_hour, "--price"
    if price is None and gpu is not None and gpu.name in PRICES:
        price, source = PRICES[gpu.name].usd_per_gpu_hour, PRICES[gpu.name].source
    if price is None:
        source = None
    return TrainingCost(tokens, gpus, per_step, steps, hours, hours * gpus, price, source,
                        None if price is None else hours * gpus * price)
