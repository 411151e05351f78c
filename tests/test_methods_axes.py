"""A new method is one Method entry: counts, memory, step time and the nn build follow from its axes.

Two methods that exist nowhere else are registered here (monkeypatched into METHODS): LoRA-FA with LoRA+'s
B learning-rate ratio, and DoRA with A frozen (LoRA-FA's rule on DoRA's structure). Each is checked against
hand formulas and against the existing methods whose axes it combines.
"""

from dataclasses import replace

import pytest
import torch

from lorabench.estimator.case import Case
from lorabench.estimator.compute import device_for_gpu, estimate_step_time
from lorabench.estimator.flops import estimate_flops
from lorabench.estimator.layer_saves import layer_activation_bytes
from lorabench.estimator.memory import estimate_memory, step_parts
from lorabench.estimator.setup import TrainingSetup
from lorabench.estimator.params import count_params
from lorabench.gpus import get_gpu
from lorabench.methods import ADAPTERS, METHODS, Method, get_method, resolve_methods
from lorabench.models.presets import PRESETS
from lorabench.nn.adapters import adapter_layers, apply_method, param_groups, step_hooks
from lorabench.nn.lora import DoRALinear, LoRALinear
from lorabench.nn.model import build_model, count_module_params

LORA_FA_PLUS = Method("lora-fa-plus", ADAPTERS["lora"], "LoRA-FA with LoRA+'s B learning rate", "test",
                      trains_a=False, b_lr_ratio=16.0)
DORA_FA = Method("dora-fa", ADAPTERS["dora"], "DoRA with A frozen random", "test", trains_a=False)
LLAMA3_8B = PRESETS["llama-3-8b"]  # 32 layers; q 4096 -> 4096, v 4096 -> 1024
TINY = replace(PRESETS["tiny-llama"], hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
               num_kv_heads=2, head_dim=16, vocab_size=128)
SEED = 11


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    monkeypatch.setitem(METHODS, LORA_FA_PLUS.name, LORA_FA_PLUS)
    monkeypatch.setitem(METHODS, DORA_FA.name, DORA_FA)


def test_registered_by_name_like_any_method():
    assert get_method("LoRA-FA-Plus") is LORA_FA_PLUS
    assert resolve_methods(["all"])[-2:] == (LORA_FA_PLUS, DORA_FA)


def test_counts_by_hand():
    # LoRA-FA+: only B (out x r) trains; A (r x in) is a frozen parameter, in the total
    c = count_params(LLAMA3_8B, LORA_FA_PLUS, 8, "q,v")
    assert c.trainable_params == 32 * 8 * (4096 + 1024) == 1_310_720
    assert c.adapter_params == 32 * 8 * ((4096 + 4096) + (4096 + 1024)) == 3_407_872
    assert c.total_params == 8_030_261_248 + 3_407_872
    assert not c.updates_base_weights
    # DoRA-FA: B and the magnitude (out) train
    d = count_params(LLAMA3_8B, DORA_FA, 8, "q,v")
    assert d.trainable_params == 32 * (8 * (4096 + 1024) + (4096 + 1024)) == 1_474_560
    assert d.adapter_params == 3_407_872 + 32 * (4096 + 1024)


def test_counts_are_those_of_the_methods_combined():
    for targets in ("q,v", "all-linear"):
        fa = count_params(LLAMA3_8B, METHODS["lora-fa"], 16, targets)
        assert count_params(LLAMA3_8B, LORA_FA_PLUS, 16, targets).per_target == fa.per_target
        dora, lora = (count_params(LLAMA3_8B, METHODS[m], 16, targets) for m in ("dora", "lora"))
        dora_fa = count_params(LLAMA3_8B, DORA_FA, 16, targets)
        # freezing A removes the same parameters from DoRA's trainable count as from LoRA's
        assert dora.trainable_params - dora_fa.trainable_params == lora.trainable_params - fa.trainable_params
        assert dora_fa.total_params == dora.total_params


def test_memory_by_hand_and_as_lora_fa():
    est = estimate_memory(Case(LLAMA3_8B, LORA_FA_PLUS, 8, "q,v"))
    assert est.adapter_bytes == 4 * 3_407_872        # fp32 A and B
    assert est.gradients_bytes == 4 * 1_310_720      # B's only
    assert est.optimizer_bytes == 2 * 4 * 1_310_720  # AdamW's two fp32 states of B
    assert est.method_state_bytes == 0
    # a ratio of learning rates changes no memory: every component and peak is LoRA-FA's
    fa = estimate_memory(Case(LLAMA3_8B, METHODS["lora-fa"], 8, "q,v"))
    assert replace(est, method="lora-fa") == fa
    for setup in (TrainingSetup(impl="lorabench", dropout=0.1), TrainingSetup(grad_checkpointing=True)):
        parts = step_parts(Case(LLAMA3_8B, LORA_FA_PLUS, 8, "all-linear", setup))
        fa_parts = step_parts(Case(LLAMA3_8B, METHODS["lora-fa"], 8, "all-linear", setup))
        assert parts.phase_peaks() == fa_parts.phase_peaks() and parts.act == fa_parts.act


