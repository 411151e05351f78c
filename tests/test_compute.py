"""FLOPs per step (hand counts from the 2 x tokens x in x out rule), the step-time roofline, training cost."""

import math

import pytest

from lorabench.estimator.case import Case
from lorabench.estimator.compute import Device, MATMUL_EFFICIENCY, device_for_gpu, estimate_step_time, op_seconds
from lorabench.estimator.cost import CostSetup, estimate_training_cost
from lorabench.estimator.flops import estimate_flops
from lorabench.errors import LorabenchError
from lorabench.gpus import PRICES, get_gpu
from lorabench.estimator.setup import TrainingSetup
from lorabench.methods import METHODS
from lorabench.estimator.params import count_params
from lorabench.models.presets import PRESETS
from lorabench.models.spec import from_dimension
from lorabench.estimator.ops import Op

# A device with round numbers and nothing but the roofline: 100 TFLOP/s bf16, 10 fp32, 1 TB/s.
PLAIN = Device("plain", 100e12, 10e12, 1e12, 200e12)


def test_single_matrix_full_is_6_t_d2_and_lora_adds_adapter_products():
    spec, t = from_dimension(4096), 512
    setup = TrainingSetup(seq_len=t)
    full = estimate_flops(Case(spec, METHODS["full"], None, (), setup))
    assert full.step_flops == 6 * t * 4096 * 4096  # forward 2, input grad 2, weight grad 2
    lora = estimate_flops(Case(spec, METHODS["lora"], 8, ("w",), setup))
    adapter = 2 * 8 * (4096 + 4096)  # A then B, per token
    # forward: W and adapter. Backward: the lone matrix's input needs no gradient (nothing before it trains), so
    # autograd runs neither W's input gradient nor A's: B's input gradient (2 r out), dB (2 r out), dA (2 r in)
    assert lora.step_flops == t * (2 * 4096 * 4096 + adapter + 3 * 2 * 8 * 4096)
    two = estimate_flops(Case(from_dimension(4096, 2), METHODS["lora"], 8, ("w",), setup))
    # a second matrix's input does need one: its W and A input gradients run (2 d^2 + 2 r d)
    assert two.step_flops - 2 * lora.step_flops == t * (2 * 4096 * 4096 + 2 * 8 * 4096)


def test_llama3_8b_full_is_about_6n_per_token():
    spec = PRESETS["llama-3-8b"]
    f = estimate_flops(Case(spec, METHODS["full"], None, (), TrainingSetup(seq_len=2048)))
    n_matmul = 8_030_261_248 - 128256 * 4096 - 65 * 4096  # the embedding lookup and norms do no matmul
    attention = 32 * 3 * 2 * 2048 * 4096                  # causal QK^T and AV, forward + 2x backward
    assert f.flops_per_token == 6 * n_matmul + attention


def test_frozen_base_costs_two_thirds_and_checkpointing_adds_a_forward():
    spec, setup = PRESETS["llama-3-8b"], TrainingSetup(seq_len=2048)
    full = estimate_flops(Case(spec, METHODS["full"], None, (), setup))
    lora = estimate_flops(Case(spec, METHODS["lora"], 8, ("q", "v"), setup))
    assert 0.66 < lora.step_flops / full.step_flops < 0.70
    ckpt = estimate_flops(Case(spec, METHODS["lora"], 8, ("q", "v"),
                               TrainingSetup(seq_len=2048, grad_checkpointing=True)))
    assert ckpt.recompute_flops == lora.forward_flops - 2048 * 2 * 4096 * 128256  # layers again, not the head


def test_op_time_is_the_larger_of_compute_and_memory():
    gemm = Op("g", "forward", "gemm", 2e12, 1e9, 2, runs=3)  # 20 ms of FLOPs, 1 ms of bytes
    assert op_seconds(gemm, PLAIN) == (pytest.approx(3 * 2e12 / 100e12), 0.0)
    skinny = Op("a", "forward", "gemm", 1e9, 4e9, 4)  # fp32: 0.1 ms of FLOPs, 4 ms of bytes
    assert op_seconds(skinny, PLAIN)[0] == pytest.approx(4e9 / 1e12)
    stream = Op("n", "forward", "stream", 0.0, 5e9, launches=6)
    assert op_seconds(stream, PLAIN)[0] == pytest.approx(5e-3)
    strided = Op("w", "forward", "stream", 0.0, 5e9, strided=True)
    gpu = device_for_gpu(get_gpu("H100-80GB"))
    assert op_seconds(strided, gpu)[0] == pytest.approx(2 * op_seconds(stream, gpu)[0])


def test_full_fine_tuning_of_one_matrix_written_out():
    """--d 4096, 1000 tokens, bf16, AdamW: three products (forward, input and weight gradients) and the
    optimizer's 19 reads and writes per 2-byte parameter, nothing else."""
    d, t = 4096, 1000
    spec, setup = from_dimension(d), TrainingSetup(seq_len=t)
    got = estimate_step_time(Case(spec, METHODS["full"], None, (), setup), PLAIN)
    product = max(2 * t * d * d / 100e12, 2 * (t * d + d * d + t * d) / 1e12)
    optimizer = 19 * 2 * d * d / 1e12
    assert got.step_ms == pytest.approx(1e3 * (3 * product + optimizer))
    assert got.forward_ms == pytest.approx(1e3 * product)
    assert got.optimizer_ms == pytest.approx(1e3 * optimizer)
    assert got.matmul_ms + got.memory_ms == pytest.approx(got.step_ms)
    flops = estimate_flops(Case(spec, METHODS["full"], None, (), setup))
    assert got.mfu == pytest.approx(flops.step_flops / (got.step_ms / 1e3) / 200e12)
    assert got.tokens_per_s == pytest.approx(t / (got.step_ms / 1e3))


