"""lorabench.nn adapters: exact counts, zero start, float64 gradients, saved tensors, shared VeRA storage."""

from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lorabench.errors import LorabenchError
from lorabench.methods import METHODS
from lorabench.estimator.params import count_params
from lorabench.models.presets import PRESETS
from lorabench.nn.adapters import adapter_layers, apply_method
from lorabench.nn.lora import DoRALinear, LoRALinear
from lorabench.nn.model import build_model, count_module_params
from lorabench.nn.vera import VeRALinear, VeRAProjections

SEED = 7
TINY = replace(PRESETS["tiny-llama"], hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
               num_kv_heads=2, head_dim=16, vocab_size=128)
TINY_GPT2 = replace(PRESETS["gpt2"], hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4,
                    num_kv_heads=4, head_dim=16, vocab_size=128, max_positions=32)
ADAPTERS = [m for m in METHODS if m != "full"]


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(SEED)


def _nn_targets(spec, method, targets):
    """The targets lorabench.nn can adapt: its all-linear is the nn.Linear modules, never a mixture of
    experts' router and experts (PEFT's ParamWrapper; VeRA's all-linear leaves them out anyway)."""
    if targets == "all-linear" and spec.arch.moe_targets and not METHODS[method].adapter.linear_modules_only:
        return ",".join(spec.linear_shapes())
    return targets


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_counts_off_full_size_meta_modules_equal_count_params(name, method):
    spec = PRESETS[name]
    for rank, targets in ((8, None), (16, "all-linear")):
        targets = _nn_targets(spec, method, targets)
        model = build_model(spec, device="meta")
        apply_method(model, method, rank, 16, targets)
        expected = count_params(spec, METHODS[method], rank, targets)
        assert count_module_params(model) == (expected.trainable_params, expected.total_params)


def test_vera_projections_are_buffers_not_parameters():
    model = build_model(TINY, device="meta")
    apply_method(model, "vera", 8, None, "all-linear")
    buffers = dict(model.named_buffers())
    # Shared: one A [r, max in] and one B [max out, r], listed once however many layers use them.
    assert sorted(t.shape for t in buffers.values()) == [(8, 96), (96, 8)]
    assert not [n for n, _ in model.named_parameters() if "shared" in n]


