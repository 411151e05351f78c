"""pytest-benchmark suite: one training step of every method, timed, with its peak GPU memory.

CUDA (marker `cuda`, skipped without a GPU): Llama-3-8B shapes cut to 2 layers, bf16, AdamW, 1 x 2048
tokens. extra_info holds the caching allocator's peak beside estimate_memory's for the same step;
benchmarks/check_memory.py compares peaks between saved runs. CPU: a tiny-llama smoke run of every
method, quick enough for CI, where `--benchmark-disable` runs each step once.

Run on a GPU: pytest benchmarks -m cuda --benchmark-enable (docs/benchmarks.md).
"""

import gc
import math
import traceback

import pytest
import torch

from lorabench.estimator.case import Case
from lorabench.estimator.memory import estimate_memory
from lorabench.estimator.setup import TrainingSetup
from lorabench.methods import METHODS
from lorabench.measure.builders import build_lorabench
from lorabench.measure.loops import PlainLoop
from lorabench.models.presets import from_name

SEED = 0
ALPHA = 16.0  # TrainingSetup's default; it changes no memory

CUDA_MODEL, CUDA_LAYERS = "llama-3-8b", 2
CUDA_BATCH, CUDA_SEQ = 1, 2048
CUDA_RANKS = (8, 64)
CUDA_ROUNDS, CUDA_WARMUP_ROUNDS = 10, 2
# A sanity bound, not the regression check: lorabench's layers measured within 0.1% on an H100
# (reports/probes/README.md); check_memory.py --max-estimate-error-pct sets the CI threshold.
MAX_ESTIMATE_ERROR_PCT = 10.0

CPU_MODEL = "tiny-llama"
CPU_BATCH, CPU_SEQ = 1, 64
CPU_RANK = 8
CPU_ROUNDS, CPU_WARMUP_ROUNDS = 3, 1


def _cases(ranks):
    """(method, rank) for every method; full fine-tuning has no rank and runs once."""
    cases = []
    for name, method in METHODS.items():
        if not method.uses_rank:
            cases.append(pytest.param(name, None, id=name))
        else:
            cases += [pytest.param(name, r, id=f"{name}-r{r}") for r in ranks]
    return cases


def _token_ids(vocab_size: int, batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(SEED))


def _trainer(spec, method, rank, dtype, device):
    """lorabench.nn's model with method applied, its AdamW and hooks (measure.builders.build_lorabench), stepped by
    the plain loop (measure.loops.PlainLoop): .model, .step(ids) -> the loss."""
    device = torch.device(device)
    setup = TrainingSetup(dtype=dtype, alpha=ALPHA, device=device.type, impl="lorabench", loop="plain")
    built = build_lorabench(Case(spec, METHODS[method], rank, None, setup), device, SEED)
    return PlainLoop(built, 1, device)


def _free_cuda() -> None:
    gc.collect()
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def cuda_warm():
    """One tiny bf16 LoRA step (bf16 and fp32 matmuls, SDPA, AdamW) before any baseline is read: cuBLAS
    workspaces go through the caching allocator and stay for the process, so they belong to no step."""
    spec = from_name(CPU_MODEL)
    trainer = _trainer(spec, "lora", CPU_RANK, "bf16", "cuda")
    trainer.step(_token_ids(spec.vocab_size, CPU_BATCH, CPU_SEQ).cuda())
    torch.cuda.synchronize()
    del trainer
    _free_cuda()


