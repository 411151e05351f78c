"""Autocast mixed precision (--autocast bf16 over fp32 weights), measured on the CPU live-tensor tracker against
the estimate, steady state (a step after the warm-up that created the optimizer states), and the per-layer
bytes written out by hand from what autograd keeps under torch.autocast."""

import pytest

from lorabench.estimator.case import Case
from lorabench.measure.bench import run_bench
from lorabench.errors import LorabenchError
from lorabench.estimator.layer_saves import layer_activation_bytes
from lorabench.estimator.memory import estimate_memory, step_parts
from lorabench.estimator.setup import TrainingSetup
from lorabench.methods import METHODS
from lorabench.models.presets import from_name

TINY = from_name("tiny-llama")  # d=256, ffn=688, 4 layers, 8 heads (4 kv) of 32, vocab 4096
D, FFN, R, Q, KV, HEADS, V, L = 256, 688, 8, 256, 128, 8, 4096, 4


def _rows(methods, loop="trainer", impl="peft", **setup):
    pytest.importorskip("transformers")
    setup = {"autocast": "bf16", **setup}
    s = TrainingSetup(batch_size=2, seq_len=64, dtype="fp32", loop=loop, device="cpu",
                      **{k: v for k, v in setup.items() if k != "targets"})
    rows = run_bench(TINY, [METHODS[m] for m in methods], [8], setup.get("targets"), s, steps=1, warmup=2,
                     impl=impl, progress=False, device="cpu")
    for r in rows:
        assert r["status"] == "ok", (r["method"], r["error"])
    return rows


@pytest.mark.parametrize("loop,impl,methods,setup", [
    ("trainer", "peft", ("full", "lora", "lora-fa", "dora", "vera"), {}),
    ("plain", "peft", ("full", "lora"), {}),
    ("trainer", "lorabench", ("lora", "dora", "vera"), {"targets": "all-linear"}),
    ("trainer", "peft", ("vera", "dora"), {"targets": "all-linear"}),
    ("trainer", "peft", ("full", "lora"), {"grad_checkpointing": True}),
    ("trainer", "peft", ("full", "lora"), {"grad_accum": 4}),
    ("plain", "peft", ("lora", "dora"), {"dropout": 0.1}),
    ("plain", "peft", ("full", "lora"), {"autocast": "fp16"}),  # (with GradScaler)
])
def test_autocast_within_1pct_of_the_cpu_tracker(loop, impl, methods, setup):
    for r in _rows(methods, loop, impl, **setup):
        assert abs(r["peak_error_pct"]) < 1.0, (r["method"], r["peak_error_pct"])
        for phase in ("forward", "backward", "optimizer"):  # every phase, not only the peak's
            est, got = r[f"{phase}_peak_bytes"], r[f"measured_{phase}_peak_bytes"]
            assert abs(est - got) / got < 0.01, (r["method"], phase, est, got)
        assert r["autocast"] == setup.get("autocast", "bf16") and r["dtype"] == "fp32"


def test_lora_layer_under_autocast_by_hand():
    """PEFT LoRA on q, v under bf16 autocast, one layer whose input needs a gradient, per token: the residual
    stream and both RMSNorms stay fp32 (the fp32 copy of x and the rsqrt, 4 d + 4 each); each lora_A casts x
    to bf16 for itself (2 d, twice); A x is bf16 (2 r, twice); SDPA keeps bf16 q, k, v, its output and the
    fp32 log-sum-exp; the MLP keeps bf16 gate, silu and up outputs. Per layer: every projection's weight cast
    to bf16 (its input needs a gradient, so the product keeps the weight for it), and the cached casts of A
    and B."""
    setup = TrainingSetup(seq_len=64, dtype="fp32", autocast="bf16", device="cpu")
    per_token = (2 * (4 * D + 4) + 2 * (2 * D) + 2 * (2 * R) + 2 * (2 * Q + 2 * KV) + 4 * HEADS
                 + 3 * 2 * FFN)
    assert layer_activation_bytes(Case(TINY, METHODS["lora"], 8, ("q", "v"), setup)) == per_token
    weights = 2 * (D * Q + 2 * D * KV + Q * D + 3 * D * FFN)
    adapters = 2 * R * (D + Q) + 2 * R * (D + KV)
    t = 2 * 64
    one_layer = step_parts(Case(TINY, METHODS["lora"], 8, ("q", "v"), TrainingSetup(batch_size=2, seq_len=64,
                           dtype="fp32", autocast="bf16", device="cpu", loop="plain"))).act.saved_bytes
    # (the whole model's saved bytes grow by exactly one layer's when a layer is added)
    two = from_name("tiny-llama").with_layers(L + 1)
    more = step_parts(Case(two, METHODS["lora"], 8, ("q", "v"), TrainingSetup(batch_size=2, seq_len=64, dtype="fp32",
                      autocast="bf16", device="cpu", loop="plain"))).act.saved_bytes
    assert more - one_layer == t * per_token + weights + adapters


