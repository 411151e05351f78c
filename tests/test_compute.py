"""FLOPs per step: hand counts from the 2 x tokens x in x out rule."""

from lorabench.compute import estimate_flops, estimate_step_time
from lorabench.gpus import get_gpu
from lorabench.memory import TrainingSetup
from lorabench.methods import METHODS
from lorabench.specs import PRESETS, from_dimension


def test_single_matrix_full_is_6_t_d2_and_lora_adds_adapter_products():
    spec, t = from_dimension(4096), 512
    setup = TrainingSetup(seq_len=t)
    full = estimate_flops(spec, METHODS["full"], None, (), setup)
    assert full.step_flops == 6 * t * 4096 * 4096  # forward 2, input grad 2, weight grad 2
    lora = estimate_flops(spec, METHODS["lora"], 8, ("w",), setup)
    adapter = 2 * 8 * (4096 + 4096)  # A then B, per token
    # forward: W and adapter; backward: input grad of W, input and weight grads of A and B
    assert lora.step_flops == t * (2 * 4096 * 4096 + adapter + 2 * 4096 * 4096 + 2 * adapter)


def test_llama3_8b_full_is_about_6n_per_token():
    spec = PRESETS["llama-3-8b"]
    f = estimate_flops(spec, METHODS["full"], None, (), TrainingSetup(seq_len=2048))
    n_matmul = 8_030_261_248 - 128256 * 4096 - 65 * 4096  # the embedding lookup and norms do no matmul
    attention = 32 * 3 * 2 * 2048 * 4096                  # causal QK^T and AV, forward + 2x backward
    assert f.flops_per_token == 6 * n_matmul + attention


def test_frozen_base_costs_two_thirds_and_checkpointing_adds_a_forward():
    spec, setup = PRESETS["llama-3-8b"], TrainingSetup(seq_len=2048)
    full = estimate_flops(spec, METHODS["full"], None, (), setup)
    lora = estimate_flops(spec, METHODS["lora"], 8, ("q", "v"), setup)
    assert 0.66 < lora.step_flops / full.step_flops < 0.70
    ckpt = estimate_flops(spec, METHODS["lora"], 8, ("q", "v"), TrainingSetup(seq_len=2048, grad_checkpointing=True))
    assert ckpt.recompute_flops == lora.forward_flops - 2048 * 2 * 4096 * 128256  # layers again, not the head


def test_step_time_from_peak_and_mfu():
    spec = from_dimension(4096)
    f = estimate_flops(spec, METHODS["full"], None, (), TrainingSetup(seq_len=1000))
    t = estimate_step_time(f, get_gpu("H100-80GB"), 0.5, 1000)
    assert abs(t.step_ms - 1e3 * 6 * 1000 * 4096 ** 2 / (989.4e12 * 0.5)) < 1e-9