def _step(method, rank=16, targets=None, spec=PRESETS["llama-3-8b"], device=None, **setup):
    counts = count_params(spec, METHODS[method], rank, targets)
    return estimate_step_time(Case(spec, METHODS[method], rank, counts.targets, TrainingSetup(**setup)),
                              device or device_for_gpu(get_gpu("H100-80GB")))


def test_methods_cost_what_they_run():
    lora, dora, full = _step("lora"), _step("dora"), _step("full")
    assert lora.step_ms < dora.step_ms < full.step_ms
    assert _step("lora-fa").step_ms < lora.step_ms  # no weight gradient for A
    # PEFT's DoRA on every projection rebuilds W + s B A per layer: its step is far longer than LoRA's
    assert _step("dora", targets="all-linear").step_ms > 1.5 * _step("lora", targets="all-linear").step_ms
    assert _step("lora", dtype="nf4").step_ms > lora.step_ms  # a dequantized weight per product
    assert _step("lora", dtype="int8").step_ms > lora.step_ms
    assert _step("lora", grad_checkpointing=True).backward_ms > lora.backward_ms  # recomputation
    assert _step("delta-lora").optimizer_ms > lora.optimizer_ms  # W += the low-rank change
    assert full.optimizer_ms > 100 * lora.optimizer_ms  # AdamW over 8e9 parameters, memory-bound


def test_mfu_option_sets_the_matmul_efficiency_and_the_row_reports_what_it_implies():
    h100 = get_gpu("H100-80GB")
    default, slow = _step("lora"), _step("lora", device=device_for_gpu(h100, 0.35))
    assert default.matmul_efficiency == MATMUL_EFFICIENCY and slow.matmul_efficiency == 0.35
    assert slow.memory_ms == pytest.approx(default.memory_ms)  # bandwidth-bound work does not change
    assert slow.matmul_ms > 1.5 * default.matmul_ms  # large products 2x slower; skinny ones stay memory-bound
    assert 0 < slow.mfu < default.mfu < default.matmul_efficiency


def test_training_time_and_cost():
    step = _step("lora")
    run = estimate_training_cost(step, 2048, 1, CostSetup(tokens=10 ** 9, price_per_gpu_hour=2.0))
    assert run.train_steps == math.ceil(10 ** 9 / 2048)
    assert run.train_hours == pytest.approx(run.train_steps * step.step_ms / 3.6e6)
    assert run.gpu_hours == run.train_hours and run.cost_usd == pytest.approx(2.0 * run.gpu_hours)
    assert run.price_source == "--price"
    # 8 GPUs, each its own 2048-token batch: an eighth of the steps and hours, the same GPU-hours
    eight = estimate_training_cost(step, 2048, 8, CostSetup(dataset_tokens=5 * 10 ** 8, epochs=2,
                                                            price_per_gpu_hour=2.0))
    assert eight.train_tokens == 10 ** 9 and eight.train_steps == math.ceil(10 ** 9 / (8 * 2048))
    assert eight.gpu_hours == pytest.approx(8 * eight.train_hours)
    assert eight.gpu_hours == pytest.approx(run.gpu_hours, rel=1e-4)
    assert estimate_training_cost(step, 2048, 1, CostSetup()) is None  # no tokens, no run


def test_catalog_price_is_the_default_and_price_overrides_it():
    gpu = get_gpu("H100-80GB")
    step = _step("lora")
    run = estimate_training_cost(step, 2048, 1, CostSetup(tokens=10 ** 8), gpu)
    if gpu.name in PRICES:
        assert run.price_per_gpu_hour == PRICES[gpu.name].usd_per_gpu_hour
        assert run.price_source == PRICES[gpu.name].source
    mine = estimate_training_cost(step, 2048, 1, CostSetup(tokens=10 ** 8, price_per_gpu_hour=1.25), gpu)
    assert mine.price_per_gpu_hour == 1.25 and mine.cost_usd == pytest.approx(1.25 * mine.gpu_hours)


@pytest.mark.parametrize("cost, message", [
    (CostSetup(tokens=10, dataset_tokens=10), "not both"),
    (CostSetup(tokens=0), "positive"),
    (CostSetup(dataset_tokens=10, epochs=0.0), "epochs"),
    (CostSetup(tokens=10, price_per_gpu_hour=float("nan")), "price"),
])
def test_cost_setup_refuses_what_it_cannot_price(cost, message):
    with pytest.raises(LorabenchError, match=message):
        cost.validate()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_method_and_target_set_has_a_step_time(preset):
    """Every family (mixtures of experts, fused projections, eager attention) and every method, on the
    default targets and all-linear, with and without checkpointing, quantized where the method allows."""
    spec = PRESETS[preset].with_layers(2)
    gpu = device_for_gpu(get_gpu("H100-80GB"))
    for method in METHODS.values():
        for targets in (None, "all-linear"):
            if method.adapter.moe_refusal and not method.adapter.linear_modules_only and targets and spec.moe:
                continue  # PEFT refuses DoRA on fused experts
            counts = count_params(spec, method, 8, targets)
            for ckpt in (False, True):
                for dtype in ("bf16", "nf4") if method.allows_quantized_base else ("bf16",):
                    t = estimate_step_time(Case(spec, method, 8, counts.targets,
                                           TrainingSetup(seq_len=256, grad_checkpointing=ckpt, dtype=dtype)), gpu)
                    assert t.step_ms > 0 and 0 < t.mfu < 1
                    assert t.step_ms == pytest.approx(t.forward_ms + t.backward_ms + t.optimizer_ms)