def test_autocast_keeps_frozen_weight_casts():
    """The headline of autocast over a frozen fp32 base: the bf16 copy of every frozen weight is kept for
    backward, 2 bytes per weight beside the fp32 4. What does not grow with the tokens (saved bytes at 2,048
    tokens twice over, less those at 4,096) is exactly those casts for Llama-3-8B with LoRA r=16 on q, v:
    every decoder projection but layer 0's q, k, v (its input needs no gradient: the embeddings are frozen),
    the output head (the embedding is not autocast), and A and B of the 64 adapted layers."""
    spec = from_name("llama-3-8b")

    def saved(seq):
        setup = TrainingSetup(seq_len=seq, dtype="fp32", autocast="bf16")
        return step_parts(Case(spec, METHODS["lora"], 16, ("q", "v"), setup)).act.saved_bytes

    d, kv, ffn, layers, vocab, r = 4096, 1024, 14336, 32, 128_256, 16
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * ffn
    casts = 2 * (layers * per_layer - d * (d + 2 * kv) + vocab * d)
    adapters = 2 * r * layers * ((d + d) + (d + kv))
    assert 2 * saved(2048) - saved(4096) == casts + adapters
    assert casts == 14_958_985_216  # 13.9 GiB beside 32.1 GB of fp32 weights
    bf16 = estimate_memory(Case(spec, METHODS["lora"], 16, setup=TrainingSetup()))
    auto = estimate_memory(Case(spec, METHODS["lora"], 16, setup=TrainingSetup(dtype="fp32", autocast="bf16")))
    assert auto.weights_bytes - bf16.weights_bytes == 2 * 8_030_261_248


def test_autocast_needs_fp32_weights_and_trainer_fp16_runs_on_cuda_only():
    with pytest.raises(LorabenchError, match="--dtype fp32"):
        TrainingSetup(dtype="bf16", autocast="bf16").validate()
    pytest.importorskip("transformers")
    s = TrainingSetup(batch_size=2, seq_len=64, dtype="fp32", autocast="fp16", device="cpu")
    rows = run_bench(TINY, [METHODS["lora"]], [8], None, s, steps=1, warmup=1, impl="peft", progress=False,
                     device="cpu")
    assert rows[0]["status"] == "skipped" and "native AMP" in rows[0]["error"]


def test_trainer_runs_the_forward_under_autocast():
    """Trainer's bf16=True reaches the model through accelerate.prepare: the head's product comes out bf16
    from fp32 weights."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from lorabench.measure.bench import build_peft
    from lorabench.measure.loops import TrainerLoop

    setup = TrainingSetup(batch_size=2, seq_len=16, dtype="fp32", autocast="bf16", device="cpu").for_spec(TINY)
    built = build_peft(Case(TINY, METHODS["lora"], 8, ("q", "v"), setup), torch.device("cpu"))
    seen = []
    head = built.model.get_base_model().lm_head
    head.register_forward_hook(lambda m, i, o: seen.append((m.weight.dtype, o.dtype)))
    loop = TrainerLoop(built, 2, 1, torch.device("cpu"), autocast="bf16")
    try:
        loop.step(torch.randint(0, V, (2, 16)), lambda phase: None)
    finally:
        loop.close()
    assert seen == [(torch.float32, torch.bfloat16)]
