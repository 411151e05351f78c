"""The traced step (lorabench.measure.trace: the bench's build on the meta device, fake CPU tensors, the bench's
loop under the live-tensor tracker) against the real CPU step, and at full size against the analytic model."""

from dataclasses import replace

import pytest
import torch

from lorabench.errors import LorabenchError
from lorabench.estimator.case import Case
from lorabench.estimator.memory import estimate_memory
from lorabench.estimator.params import count_params
from lorabench.estimator.setup import PHASES, TrainingSetup
from lorabench.measure.bench import measure_case
from lorabench.measure.trace import trace_case
from lorabench.methods import METHODS
from lorabench.models.hfconfig import from_hf_config
from lorabench.models.presets import from_name
from test_families import SMALL

SETUP = TrainingSetup(batch_size=2, seq_len=64, device="cpu", impl="lorabench")


@pytest.mark.parametrize("impl, method", [(impl, m) for impl in ("lorabench", "peft")
                                          for m in ("full", "lora", "dora", "lora-fa")])
def test_the_trace_is_the_real_cpu_step_to_the_byte(impl, method):
    # transformers + PEFT under Trainer.training_step, or lorabench's layers; every measured field equal
    case = Case(from_name("tiny-llama"), METHODS[method], None if method == "full" else 8, "all-linear",
                replace(SETUP, impl=impl, attention="sdpa"))
    traced = trace_case(case, impl=impl)
    resolved = replace(case, targets=count_params(case.spec, case.method, case.rank, case.targets).targets)
    real = measure_case(resolved, torch.device("cpu"), steps=1, warmup=1, impl=impl)
    assert traced == {k: real[k] for k in traced}
    assert {f"measured_{p}_peak_bytes" for p in PHASES} <= set(traced)


@pytest.mark.parametrize("family", sorted(SMALL))
def test_every_described_family_is_traced_to_the_byte(family):
    # transformers + PEFT (LoRA r=8 on PEFT's default targets) at the families' small test sizes: tied
    # embeddings (Gemma), sliding windows, q/k norms, fused projections (Phi-3), experts (Mixtral, Qwen-MoE)
    spec = from_hf_config(SMALL[family])
    case = Case(spec, METHODS["lora"], 8, None, replace(SETUP, impl="peft"))
    traced = trace_case(case, impl="peft")
    resolved = replace(case, targets=count_params(spec, case.method, case.rank, None).targets)
    real = measure_case(resolved, torch.device("cpu"), steps=1, warmup=1, impl="peft")
    assert traced == {k: real[k] for k in traced}


@pytest.mark.parametrize("impl", ["lorabench", "peft"])
def test_llama_3_8b_at_full_width_is_traced_in_seconds_and_agrees_with_the_analytic_model(impl):
    # LoRA r=16 on every linear layer of Llama-3-8B cut to 2 layers, 1,024 tokens: d=4096, vocab 128,256 at full
    # size, no byte allocated; the analytic estimate of the same step within 0.1% in every phase
    case = Case(from_name("llama-3-8b").with_layers(2), METHODS["lora"], 16, "all-linear",
                replace(SETUP, batch_size=1, seq_len=1024, impl=impl, attention="sdpa"))
    traced = trace_case(case, impl=impl)
    est = estimate_memory(case)
    for phase in PHASES:
        got = traced[f"measured_{phase}_peak_bytes"]
        assert abs(getattr(est, f"{phase}_peak_bytes") - got) <= 0.001 * got, phase
    # the base tensors measured include transformers' RoPE inv_freq buffer: head_dim / 2 fp32 values
    rope = 128 // 2 * 4 if impl == "peft" else 0
    assert traced["measured_weights_bytes"] == est.weights_bytes + rope


@pytest.mark.parametrize("change, msg", [(dict(dtype="nf4"), "not traced yet"), (dict(device="cuda"), "CPU")])
def test_what_is_not_traced_yet_is_refused(change, msg):
    case = Case(from_name("tiny-llama"), METHODS["lora"], 8, None, replace(SETUP, **change))
    with pytest.raises(LorabenchError, match=msg):
        trace_case(case, impl="lorabench")
