"""The training loops (lorabench.measure.loops) measured on the CPU live-tensor tracker against the estimate: the plain
loop, transformers' Trainer.training_step, and gradient accumulation, steady state (a step after the warm-up
that created the optimizer states)."""

import pytest

from lorabench.estimator.case import Case
from lorabench.measure.bench import run_bench
from lorabench.estimator.compute import device_for_gpu, estimate_step_time
from lorabench.estimator.flops import estimate_flops
from lorabench.gpus import get_gpu
from lorabench.estimator.memory import estimate_memory
from lorabench.estimator.setup import TrainingSetup
from lorabench.methods import METHODS
from lorabench.estimator.params import count_params
from lorabench.models.presets import from_name

TINY = from_name("tiny-llama")  # d=256, ffn=688, 4 layers, 8 heads (4 kv) of 32, vocab 4096


def _rows(loop, accum, methods, impl="peft", ckpt=False, dtype="bf16"):
    pytest.importorskip("transformers")
    setup = TrainingSetup(batch_size=2, seq_len=64, dtype=dtype, loop=loop, grad_accum=accum,
                          grad_checkpointing=ckpt, device="cpu")
    rows = run_bench(TINY, [METHODS[m] for m in methods], [8], None, setup, steps=1, warmup=2, impl=impl,
                     progress=False, device="cpu")
    for r in rows:
        assert r["status"] == "ok", (r["method"], r["error"])
    return rows


@pytest.mark.parametrize("loop,accum,impl,ckpt,methods", [
    ("trainer", 1, "peft", False, ("full", "lora", "lora-fa", "dora")),
    ("trainer", 4, "peft", False, ("full", "lora")),
    ("plain", 4, "peft", False, ("full", "lora")),
    ("trainer", 4, "peft", True, ("lora",)),
    ("trainer", 2, "lorabench", False, ("lora", "delta-lora")),
])
def test_loops_within_1pct_of_the_cpu_tracker(loop, accum, impl, ckpt, methods):
    for r in _rows(loop, accum, methods, impl, ckpt):
        assert abs(r["peak_error_pct"]) < 1.0, (r["method"], r["peak_error_pct"])
        assert r["loop"] == loop and r["grad_accum"] == accum and r["tokens_per_step"] == 2 * 64 * accum


def test_trainer_loop_runs_trainer_training_step(monkeypatch):
    """--loop trainer calls transformers.Trainer.training_step itself: once per micro-batch of every step
    (2 warm-up steps, the measured step and 1 timed step, 3 micro-batches each)."""
    transformers = pytest.importorskip("transformers")
    calls = []
    real = transformers.Trainer.training_step

    def spy(self, model, inputs, num_items_in_batch=None):
        calls.append(num_items_in_batch)
        return real(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(transformers.Trainer, "training_step", spy)
    _rows("trainer", 3, ("lora",))
    assert len(calls) == 4 * 3
    assert all(int(n) == 2 * 64 * 3 for n in calls)  # labels of the whole accumulated batch, as Trainer counts


def test_trainer_drops_the_output_before_backward():
    """The difference between the loops, written out: the plain loop's output keeps the bf16 logits
    (tokens x vocab x 2 bytes) through backward, and through the optimizer step transformers' KV cache too
    (layers x 2 x tokens x kv width x 2 bytes; until backward passes a layer its k and v are SDPA's own saved
    tensors); Trainer.training_step frees both before backward."""
    plain = estimate_memory(Case(TINY, METHODS["lora"], 8, setup=TrainingSetup(batch_size=2, seq_len=64, loop="plain")))
    trainer = estimate_memory(Case(TINY, METHODS["lora"], 8, setup=TrainingSetup(batch_size=2, seq_len=64)))
    t = 2 * 64
    assert plain.peak_phase == trainer.peak_phase == "backward"
    assert plain.peak_bytes - trainer.peak_bytes == t * 4096 * 2
    assert plain.optimizer_peak_bytes - trainer.optimizer_peak_bytes == t * 4096 * 2 + 4 * 2 * t * 128 * 2


def test_grad_accum_keeps_gradients_through_the_next_micro_batch():
    """Full fine-tuning with 4 micro-batches: every gradient is alive through the forward and backward of
    micro-batches 2-4, so the backward peak grows by the whole gradient size over one micro-batch's."""
    one = estimate_memory(Case(TINY, METHODS["full"], None, setup=TrainingSetup(batch_size=2, seq_len=64)))
    four = estimate_memory(Case(TINY, METHODS["full"], None,
                                setup=TrainingSetup(batch_size=2, seq_len=64, grad_accum=4)))
    assert four.forward_peak_bytes - one.forward_peak_bytes == one.gradients_bytes
    assert four.peak_phase == "backward" and four.peak_bytes > one.peak_bytes


def test_grad_accum_time_is_k_micro_batches_and_one_update():
    spec, lora = from_name("llama-3-8b"), METHODS["lora"]
    targets = count_params(spec, lora, 16, None).targets
    h100 = device_for_gpu(get_gpu("H100-80GB"))
    one = estimate_step_time(Case(spec, lora, 16, targets, TrainingSetup()), h100)
    four = estimate_step_time(Case(spec, lora, 16, targets, TrainingSetup(grad_accum=4)), h100)
    assert four.forward_ms == pytest.approx(4 * one.forward_ms)
    assert four.backward_ms == pytest.approx(4 * one.backward_ms)
    assert four.optimizer_ms == pytest.approx(one.optimizer_ms)
    f1 = estimate_flops(Case(spec, lora, 16, targets, TrainingSetup()))
    f4 = estimate_flops(Case(spec, lora, 16, targets, TrainingSetup(grad_accum=4)))
    assert f4.forward_flops == 4 * f1.forward_flops and f4.flops_per_token == pytest.approx(f1.flops_per_token)


@pytest.mark.parametrize("impl,methods,dropout", [
    ("peft", ("lora", "dora", "vera"), 0.1),
    ("lorabench", ("lora", "dora"), 0.1),
    ("peft", ("full", "lora"), 0.0),
])
def test_every_phase_within_1pct_with_and_without_dropout(impl, methods, dropout):
    """Each phase's peak, not only the step's: the forward phase holds the fp32 copy of the logits (4 bytes a
    logit) and transformers' last hidden state while the loss is computed; on the CPU dropout keeps its noise
    in x's dtype (x * bernoulli / (1 - p)), none where x needs no gradient; PEFT's DoRA with dropout keeps W
    cast to the adapter dtype for the base output it recomputes."""
    pytest.importorskip("transformers")
    setup = TrainingSetup(batch_size=2, seq_len=64, dropout=dropout, device="cpu")
    rows = run_bench(TINY, [METHODS[m] for m in methods], [8], None, setup, steps=1, warmup=2, impl=impl,
                     progress=False, device="cpu")
    for r in rows:
        assert r["status"] == "ok", (r["method"], r["error"])
        for phase in ("forward", "backward", "optimizer"):
            est, got = r[f"{phase}_peak_bytes"], r[f"measured_{phase}_peak_bytes"]
            assert abs(est - got) / got < 0.01, (r["method"], phase, est, got)