def _measure_cuda_step(benchmark, spec, method, rank):
    """Time CUDA_ROUNDS steps after CUDA_WARMUP_ROUNDS; return (last loss, peak bytes).

    The peak is the allocator's maximum over every step, less what was allocated before the model was
    built (what estimate_memory's peak_bytes counts: no CUDA context, no earlier tests' leftovers).
    """
    _free_cuda()
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    # The step reads the model from `state`, emptied below, so nothing keeps it alive after the test.
    state = {}

    def step():
        loss = state["trainer"].step(state["ids"])
        torch.cuda.synchronize()  # pytest-benchmark's timer is a wall clock: wait for the kernels
        return loss

    try:
        state["trainer"] = _trainer(spec, method, rank, "bf16", "cuda")
        state["ids"] = _token_ids(spec.vocab_size, CUDA_BATCH, CUDA_SEQ).cuda()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        loss = benchmark.pedantic(step, setup=torch.cuda.synchronize, rounds=CUDA_ROUNDS,
                                  warmup_rounds=CUDA_WARMUP_ROUNDS, iterations=1)
        return loss.item(), torch.cuda.max_memory_allocated() - baseline
    except BaseException as exc:
        # pytest keeps the traceback (sys.last_traceback); its frames would hold the model's gigabytes.
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        state.clear()
        _free_cuda()


@pytest.mark.cuda
@pytest.mark.parametrize("method, rank", _cases(CUDA_RANKS))
def test_train_step_cuda(benchmark, cuda_warm, method, rank):
    benchmark.group = method
    spec = from_name(CUDA_MODEL).with_layers(CUDA_LAYERS)
    setup = TrainingSetup(batch_size=CUDA_BATCH, seq_len=CUDA_SEQ, dtype="bf16", device="cuda", alpha=ALPHA,
                          impl="lorabench")  # the step runs lorabench.nn's layers
    estimated = estimate_memory(Case(spec, METHODS[method], rank, None, setup)).peak_bytes

    loss, peak = _measure_cuda_step(benchmark, spec, method, rank)

    error_pct = 100.0 * (estimated - peak) / peak
    benchmark.extra_info.update(
        model=spec.name, layers=CUDA_LAYERS, batch_size=CUDA_BATCH, seq_len=CUDA_SEQ, dtype="bf16",
        method=method, rank=rank, loss=loss, peak_bytes=peak, estimated_peak_bytes=estimated,
        peak_error_pct=round(error_pct, 3), gpu_name=torch.cuda.get_device_name(),
        torch_version=torch.__version__, cuda_version=torch.version.cuda)
    assert math.isfinite(loss)
    assert abs(error_pct) < MAX_ESTIMATE_ERROR_PCT, (estimated, peak)


@pytest.mark.benchmark(group="train-cpu")
@pytest.mark.parametrize("method", list(METHODS))
def test_train_step_cpu(benchmark, method):
    spec = from_name(CPU_MODEL)
    rank = CPU_RANK if METHODS[method].uses_rank else None
    trainer = _trainer(spec, method, rank, "fp32", "cpu")
    ids = _token_ids(spec.vocab_size, CPU_BATCH, CPU_SEQ)
    before = {n: p.detach().clone() for n, p in trainer.built.model.named_parameters()}
    buffers = {n: b.clone() for n, b in trainer.built.model.named_buffers()}

    losses = []

    def step():
        losses.append(trainer.step(ids))

    benchmark.pedantic(step, rounds=CPU_ROUNDS, warmup_rounds=CPU_WARMUP_ROUNDS, iterations=1)

    # A fresh N(0, 0.02) model predicts nearly uniformly: loss ln V. The last step lowered the loss
    # on its own batch (by 5e-5 for VeRA, whose b starts at zero, to 0.3 for full fine-tuning).
    assert abs(losses[0].item() - math.log(spec.vocab_size)) < 0.1
    with torch.no_grad():
        after = trainer.built.model(ids, labels=ids).loss.item()
    assert math.isfinite(after) and after < losses[-1].item()
    params = dict(trainer.built.model.named_parameters())
    moved = {n for n, p in params.items() if not torch.equal(p, before[n])}
    trainable = {n for n, p in params.items() if p.requires_grad}
    # Delta-LoRA writes the adapted layers' W after the step, without a gradient (Zi et al. 2023, eq. 8).
    written = {n for n in params if n.endswith("base.weight")} if method == "delta-lora" else set()
    assert moved & trainable
    assert moved <= trainable | written
    assert written <= moved
    assert all(torch.equal(b, dict(trainer.built.model.named_buffers())[n]) for n, b in buffers.items())
