"""The time of one training step on a device: every op of lorabench.estimator.stepwork, matrix products and
memory-bound work alike, each at its roofline bound (Williams et al. 2009), and the MFU over the model FLOPs
(lorabench.estimator.flops). Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Tuple

from lorabench.estimator.case import Case
from lorabench.gpus import GPU
from lorabench.estimator.flops import StepFlops, estimate_flops
from lorabench.estimator.setup import PHASES
from lorabench.estimator.stepwork import Op, step_ops

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
# What copies between device and pinned host memory reach of the PCIe link's rate: NVIDIA's bandwidthTest on pinned
# memory reads about 25 of Gen4's 31.5 GB/s and 50-55 of Gen5's 63 GB/s (the link's packet overhead, about 20%).
HOST_LINK_EFFICIENCY = 0.8


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
        host_link_bytes_s: what a copy to or from pinned host memory moves, bytes/s, one direction (0: the
            device's own memory is the host's, as on a CPU: such a copy moves at bandwidth_bytes_s).
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
    host_link_bytes_s: float = 0.0

    @property
    def matmul_efficiency(self) -> float:
        return self.matmul_flops / self.peak_flops


def device_for_gpu(gpu: GPU, matmul_efficiency: Optional[float] = None) -> Device:
    """A catalog GPU at achievable rates: matmul_efficiency (MATMUL_EFFICIENCY when None) of its dense
    peaks, BANDWIDTH_EFFICIENCY of its memory bandwidth."""
    eff = MATMUL_EFFICIENCY if matmul_efficiency is None else matmul_efficiency
    return Device(gpu.name, gpu.bf16_flops * eff, gpu.fp32_flops * eff,
                  gpu.bandwidth_bytes_s * BANDWIDTH_EFFICIENCY, gpu.bf16_flops, host_op_s=GPU_HOST_OP_S,
                  gemm_tail_s=GEMM_TAIL_S * GEMM_TAIL_PEAK / gpu.bf16_flops, strided_efficiency=STRIDED_EFFICIENCY,
                  host_link_bytes_s=gpu.host_link_bytes_s * HOST_LINK_EFFICIENCY)


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
    if op.kind == "host":  # a copy to or from host memory, at the host link's rate
        return op.runs * op.bytes / (device.host_link_bytes_s or device.bandwidth_bytes_s), \
            op.runs * op.launches * device.host_op_s
    bandwidth = device.bandwidth_bytes_s * (device.strided_efficiency if op.strided else 1.0)
    rate = device.fp32_flops if op.dtype_bytes >= 4 else device.matmul_flops
    if op.kind == "attention":
        rate *= device.attention_efficiency
    busy = max(op.flops / rate if op.flops else 0.0, op.bytes / bandwidth)
    if op.kind == "gemm":
        busy += device.gemm_tail_s
    return op.runs * busy, op.runs * op.launches * device.host_op_s


def estimate_step_time(case: Case, device: Device, flops: Optional[StepFlops] = None) -> StepTime:
    """Time of one step: every op of lorabench.estimator.stepwork at its roofline bound on device, summed (ops run one
    after another), plus per-op host time where the device does not hide it."""
    setup = case.setup
    flops = flops or estimate_flops(case)
    return time_of_ops(step_ops(case), device, flops.step_flops, setup.tokens * setup.grad_accum)


def time_of_ops(ops: Iterable[Op], device: Device, step_flops: float, tokens: int) -> StepTime:
    """Time of one step of `ops` (a description's, lorabench.estimator.stepwork, or a trace's,
    lorabench.measure.oplog) on device: each at its roofline bound, summed, plus per-op host time where the
    device does not hide it; the MFU of step_flops, the tokens per second of `tokens` a step."""
    busy = dict.fromkeys(PHASES, 0.0)
    host = dict.fromkeys(PHASES, 0.0)
    matmul = memory = 0.0
    for op in ops:
        dev, cpu = op_seconds(op, device)
        busy[op.phase] += dev
        host[op.phase] += cpu
        if op.kind in ("stream", "host"):
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
                    device.matmul_efficiency, step_flops / seconds / device.peak_flops, tokens / seconds)
