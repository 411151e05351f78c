"""QLoRA measured (issue 12): transformers + bitsandbytes + PEFT on NF4 and int8 bases, with and without
peft.prepare_model_for_kbit_training, and bitsandbytes' 8-bit AdamW, against the estimate on the CPU tracker
(the second step, after a warm-up step)."""

import json

import pytest
from click.testing import CliRunner

from lorabench.measure.bench import run_bench
from lorabench.cli import cli
from lorabench.estimator.setup import TrainingSetup
from lorabench.methods import METHODS
from lorabench.models.presets import from_name

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

TINY = from_name("tiny-llama")  # d=256, ffn=688, 4 layers, 8 heads (4 kv) of 32, vocab 4096
CASES = [
    # (dtype, kbit_prepare, gradient checkpointing, methods, optimizer)
    ("nf4", False, False, ("lora", "lora-fa", "dora"), "adamw"),
    ("nf4", True, False, ("lora", "lora-fa", "dora"), "adamw"),
    ("int8", False, False, ("lora", "lora-fa"), "adamw"),
    ("int8", True, False, ("lora", "lora-fa"), "adamw"),
    ("nf4", False, False, ("lora",), "adamw-8bit"),
    # the QLoRA recipe (Dettmers et al. 2023): kbit preparation, checkpointing, paged 8-bit AdamW
    # (DoRA with checkpointing: PEFT's known miss, tests/test_families.py)
    ("nf4", True, True, ("lora", "lora-fa"), "paged-adamw-8bit"),
    ("int8", True, True, ("lora",), "adamw"),
]


@pytest.mark.parametrize("dtype,prepare,ckpt,methods,optimizer", CASES)
def test_qlora_estimate_within_1pct_of_cpu_tracker(dtype, prepare, ckpt, methods, optimizer):
    setup = TrainingSetup(batch_size=2, seq_len=64, dtype=dtype, kbit_prepare=prepare, grad_checkpointing=ckpt,
                          optimizer=optimizer)
    rows = run_bench(TINY, [METHODS[m] for m in methods], [8], "all-linear", setup, steps=1, warmup=1,
                     impl="peft", progress=False, device="cpu")
    for r in rows:
        assert r["status"] == "ok", r["error"]
        assert r["measured_gradients_bytes"] == r["gradients_bytes"], r["method"]
        # the quantized weights with their constants (the rotary buffers, 128 bytes, are not counted)
        assert 0 <= r["measured_weights_bytes"] - r["weights_bytes"] <= 128, r["method"]
        assert abs(r["peak_error_pct"]) < 1.0, (r["method"], r["peak_error_pct"])


def test_int8_checkpointed_within_1pct_of_cpu_tracker():
    # bitsandbytes' MatMul8bitFp keeps each input on its autograd context, which checkpointing does not drop
    # (layer_saves.layer_saves): the estimate was 8.7% under before it counted them, and 0.3% under before it
    # counted the first layer's (transformers' checkpointing makes the embeddings' output require grad)
    setup = TrainingSetup(batch_size=2, seq_len=64, dtype="int8", grad_checkpointing=True)
    r = run_bench(TINY, [METHODS["lora"]], [8], "all-linear", setup, steps=1, warmup=1, impl="peft",
                  progress=False, device="cpu")[0]
    assert r["status"] == "ok", r["error"]
    assert abs(r["peak_error_pct"]) < 0.1, r["peak_error_pct"]


def test_int8_dora_on_cpu_is_skipped_with_the_reason():
    rows = run_bench(TINY, [METHODS["dora"]], [8], "all-linear", TrainingSetup(seq_len=32, dtype="int8"),
                     steps=1, warmup=1, impl="peft", progress=False, device="cpu")
    assert rows[0]["status"] == "skipped" and "int8" in rows[0]["error"]


def test_bench_cli_nf4_on_cpu():
    res = CliRunner().invoke(cli, ["bench", "-m", "tiny-llama", "--dtype", "nf4", "--device", "cpu",
                                   "--impl", "peft", "--method", "lora", "--seq-len", "32", "--steps", "1",
                                   "--warmup", "1", "--kbit-prepare", "--optimizer", "paged-adamw-8bit",
                                   "--no-progress", "-f", "json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    row = json.loads(res.output[res.output.index("["):])[0]
    assert row["status"] == "ok" and row["dtype"] == "nf4"
    assert abs(row["peak_error_pct"]) < 1.0