@pytest.mark.parametrize("spec", [TINY, TINY_GPT2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_step_zero_output_is_the_base_output(spec, method):
    model = build_model(spec, seed=SEED)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        before = model(ids).logits
        apply_method(model, method, 4, 8, "all-linear")
        after = model(ids).logits
    if method == "dora":
        # m / ||W|| is exactly 1, but W x + b runs as matmul-then-add rather than nn.Linear's fused addmm.
        torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    else:
        assert torch.equal(after, before)


def test_trainable_flags_per_method():
    for method in METHODS:
        model = build_model(TINY, device="meta")
        layers = apply_method(model, method, 4, 8, "q,v")
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        if method == "full":
            assert len(names) == len(list(model.parameters())) and not layers
            continue
        assert all(n.split(".")[-1] in {"lora_a", "lora_b", "magnitude", "lambda_d", "lambda_b"} for n in names)
        assert len(layers) == 2 * 2
        if method == "lora-fa":
            assert all(not layer.lora_a.requires_grad and layer.lora_b.requires_grad for layer in layers)


def test_vera_layers_share_one_storage():
    model = build_model(TINY)
    layers = apply_method(model, "vera", 4, None, "all-linear")
    assert len(layers) == 2 * 7
    a_ptrs = {layer.vera_a.untyped_storage().data_ptr() for layer in layers}
    b_ptrs = {layer.vera_b.untyped_storage().data_ptr() for layer in layers}
    assert len(a_ptrs) == 1 and len(b_ptrs) == 1
    assert len({id(layer.shared) for layer in layers}) == 1
    down = model.layers[0].mlp.down
    assert down.vera_a.shape == (4, 96) and down.vera_b.shape == (64, 4)


def test_lora_defaults_follow_peft():
    layer = LoRALinear(nn.Linear(32, 48), rank=4, alpha=8, generator=torch.Generator().manual_seed(0))
    assert layer.scale == 2.0 and layer.dropout is None
    assert torch.equal(layer.lora_b, torch.zeros(48, 4))
    expected = torch.empty(4, 32)
    nn.init.kaiming_uniform_(expected, a=5 ** 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(layer.lora_a, expected)


def _saved_tensors(module, x):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        module(x)
    return saved


def test_lora_fa_keeps_no_input_for_backward():
    x = torch.randn(2, 5, 32, requires_grad=True)
    base = nn.Linear(32, 48)
    lora = LoRALinear(base, 4, 8)
    fa = LoRALinear(nn.Linear(32, 48), 4, 8, train_a=False)
    lora_saved, fa_saved = _saved_tensors(lora, x), _saved_tensors(fa, x)
    ptr = x.untyped_storage().data_ptr()
    assert any(t.untyped_storage().data_ptr() == ptr for t in lora_saved)
    assert not any(t.untyped_storage().data_ptr() == ptr for t in fa_saved)

    def nbytes(ts):
        return sum(t.numel() * t.element_size() for t in ts)

    # Exactly x's bytes (2 x 5 x 32 float32) separate LoRA from LoRA-FA: A x (r-wide) is all FA keeps.
    assert nbytes(lora_saved) - nbytes(fa_saved) == 2 * 5 * 32 * 4
    assert any(t.shape == (10, 4) for t in fa_saved)


def test_lora_adapters_on_one_input_share_its_saved_copy():
    x = torch.randn(2, 5, 32, requires_grad=True)
    layers = [LoRALinear(nn.Linear(32, n), 4, 8) for n in (32, 16, 16)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        for layer in layers:
            layer(x)
    full_width = {t.untyped_storage().data_ptr() for t in saved if t.numel() == x.numel()}
    assert full_width == {x.untyped_storage().data_ptr()}


def _nonzero_(params):
    with torch.no_grad():
        for p in params:
            p.normal_(0.0, 0.5)


def test_lora_gradients_match_float64_finite_differences():
    layer = LoRALinear(nn.Linear(6, 5, dtype=torch.float64), 3, 6, dtype=torch.float64)
    _nonzero_([layer.lora_b])
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)

    def f(x, a, b):
        return functional_call(layer, {"lora_a": a, "lora_b": b}, (x,))

    a, b = (p.detach().clone().requires_grad_() for p in (layer.lora_a, layer.lora_b))
    assert torch.autograd.gradcheck(f, (x, a, b))


def test_dora_gradients_match_float64_with_norm_held_constant():
    layer = DoRALinear(nn.Linear(6, 5, dtype=torch.float64), 3, 6, dtype=torch.float64)
    _nonzero_([layer.lora_b])
    with torch.no_grad():
        layer.magnitude.mul_(torch.linspace(0.5, 1.5, 5, dtype=torch.float64))
    # The paper detaches ||W + sBA||: finite differences must see it as the constant it is to backward.
    norm = layer.weight_norm(torch.float64)
    layer.weight_norm = lambda dtype: norm
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)

    def f(x, a, b, m):
        return functional_call(layer, {"lora_a": a, "lora_b": b, "magnitude": m}, (x,))

    params = [p.detach().clone().requires_grad_() for p in (layer.lora_a, layer.lora_b, layer.magnitude)]
    assert torch.autograd.gradcheck(f, (x, *params))


def test_vera_gradients_match_float64_finite_differences():
    shared = VeRAProjections(3, 7, 8, seed=0, dtype=torch.float64)
    layer = VeRALinear(nn.Linear(6, 5, dtype=torch.float64), shared, dtype=torch.float64)
    _nonzero_([layer.lambda_b])
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)

    def f(x, d, b):
        return functional_call(layer, {"lambda_d": d, "lambda_b": b}, (x,))

    d, b = (p.detach().clone().requires_grad_() for p in (layer.lambda_d, layer.lambda_b))
    assert torch.autograd.gradcheck(f, (x, d, b))


def test_bf16_base_with_float32_adapters():
    model = build_model(TINY, dtype=torch.bfloat16, seed=SEED)
    layers = apply_method(model, "lora", 4, 8, "all-linear")
    _nonzero_([layer.lora_b for layer in layers])
    out = model(torch.randint(0, 128, (2, 6)), labels=torch.randint(0, 128, (2, 6)))
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert {layer.lora_b.grad.dtype for layer in layers} == {torch.float32}


def test_adapter_layers_finds_wrappers():
    model = build_model(TINY, device="meta")
    layers = apply_method(model, "dora", 4, 8, "o,down")
    assert adapter_layers(model) == layers and len(layers) == 4


def test_dropout_only_when_asked():
    model = build_model(TINY, device="meta")
    layers = apply_method(model, "lora", 4, 8, "q", dropout=0.1)
    assert all(isinstance(layer.dropout, nn.Dropout) for layer in layers)
    # Delta-LoRA runs its low-rank path without dropout (Zi et al. 2023).
    model = build_model(TINY, device="meta")
    assert all(layer.dropout is None for layer in apply_method(model, "delta-lora", 4, 8, "q", dropout=0.1))


@pytest.mark.parametrize("kwargs,match", [
    ({"method": "lora", "quantization": "nf4"}, "real weights"),  # quantized from weights: not on meta
    ({"method": "delta-lora", "quantization": "int8"}, "writes the base"),
    ({"method": "lora", "quantization": "fp8"}, "unknown base quantization"),
    ({"method": "lora", "targets": "gate,nope"}, "unknown target"),
    ({"method": "lora", "rank": 65}, "larger than target"),
    ({"method": "lorra"}, "Did you mean"),
])
def test_apply_method_errors(kwargs, match):
    model = build_model(TINY, device="meta")
    with pytest.raises(LorabenchError, match=match):
        apply_method(model, **{"rank": 4, **kwargs})


@pytest.mark.parametrize("name,targets", [("mixtral-8x7b", "all-linear"), ("qwen3-30b-a3b", "q,experts"),
                                          ("mixtral-8x7b", "router")])
def test_router_and_experts_are_left_to_peft(name, targets):
    model = build_model(PRESETS[name], device="meta")
    with pytest.raises(LorabenchError, match="router or experts; use --impl peft"):
        apply_method(model, "lora", 8, 16, targets)


def test_moe_linear_targets_are_wrapped():
    model = build_model(PRESETS["qwen1.5-moe-a2.7b"], device="meta", layers=2)
    layers = apply_method(model, "lora", 8, 16, "all-linear")
    # q, k, v, o, the shared expert's gate, up, down and its sigmoid gate (d -> 1), in each of 2 layers.
    assert len(layers) == 2 * 8
    assert model.layers[1].mlp.shared_gate.lora_b.shape == (1, 8)
    vera = build_model(PRESETS["mixtral-8x7b"], device="meta", layers=1)
    assert len(apply_method(vera, "vera", 8, None, "all-linear")) == 4


def test_applying_twice_is_refused():
    model = build_model(TINY, device="meta")
    apply_method(model, "lora", 4, 8, "q")
    with pytest.raises(LorabenchError, match="already has adapters"):
        apply_method(model, "dora", 4, 8, "q")