def test_dora_fa_activations_are_dora_less_the_inputs_a_needs():
    # lorabench's layers, bf16 (a=2), q and v read the same norm output: DoRA keeps it once for A's gradient,
    # DoRA-FA (A frozen) keeps none of it, exactly LoRA's difference to LoRA-FA (a d per token)
    setup, tiny = TrainingSetup(seq_len=128, impl="lorabench"), PRESETS["tiny-llama"]
    dora, dora_fa = (layer_activation_bytes(Case(tiny, m, 8, ("q", "v"), setup)) for m in (METHODS["dora"], DORA_FA))
    assert dora - dora_fa == 2 * tiny.hidden_size
    # its optimizer state: two fp32 states of B and m
    est = estimate_memory(Case(LLAMA3_8B, DORA_FA, 8, "q,v"))
    assert est.optimizer_bytes == 2 * 4 * 1_474_560


def test_step_time_flops_by_hand():
    setup = TrainingSetup(batch_size=1, seq_len=2048)
    gpu = device_for_gpu(get_gpu("H100-80GB"))
    flops = estimate_flops(Case(LLAMA3_8B, LORA_FA_PLUS, 8, ("q", "v"), setup))
    lora = estimate_flops(Case(LLAMA3_8B, METHODS["lora"], 8, ("q", "v"), setup))
    # no dA product: 2 r in FLOPs per token less per adapted layer than LoRA's backward
    assert lora.backward_flops - flops.backward_flops == 2048 * 32 * 2 * 8 * (4096 + 4096)
    assert flops.forward_flops == lora.forward_flops
    fa = estimate_step_time(Case(LLAMA3_8B, METHODS["lora-fa"], 8, ("q", "v"), setup), gpu)
    assert estimate_step_time(Case(LLAMA3_8B, LORA_FA_PLUS, 8, ("q", "v"), setup), gpu) == fa
    dora = estimate_flops(Case(LLAMA3_8B, METHODS["dora"], 8, ("q", "v"), setup))
    dora_fa = estimate_flops(Case(LLAMA3_8B, DORA_FA, 8, ("q", "v"), setup))
    assert dora.backward_flops - dora_fa.backward_flops == lora.backward_flops - flops.backward_flops
    assert dora_fa.update_flops == dora.update_flops == 32 * 2 * 8 * (4096 * 4096 + 4096 * 1024)


def test_nn_build_lora_fa_plus():
    torch.manual_seed(SEED)
    model = build_model(TINY)
    layers = apply_method(model, LORA_FA_PLUS, 4, 8, "q,v", seed=SEED)
    assert len(layers) == 2 * 2 and all(type(m) is LoRALinear for m in layers)
    assert all(not m.lora_a.requires_grad and m.lora_b.requires_grad for m in layers)
    trainable, _ = count_module_params(model)
    assert trainable == count_params(TINY, LORA_FA_PLUS, 4, "q,v").trainable_params == 2 * 4 * (64 + 32)
    a_group, b_group = param_groups(model, LORA_FA_PLUS, 1e-3)
    assert a_group["params"] == [] and b_group["lr"] == pytest.approx(1.6e-2)
    assert {id(p) for p in b_group["params"]} == {id(m.lora_b) for m in layers}
    assert step_hooks(model, LORA_FA_PLUS) == []
    # one AdamW step moves B only
    a_before = [m.lora_a.detach().clone() for m in layers]
    opt = torch.optim.AdamW([g for g in (a_group, b_group) if g["params"]], lr=1e-3)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(SEED))
    model(ids, labels=ids).loss.backward()
    opt.step()
    assert all(torch.equal(m.lora_a, a) for m, a in zip(layers, a_before))
    assert all(m.lora_b.abs().sum() > 0 for m in layers)


def test_nn_build_dora_fa():
    torch.manual_seed(SEED)
    model = build_model(TINY)
    layers = apply_method(model, DORA_FA, 4, 8, "q,v", seed=SEED)
    assert all(type(m) is DoRALinear and not m.lora_a.requires_grad for m in adapter_layers(model))
    assert all(m.lora_b.requires_grad and m.magnitude.requires_grad for m in layers)
    trainable, _ = count_module_params(model)
    assert trainable == count_params(TINY, DORA_FA, 4, "q,v").trainable_params == 2 * (4 * (64 + 32) + (64 + 32))


def test_method_axes_refuse_contradictions():
    with pytest.raises(ValueError):
        Method("vera-a", ADAPTERS["vera"], "", "", trains_a=True)  # a shared pair's A is a buffer
    with pytest.raises(ValueError):
        Method("vera-plus", ADAPTERS["vera"], "", "", b_lr_ratio=4.0)  # no per-layer B to give a ratio
    with pytest.raises(ValueError):
        Method("full-lora", ADAPTERS["lora"], "", "", trains_a=True, base_trainable=True)
