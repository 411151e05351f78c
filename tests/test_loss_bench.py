"""--loss chunked and fused-linear: the estimate against the CPU tracker (steady state: the memory step is the
second), what each saves, and the refusals."""

import json

import pytest
from click.testing import CliRunner

from lorabench.estimator.case import Case
from lorabench.measure.bench import run_bench
from lorabench.cli import cli
from lorabench.estimator.compute import cpu_device, estimate_step_time
from lorabench.errors import LorabenchError
from lorabench.estimator.loss import liger_chunk_tokens
from lorabench.estimator.memory import estimate_memory
from lorabench.estimator.setup import MAX_LOSS_CHUNK, TrainingSetup
from lorabench.methods import METHODS
from lorabench.models.presets import from_name
from lorabench.estimator.stepwork import step_ops

TINY = from_name("tiny-llama")  # d=256, 4 layers, vocab 4096

CASES = [
    # (impl, methods, dtype, chunk, grad checkpointing)
    ("lorabench", ("lora", "dora", "vera", "delta-lora", "full"), "bf16", 48, False),
    ("lorabench", ("lora", "full"), "fp32", 1000, False),
    ("peft", ("lora", "lora-fa", "full"), "bf16", 32, False),
    ("peft", ("lora", "vera", "full"), "bf16", 1000, True),
]


@pytest.mark.parametrize("impl,methods,dtype,chunk,ckpt", CASES)
def test_chunked_loss_within_1pct_of_cpu_tracker(impl, methods, dtype, chunk, ckpt):
    if impl == "peft":
        pytest.importorskip("peft")
    setup = TrainingSetup(batch_size=2, seq_len=64, dtype=dtype, grad_checkpointing=ckpt, loss="chunked",
                          loss_chunk=chunk)
    rows = run_bench(TINY, [METHODS[m] for m in methods], [8], "all-linear", setup, steps=1, warmup=1,
                     impl=impl, progress=False, device="cpu")
    for r in rows:
        assert r["status"] == "ok", r["error"]
        assert r["loss"] == "chunked"
        assert abs(r["peak_error_pct"]) < 1.0, (r["method"], r["peak_error_pct"])


def test_chunked_loss_saves_the_logits():
    """At 8k tokens x 128k vocab, transformers' loss holds bf16 logits through the step (the plain loop
    keeps the output), with their fp32 copy and log_softmax's output around the loss; the chunked and fused
    losses hold one chunk's logits."""
    spec = from_name("llama-3-8b")
    base = TrainingSetup(seq_len=8192)
    standard = estimate_memory(Case(spec, METHODS["lora"], 16, "all-linear", base))
    chunked = estimate_memory(Case(spec, METHODS["lora"], 16, "all-linear",
                                   TrainingSetup(seq_len=8192, loss="chunked")))
    fused = estimate_memory(Case(spec, METHODS["lora"], 16, "all-linear",
                                 TrainingSetup(seq_len=8192, loss="fused-linear")))
    v = spec.vocab_size
    assert standard.peak_bytes - chunked.peak_bytes > 8192 * v * 2  # at least the held bf16 logits
    assert standard.peak_bytes - fused.peak_bytes > 8192 * v * 2


def test_liger_chunk_follows_its_formula():
    # next_pow2(ceil(BT / ceil(V / H))), at most BT
    assert liger_chunk_tokens(4096, 4096, 128256) == 128
    assert liger_chunk_tokens(8192, 4096, 32000) == 1024
    assert liger_chunk_tokens(3, 4096, 4096) == 3


def test_chunked_loss_costs_one_more_head_product():
    spec, lora, full = from_name("llama-3-8b"), METHODS["lora"], METHODS["full"]
    targets = ("q", "v")

    def flops(method, loss):
        setup = TrainingSetup(loss=loss, loss_chunk=1000, device="cpu")
        return sum(op.flops * op.runs for op in step_ops(Case(spec, method, 16, targets, setup)))

    head = 2 * 2048 * 4096 * spec.vocab_size  # [t, d] x [d, V]
    for method in (lora, full):
        assert flops(method, "chunked") == pytest.approx(flops(method, "standard") + head)
        assert flops(method, "fused-linear") == pytest.approx(flops(method, "standard"))
    cpu = cpu_device(1e12)
    assert (estimate_step_time(Case(spec, lora, 16, targets, TrainingSetup(loss="chunked", device="cpu")), cpu).step_ms
            > estimate_step_time(Case(spec, lora, 16, targets, TrainingSetup(device="cpu")), cpu).step_ms)


def test_fused_linear_is_estimated_but_not_measured_on_cpu():
    rows = run_bench(TINY, [METHODS["lora"]], [8], None, TrainingSetup(seq_len=32, loss="fused-linear"),
                     steps=1, warmup=1, impl="lorabench", progress=False, device="cpu")
    assert rows[0]["status"] == "skipped" and "need a CUDA GPU" in rows[0]["error"]
    assert rows[0]["peak_bytes"] > 0


def test_chunked_loss_refuses_soft_capped_logits():
    with pytest.raises(LorabenchError, match="does not soft-cap"):
        estimate_memory(Case(from_name("gemma-2-2b"), METHODS["lora"], 8, None, TrainingSetup(loss="chunked")))


def test_loss_chunk_is_bounded_on_the_command_line():
    runner = CliRunner()
    over = runner.invoke(cli, ["memory", "-m", "llama-3-8b", "--loss", "chunked", "--loss-chunk",
                               str(MAX_LOSS_CHUNK + 1)])
    assert over.exit_code == 2 and f"{MAX_LOSS_CHUNK:,}" in over.output
    ok = runner.invoke(cli, ["memory", "-m", "llama-3-8b", "--loss", "chunked", "-f", "json"])
    assert ok.exit_code == 0, ok.output
    with pytest.raises(LorabenchError, match="loss chunk must be an integer"):
        TrainingSetup(loss_chunk=MAX_LOSS_CHUNK + 1).validate()
    assert json.loads(ok.output)[0]["loss"] == "chunked"
