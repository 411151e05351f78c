"""QLoRA measured with lorabench's own layers (issue 12): our LoRA, LoRA-FA, DoRA, VeRA and LoRA+ adapters on
bitsandbytes Linear4bit (nf4) and Linear8bitLt (int8) bases, against the estimate on the CPU tracker (the
second step, after a warm-up step)."""

import gc
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from lorabench.estimator.case import Case
from lorabench.measure.bench import build_lorabench, run_bench
from lorabench.cli import cli
from lorabench.errors import LorabenchError
from lorabench.measure.probes import LiveTensorTracker
from lorabench.estimator.memory import step_parts
from lorabench.estimator.setup import TrainingSetup
from lorabench.methods import METHODS
from lorabench.nn.adapters import apply_method
from lorabench.nn.model import build_model, iter_targets
from lorabench.nn.quant import dense_weight
from lorabench.models.presets import from_name

bnb = pytest.importorskip("bitsandbytes")

TINY = from_name("tiny-llama")  # d=256, ffn=688, 4 layers, 8 heads (4 kv) of 32, vocab 4096
ALL_LINEAR = tuple(TINY.linear_shapes())
METHOD_NAMES = ("lora", "lora-fa", "dora", "vera", "lora-plus")
LAYER_TYPES = {"nf4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}


def _bench(dtype, methods, **setup):
    setup = TrainingSetup(batch_size=2, seq_len=64, dtype=dtype, **setup)
    return run_bench(TINY, [METHODS[m] for m in methods], [8], "all-linear", setup, steps=1, warmup=1,
                     impl="lorabench", progress=False, device="cpu")


@pytest.mark.parametrize("dtype", ["nf4", "int8"])
def test_lorabench_layers_on_quantized_base_within_1pct_of_cpu_tracker(dtype):
    for r in _bench(dtype, METHOD_NAMES):
        assert r["status"] == "ok", r["error"]
        # the quantized weights with every constant, and the bf16 embeddings, norms and head
        assert r["measured_weights_bytes"] == r["weights_bytes"], r["method"]
        assert r["measured_gradients_bytes"] == r["gradients_bytes"], r["method"]
        assert abs(r["peak_error_pct"]) < 1.0, (r["method"], r["peak_error_pct"])


def test_int8_checkpointed_keeps_every_base_input_within_1pct():
    # MatMul8bitFp's ctx.A escapes checkpointing: without modeling it the estimate is 8% under here
    for r in _bench("int8", ("lora", "lora-fa"), grad_checkpointing=True):
        assert r["status"] == "ok", r["error"]
        assert abs(r["peak_error_pct"]) < 1.0, (r["method"], r["peak_error_pct"])


def test_int8_plain_loop_keeps_the_graph_through_the_optimizer_step():
    # the plain loop's output holds the loss and so the graph, whose int8 ctx.A inputs (1.4 MB here, 12% of
    # the optimizer phase) stay alive through the optimizer step
    r = _bench("int8", ("lora",), loop="plain")[0]
    assert r["status"] == "ok", r["error"]
    measured = r["measured_optimizer_peak_bytes"]
    assert abs(r["optimizer_peak_bytes"] - measured) / measured < 0.01
    assert abs(r["peak_error_pct"]) < 1.0


def test_graph_held_bytes_by_hand():
    # int8 on the CPU, LoRA on all-linear, 2 x 64 = 128 tokens of bf16 (2 bytes). Every int8 base whose input
    # needs a gradient holds that input until the graph dies: in layer 1 (frozen embeddings) o's input
    # (256), the MLP's input read by gate and up (256) and down's (688); layers 2-4 also q/k/v's (256).
    per_token = 2 * ((256 + 256 + 688) + 3 * (256 + 256 + 256 + 688))
    assert per_token == 11136

    def act(dtype, **kw):
        setup = TrainingSetup(batch_size=2, seq_len=64, dtype=dtype, device="cpu", impl="lorabench", **kw)
        return step_parts(Case(TINY, METHODS["lora"], 8, "all-linear", setup)).act

    int8 = act("int8")
    assert int8.graph_backward_bytes == 128 * per_token
    assert int8.graph_step_bytes == 0  # Trainer's training_step drops the loss after backward
    assert act("nf4").graph_backward_bytes == 0  # MatMul4Bit keeps only its packed weight
    # Checkpointing keeps each layer's input, and these besides; the plain loop keeps them to the step's end.
    ckpt = act("int8", grad_checkpointing=True, loop="plain")
    assert ckpt.saved_bytes - act("nf4", grad_checkpointing=True, loop="plain").saved_bytes == 128 * per_token
    assert ckpt.graph_step_bytes == 128 * per_token


def test_deleting_the_loss_frees_what_the_estimate_says_the_graph_holds():
    setup = TrainingSetup(batch_size=2, seq_len=64, dtype="int8", device="cpu", impl="lorabench").for_spec(TINY)
    tracker = LiveTensorTracker("cpu")
    with tracker:
        built = build_lorabench(Case(TINY, METHODS["lora"], 8, ALL_LINEAR, setup), torch.device("cpu"))
        ids = torch.randint(0, TINY.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
        loss = built.forward(ids).loss
        loss.backward()
        before = tracker.current_bytes
        del loss
        gc.collect()
        freed = tracker.current_bytes - before
    held = step_parts(Case(TINY, METHODS["lora"], 8, "all-linear", setup)).act.graph_backward_bytes
    assert -freed == held + 4  # and the fp32 loss itself


@pytest.mark.parametrize("dtype", ["nf4", "int8"])
def test_every_decoder_projection_is_a_bitsandbytes_layer(dtype):
    model = build_model(TINY, dtype=torch.bfloat16, seed=0)
    layers = apply_method(model, "lora", 8, 16, "q,v", quantization=dtype)
    for _, name, module in iter_targets(model, ALL_LINEAR):
        base = module.base if name in ("q", "v") else module
        assert isinstance(base, LAYER_TYPES[dtype]), (name, type(base))
        assert not base.weight.requires_grad
    assert len(layers) == 2 * TINY.num_layers
    assert type(model.head) is nn.Linear and model.head.weight.dtype == torch.bfloat16
    assert model.embed.weight.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def test_lora_on_nf4_base_is_base_plus_scaled_b_a_x_by_hand():
    torch.manual_seed(0)
    model = build_model(TINY, dtype=torch.bfloat16, seed=0)
    layer = apply_method(model, "lora", 8, 16, "q", quantization="nf4")[0]
    with torch.no_grad():
        layer.lora_b.normal_(0.0, 0.1)  # B starts at zero: give it values so B A x counts
    x = torch.randn(2, 5, 256, dtype=torch.bfloat16)
    out = layer(x).float()
    # by hand in fp32: W dequantized by bitsandbytes itself, then x W^T + (alpha / r) B A x with alpha/r = 2
    w = bnb.functional.dequantize_4bit(layer.base.weight.data, layer.base.weight.quant_state).float()
    assert w.shape == (256, 256)
    xf = x.float()
    expected = xf @ w.T + 2.0 * (xf @ layer.lora_a.T) @ layer.lora_b.T
    assert (2.0 * (xf @ layer.lora_a.T) @ layer.lora_b.T).abs().mean() > 0.1  # the adapter's part is not lost
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)


def test_dequantized_weights_by_hand():
    model = build_model(TINY, dtype=torch.bfloat16, seed=0)
    w = model.layers[0].attn.q.weight.detach().float().clone()
    nf4 = apply_method(model, "dora", 8, 16, "q", quantization="nf4")[0]
    # NF4 keeps 16 levels per 64-value block: the dequantized weight is close to the original, not equal
    assert (dense_weight(nf4.base, torch.float32) - w).abs().max() < 0.25 * w.abs().max()
    # DoRA's magnitude starts at the dequantized rows' norms
    deq = bnb.functional.dequantize_4bit(nf4.base.weight.data, nf4.base.weight.quant_state).float()
    torch.testing.assert_close(nf4.magnitude.detach(), deq.norm(dim=1), rtol=1e-2, atol=1e-4)

    model = build_model(TINY, dtype=torch.bfloat16, seed=0)
    int8 = apply_method(model, "dora", 8, 16, "q", quantization="int8")[0]
    # LLM.int8(): codes times the row's absmax / 127, read before a forward moves them to the layer's state
    codes, scales = int8.base.weight.data.clone(), int8.base.weight.SCB.clone()
    by_hand = codes.float() * scales[:, None] / 127.0
    assert (by_hand - w).abs().max() <= scales.max() / 127.0  # within one step of the row's grid
    int8.train()
    int8(torch.randn(1, 3, 256, dtype=torch.bfloat16, requires_grad=True)).sum().backward()
    assert int8.base.weight.SCB is None  # now on int8.base.state
    torch.testing.assert_close(dense_weight(int8.base, torch.float32), by_hand, rtol=1e-6, atol=1e-8)


def test_quantized_base_refusals():
    with pytest.raises(LorabenchError, match="real weights"):
        apply_method(build_model(TINY, device="meta"), "lora", 8, quantization="nf4")
    with pytest.raises(LorabenchError, match="writes the base"):
        apply_method(build_model(TINY, dtype=torch.bfloat16), "delta-lora", 8, quantization="int8")
    res = CliRunner().invoke(cli, ["bench", "-m", "tiny-llama", "--dtype", "nf4", "--impl", "lorabench",
                                   "--kbit-prepare", "--device", "cpu", "--no-progress"])
    assert res.exit_code == 2 and "--impl peft" in res.output


def test_float_bases_never_import_bitsandbytes():
    code = ("import sys; from lorabench.nn import build_model, apply_method; from lorabench.models.presets import from_name;"
            "m = build_model(from_name('tiny-llama')); apply_method(m, 'dora', 8, quantization=None);"
            "print('bitsandbytes' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == "False"
