"""Training every method with lorabench bench's own pieces: measure.builders.build_lorabench (lorabench.nn's
model, the method, its optimizer and after-step hooks) stepped by measure.loops.PlainLoop. The step, the
optimizers, LoRA+'s groups, Delta-LoRA's rule, frozen weights, learning."""

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from lorabench.estimator.case import Case
from lorabench.errors import LorabenchError
from lorabench.estimator.setup import TrainingSetup
from lorabench.measure.builders import build_lorabench
from lorabench.measure.loops import PlainLoop
from lorabench.methods import METHODS
from lorabench.models.presets import PRESETS
from lorabench.nn.adapters import adapter_layers
from lorabench.nn.delta import DeltaLoRAUpdate

SEED = 2024
TINY = replace(PRESETS["tiny-llama"], hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
               num_kv_heads=2, head_dim=16, vocab_size=128)
TINY_GPT2 = replace(PRESETS["gpt2"], hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4,
                    num_kv_heads=4, head_dim=16, vocab_size=128, max_positions=32)
# Learning rates under which 30 AdamW steps memorize a fixed batch (VeRA's vectors need a large one).
LR = {"full": 1e-2, "lora": 1e-2, "lora-fa": 3e-2, "vera": 1e-1, "delta-lora": 1e-2, "lora-plus": 1e-3,
      "dora": 1e-2}
# Required drop in loss after 30 steps (observed: full ~4.8, the adapters 0.55 to 1.0).
MIN_DROP = 0.4


def build_training(spec, method, rank=8, alpha=None, targets=None, optimizer="adamw", lr=1e-4, dtype="fp32",
                   layers=None, seed=0, delta_lambda=0.5, delta_start_step=0):
    """A model with method applied (alpha None: alpha = rank, scale 1), its optimizer and hooks, on the CPU, with
    the plain loop's step: .model, .optimizer, .hooks, .adapters, .step(ids) -> the loss."""
    spec = spec.with_layers(layers) if layers else spec
    setup = TrainingSetup(dtype=dtype, optimizer=optimizer, alpha=float(alpha or rank or 16), device="cpu",
                          impl="lorabench", loop="plain")
    device = torch.device("cpu")
    built = build_lorabench(Case(spec, METHODS[method], rank, targets, setup), device, seed, lr=lr,
                            delta_lambda=delta_lambda, delta_start_step=delta_start_step)
    loop = PlainLoop(built, 1, device)
    return SimpleNamespace(model=built.model, optimizer=built.optimizer, hooks=built.hooks,
                           adapters=adapter_layers(built.model), step=loop.step)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(SEED)


def _batch(batch=4, seq=16):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(SEED))


