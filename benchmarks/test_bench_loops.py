"""pytest-benchmark suite: one optimizer step of each training loop users run, timed, through transformers + PEFT.

Each case is one `lorabench bench` setup: the plain loop, transformers' Trainer.training_step, gradient
accumulation, bf16 autocast over fp32 weights, the chunked loss, QLoRA (nf4 through bitsandbytes) and 8-bit
AdamW. The step is the loop bench runs (lorabench.measure.loops), built by bench's own builders. extra_info holds the
estimate for the same step (step_ms on the device's time model, peak bytes) and, on CUDA, the caching
allocator's peak over the timed steps, so a saved run can be compared for time (--benchmark-compare) and for
memory (benchmarks/check_memory.py).

CUDA (marker `cuda`): Llama-3-8B shapes cut to 2 layers, LoRA r=16, 1 x 2048 tokens. CPU: tiny-llama, quick
enough for CI, where `--benchmark-disable` runs each step once.
"""

import gc
import traceback

import pytest
import torch

from lorabench.estimator.case import Case
from lorabench.measure.builders import BUILDERS
from lorabench.measure.steps import forward_with_loss, stepper
from lorabench.estimator.compute import cpu_device, device_for_gpu, estimate_step_time
from lorabench.estimator.memory import estimate_memory
from lorabench.estimator.setup import TrainingSetup
from lorabench.methods import METHODS
from lorabench.estimator.params import count_params
from lorabench.models.presets import from_name

SEED = 0
RANK = 16
# (id, TrainingSetup fields beyond batch, sequence and device)
LOOPS = [
    ("plain", {"loop": "plain"}),
    ("trainer", {}),
    ("trainer-accum4", {"grad_accum": 4}),
    ("trainer-autocast-bf16", {"dtype": "fp32", "autocast": "bf16"}),
    ("trainer-chunked-loss", {"loss": "chunked", "loss_chunk": 256}),
    ("trainer-qlora-nf4", {"dtype": "nf4"}),
    ("trainer-adamw-8bit", {"optimizer": "adamw-8bit"}),
]
CUDA_MODEL, CUDA_LAYERS, CUDA_SEQ = "llama-3-8b", 2, 2048
CPU_MODEL, CPU_SEQ = "tiny-llama", 64
ROUNDS, WARMUP_ROUNDS = 5, 2  # warm-up: the first step creates the optimizer states


def _needs(fields):
    if fields.get("dtype") == "nf4" or fields.get("optimizer") == "adamw-8bit":
        pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")


@pytest.fixture(scope="module")
def cpu_model_device():
    """The CPU's time model at its measured bf16 matmul ceiling, as bench builds it."""
    from lorabench.measure.probes import matmul_flops_per_s

    return cpu_device(matmul_flops_per_s(torch.device("cpu"), torch.bfloat16))


def _run(benchmark, spec, setup, device):
    """Time ROUNDS optimizer steps of setup's loop after WARMUP_ROUNDS; returns the allocator's peak (CUDA)."""
    method = METHODS["lora"]
    state = {}
    try:
        targets = count_params(spec, method, RANK, None).targets  # PEFT's default for the family
        built = BUILDERS["peft"](Case(spec, method, RANK, targets, setup), device, SEED)
        built = forward_with_loss(built, spec, setup, device, "peft")
        step, close = stepper(built, setup, device)
        state.update(built=built, close=close)
        ids = torch.randint(0, spec.vocab_size, (setup.batch_size, setup.seq_len),
                            generator=torch.Generator().manual_seed(SEED)).to(device)

        def one_step():
            step(ids, lambda phase: None)
            if device.type == "cuda":
                torch.cuda.synchronize()  # pytest-benchmark's timer is a wall clock

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            baseline = torch.cuda.memory_allocated()
        benchmark.pedantic(one_step, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)
        return torch.cuda.max_memory_allocated() - baseline if device.type == "cuda" else None
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)  # its frames would hold the model
        raise
    finally:
        if "close" in state:
            state["close"]()
        state.clear()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _record(benchmark, name, spec, setup, est_ms, peak):
    est = estimate_memory(Case(spec, METHODS["lora"], RANK, None, setup))
    benchmark.extra_info.update(
        loop=name, model=spec.name, layers=spec.num_layers, batch_size=setup.batch_size, seq_len=setup.seq_len,
        tokens_per_step=setup.tokens * setup.grad_accum, dtype=setup.dtype, autocast=setup.autocast,
        grad_accum=setup.grad_accum, loss=setup.loss, optimizer=setup.optimizer, method="lora", rank=RANK,
        estimated_step_ms=round(est_ms, 3), estimated_peak_bytes=est.peak_bytes, peak_bytes=peak,
        peak_error_pct=None if not peak else round(100.0 * (est.peak_bytes - peak) / peak, 3))


@pytest.mark.parametrize("name,fields", LOOPS, ids=[n for n, _ in LOOPS])
def test_loop_step_cpu(benchmark, cpu_model_device, name, fields):
    _needs(fields)
    benchmark.group = "loops-cpu"
    spec = from_name(CPU_MODEL)
    setup = TrainingSetup(batch_size=1, seq_len=CPU_SEQ, device="cpu", **fields).for_spec(spec)
    _run(benchmark, spec, setup, torch.device("cpu"))
    t = estimate_step_time(Case(spec, METHODS["lora"], RANK, ("q", "v"), setup), cpu_model_device)
    _record(benchmark, name, spec, setup, t.step_ms, None)


@pytest.mark.cuda
@pytest.mark.parametrize("name,fields", LOOPS + [("trainer-liger", {"loss": "fused-linear"})],
                         ids=[n for n, _ in LOOPS] + ["trainer-liger"])
def test_loop_step_cuda(benchmark, name, fields):
    _needs(fields)
    if fields.get("loss") == "fused-linear":
        pytest.importorskip("liger_kernel")
    from lorabench.measure.bench import catalog_gpu

    benchmark.group = "loops-cuda"
    spec = from_name(CUDA_MODEL).with_layers(CUDA_LAYERS)
    setup = TrainingSetup(batch_size=1, seq_len=CUDA_SEQ, device="cuda", **fields).for_spec(spec)
    peak = _run(benchmark, spec, setup, torch.device("cuda"))
    gpu = catalog_gpu(torch.cuda.get_device_name())
    est_ms = estimate_step_time(Case(spec, METHODS["lora"], RANK, ("q", "v"), setup), device_for_gpu(gpu)).step_ms \
        if gpu else float("nan")
    _record(benchmark, name, spec, setup, est_ms, peak)
    benchmark.extra_info["gpu_name"] = torch.cuda.get_device_name()