@pytest.mark.parametrize("spec", [TINY, TINY_GPT2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_thirty_steps_lower_the_loss(spec, method):
    trainer = build_training(spec, method, rank=4, alpha=8, targets="all-linear", lr=LR[method], seed=SEED)
    ids = _batch()
    losses = [trainer.step(ids).item() for _ in range(30)]
    # A fresh N(0, 0.02) model predicts nearly uniformly: loss ~ ln(vocab).
    assert abs(losses[0] - math.log(128)) < 0.1
    assert losses[-1] < losses[0] - MIN_DROP


def test_step_clears_gradients_and_returns_detached_loss():
    trainer = build_training(TINY, "lora", rank=4, lr=1e-3, seed=SEED)
    loss = trainer.step(_batch())
    assert loss.ndim == 0 and not loss.requires_grad
    assert all(p.grad is None for p in trainer.model.parameters())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_frozen_weights_stay_unchanged(method):
    trainer = build_training(TINY, method, rank=4, alpha=8, targets="q,v,down", optimizer="sgd", lr=1e-1,
                             seed=SEED)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    buffers = {n: b.clone() for n, b in trainer.model.named_buffers()}
    trainer.step(_batch())
    after = dict(trainer.model.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    trainable = {n for n, p in after.items() if p.requires_grad}
    if method == "delta-lora":
        # W moves (by the rule, tested below) in the adapted layers only, never through a gradient.
        adapted_w = {n for n in before if n.endswith("base.weight")}
        assert moved - trainable == adapted_w
        assert not any(after[n].requires_grad for n in adapted_w)
    else:
        assert moved <= trainable
    assert moved & trainable
    assert all(torch.equal(b, dict(trainer.model.named_buffers())[n]) for n, b in buffers.items())


def test_lora_plus_groups_carry_the_ratio():
    trainer = build_training(TINY, "lora-plus", rank=4, targets="all-linear", lr=2e-4, seed=SEED)
    a_group, b_group = trainer.optimizer.param_groups
    assert a_group["lr"] == 2e-4 and b_group["lr"] == 2e-4 * 16
    assert {id(p) for p in b_group["params"]} == {id(m.lora_b) for m in trainer.adapters}
    assert {id(p) for p in a_group["params"]} == {id(m.lora_a) for m in trainer.adapters}
    assert len(trainer.adapters) == 2 * 7


def test_other_methods_use_one_group():
    for method in ("lora", "dora", "vera"):
        trainer = build_training(TINY, method, rank=4, lr=3e-4, seed=SEED)
        assert [g["lr"] for g in trainer.optimizer.param_groups] == [3e-4]


def _delta_trainer(start_step):
    return build_training(TINY, "delta-lora", rank=4, alpha=8, targets="q,v", optimizer="sgd", lr=0.5,
                          seed=SEED, delta_lambda=0.5, delta_start_step=start_step)


def _snapshot(trainer):
    return [(m.base.weight.detach().clone(), m.lora_a.detach().clone(), m.lora_b.detach().clone())
            for m in trainer.adapters]


def test_delta_lora_moves_w_by_the_rule_over_two_steps():
    trainer = _delta_trainer(start_step=0)
    ids = _batch()
    s0 = _snapshot(trainer)
    trainer.step(ids)
    s1 = _snapshot(trainer)
    trainer.step(ids)
    s2 = _snapshot(trainer)
    scale = 8 / 4
    for (w0, a0, b0), (w1, a1, b1), (w2, a2, b2) in zip(s0, s1, s2):
        assert not torch.equal(b1, b0) and not torch.equal(a2, a1)
        # Zi et al. 2023 eq. 8: W_{t+1} = W_t + lambda (alpha / r)(B_{t+1} A_{t+1} - B_t A_t).
        torch.testing.assert_close(w1, w0 + 0.5 * scale * (b1 @ a1 - b0 @ a0), rtol=0, atol=1e-6)
        torch.testing.assert_close(w2, w1 + 0.5 * scale * (b2 @ a2 - b1 @ a1), rtol=0, atol=1e-6)


def test_delta_lora_waits_for_start_step_but_tracks_the_product():
    trainer = _delta_trainer(start_step=1)
    ids = _batch()
    s0 = _snapshot(trainer)
    trainer.step(ids)
    s1 = _snapshot(trainer)
    trainer.step(ids)
    s2 = _snapshot(trainer)
    for (w0, _, _), (w1, a1, b1), (w2, a2, b2) in zip(s0, s1, s2):
        assert torch.equal(w1, w0)
        torch.testing.assert_close(w2, w0 + 0.5 * 2.0 * (b2 @ a2 - b1 @ a1), rtol=0, atol=1e-6)


def test_delta_lora_w_has_no_gradient_or_optimizer_state():
    trainer = build_training(TINY, "delta-lora", rank=4, targets="q,v", optimizer="adamw", lr=1e-3, seed=SEED)
    trainer.step(_batch())
    weights = {id(m.base.weight) for m in trainer.adapters}
    assert not any(id(p) in weights for g in trainer.optimizer.param_groups for p in g["params"])
    assert not any(id(p) in weights for p in trainer.optimizer.state)
    (hook,) = trainer.hooks
    # The only extra state: a copy of A (4 x 64) and B (64 x 4 for q, 32 x 4 for v) per layer.
    assert hook.state_numel() == 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4))


def test_delta_lora_update_rejects_bad_arguments():
    with pytest.raises(ValueError):
        DeltaLoRAUpdate([])
    trainer = _delta_trainer(start_step=0)
    with pytest.raises(ValueError):
        DeltaLoRAUpdate(trainer.adapters, start_step=-1)


@pytest.mark.parametrize("optimizer,state_keys", [("adamw", {"step", "exp_avg", "exp_avg_sq"}),
                                                  ("sgd", set()), ("sgd-momentum", {"momentum_buffer"})])
def test_optimizers_hold_the_states_the_estimator_counts(optimizer, state_keys):
    trainer = build_training(TINY, "lora", rank=4, optimizer=optimizer, lr=1e-3, seed=SEED)
    trainer.step(_batch())
    states = [set(s) for s in trainer.optimizer.state.values() if s]
    assert all(s == state_keys for s in states)
    assert len(states) == (0 if not state_keys else 2 * 2 * 2)
    if optimizer == "sgd-momentum":
        assert trainer.optimizer.param_groups[0]["momentum"] == 0.9


@pytest.mark.parametrize("optimizer", ["adamw-8bit", "paged-adamw-8bit", "paged-adamw"])
def test_bitsandbytes_optimizers_run_on_cpu(optimizer):
    pytest.importorskip("bitsandbytes")
    from lorabench.measure.builders import expected_library_warnings

    trainer = build_training(TINY, "lora", rank=8, optimizer=optimizer, seed=SEED)
    with expected_library_warnings():  # paged ones say, on a CPU, that they run unpaged
        assert torch.isfinite(trainer.step(torch.randint(0, TINY.vocab_size, (1, 8))))
    assert trainer.optimizer.state  # (this model's adapters are under bitsandbytes' 4096-element 8-bit minimum)


def test_unknown_optimizer_is_refused():
    with pytest.raises(LorabenchError, match="unknown optimizer"):
        build_training(TINY, "lora", optimizer="adafactor", seed=SEED)


def test_layers_cut_the_model():
    trainer = build_training(PRESETS["tiny-llama"], "vera", rank=4, layers=1, dtype="bf16", seed=SEED)
    assert len(trainer.model.layers) == 1 and trainer.model.embed.weight.dtype == torch.bfloat16
    assert torch.isfinite(trainer.step(torch.randint(0, 4096, (1, 8))))
