"""The step-time model against every committed measured step (benchmarks/check_steptime.py reads them).

Each case is rebuilt as it was measured (model and layers, method, rank, targets, batch, sequence length,
dtype, implementation, checkpointing) and estimated for the catalog H100-80GB at the default efficiencies, or
for the CPU described by what it measured. Rows the model does not meet are left out by name with a reason;
the counts below keep that list from growing unnoticed.
"""

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import pytest
from lorabench.estimator.case import Case

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "check_steptime.py"
_spec = importlib.util.spec_from_file_location("check_steptime", SCRIPT)
check_steptime = sys.modules["check_steptime"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(check_steptime)

TOLERANCE = 0.25
CASES = list(check_steptime.cases())
CHECKED = [c for c in CASES if not c.excluded]
# Measured steps per source file, and the excluded ones per reason (benchmarks/check_steptime.py says why).
ROWS = {"gpu-sweep-h100/bench_lorabench_qv.json": 13, "gpu-sweep-h100/bench_lorabench_qv_ckpt.json": 13,
        "gpu-sweep-h100/bench_peft_qv.json": 11, "gpu-sweep-h100/bench_peft_alllinear.json": 11,
        "gpu-sweep-h100/bench_peft_alllinear_ckpt.json": 11, "h100-llama-3-8b/results.json": 19,
        "cpu-tiny-llama-lorabench/results.json": 13, "cpu-tiny-llama-peft-all-linear/results.json": 11,
        "probes/lorabench_nn_h100_llama-3-8b.json": 26, "probes/hf_peft_alllinear_h100_llama-3-8b.json": 4,
        "probes/families_h100_2layers.jsonl": 94, "probes/families_h100_4layers.jsonl": 94}
EXCLUDED = {check_steptime.EXCLUDED_FAMILIES["gemma3_text"]: 28, check_steptime.PHI3_CKPT: 8,
            check_steptime.NOISY: 10, check_steptime.SLOWER_THAN_FULL: 5,
            check_steptime.FORWARD_SLOWER_THAN_FULL: 4}


def test_every_committed_measurement_is_read():
    assert Counter(c.source for c in CASES) == ROWS
    assert Counter(c.excluded for c in CASES if c.excluded) == EXCLUDED
    # everything from lorabench bench and the Llama probes is checked; exclusions are all family probes
    assert all(c.source.startswith("probes/families") for c in CASES if c.excluded)


def test_mixtures_of_experts_are_checked():
    """Mixtral (8 experts, 2 per token) and Qwen3-MoE (128, 8 per token) at 2 and 4 layers: 48 probes, all but
    the disturbed ones in the 25% check."""
    moe = [c for c in CASES if c.spec_config and c.spec_config["model_type"] in ("mixtral", "qwen3_moe")]
    assert len(moe) == 48 and sum(not c.excluded for c in moe) == 44


def test_moe_stalls_are_what_the_probes_give():
    """lorabench.estimator.stepwork.MOE_STALL_S is the fit benchmarks/check_steptime.py --fit-moe recomputes, to 10 us."""
    from lorabench.estimator.stepwork import MOE_STALL_S

    fitted = check_steptime.fit_moe()
    assert fitted.keys() == MOE_STALL_S.keys()
    for key, value in fitted.items():
        assert abs(value - MOE_STALL_S[key]) <= 10e-6, (key, value, MOE_STALL_S[key])


def test_moe_stalls_are_a_gpu_cost_only():
    """A CPU pays each op's host time already: the same Mixtral step on the CPU device has no stall in it,
    and on the H100 the stalls are the forward and backward constants per layer."""
    from lorabench.estimator.compute import estimate_step_time
    from lorabench.estimator.setup import TrainingSetup
    from lorabench.methods import METHODS
    from lorabench.estimator.params import count_params
    from lorabench.models.presets import from_name
    from lorabench.estimator.stepwork import MOE_STALL_S, step_ops

    spec = from_name("mixtral-8x7b").with_layers(2)
    lora = METHODS["lora"]
    targets = count_params(spec, lora, 8, None).targets
    setup = TrainingSetup(seq_len=512)
    stalls = [op for op in step_ops(Case(spec, lora, 8, targets, setup)) if op.kind == "stall"]
    per_layer = MOE_STALL_S["forward"] + 8 * MOE_STALL_S["forward_per_expert"] + MOE_STALL_S["backward"]
    assert sum(op.seconds * op.runs for op in stalls) == pytest.approx(2 * per_layer)
    gpu = estimate_step_time(Case(spec, lora, 8, targets, setup), check_steptime.H100)
    cpu = estimate_step_time(Case(spec, lora, 8, targets, setup), check_steptime.cpu_device(0.5))
    assert gpu.overhead_ms >= 1e3 * 2 * per_layer
    no_stall = [op for op in step_ops(Case(spec, lora, 8, targets, setup)) if op.kind != "stall"]
    from lorabench.estimator.compute import op_seconds
    assert cpu.step_ms == pytest.approx(1e3 * sum(sum(op_seconds(op, check_steptime.cpu_device(0.5)))
                                                  for op in no_stall))


@pytest.mark.parametrize("case", CHECKED, ids=[f"{c.source}:{c.label}" for c in CHECKED])
def test_step_time_within_25_percent_of_measured(case):
    est = case.estimate()
    assert abs(est.step_ms / case.measured_ms - 1) <= TOLERANCE, (est.step_ms, case.measured_ms)


def _pairs(source, rank=8):
    by = {(c.method, c.rank): c for c in CASES if c.source == source}
    return by[("dora", rank)], by[("lora", rank)]


@pytest.mark.parametrize("source", ["gpu-sweep-h100/bench_peft_alllinear.json",
                                    "gpu-sweep-h100/bench_peft_alllinear_ckpt.json",
                                    "gpu-sweep-h100/bench_peft_qv.json", "gpu-sweep-h100/bench_lorabench_qv.json",
                                    "h100-llama-3-8b/results.json"])
@pytest.mark.parametrize("rank", [8, 64])
def test_dora_is_slower_than_lora_by_about_the_measured_ratio(source, rank):
    """PEFT's DoRA on all-linear measured 1.8x LoRA's step (1.9-2.0x with checkpointing), 1.1x on q,v;
    lorabench's DoRA (one addmm for the norm) 1.03-1.06x."""
    dora, lora = _pairs(source, rank)
    measured = dora.measured_ms / lora.measured_ms
    estimated = dora.estimate().step_ms / lora.estimate().step_ms
    assert estimated > 1.0
    assert estimated == pytest.approx(measured, rel=0.1)


def test_methods_are_ordered_as_measured_on_all_linear():
    """Full fine-tuning, DoRA, LoRA and LoRA-FA in the order the H100 measured them."""
    by = {(c.method, c.rank): c for c in CASES if c.source == "gpu-sweep-h100/bench_peft_alllinear.json"}
    for slower, faster in ((("dora", 8), ("full", None)), (("full", None), ("lora", 8)),
                           (("lora", 8), ("lora-fa", 8)), (("lora", 64), ("lora", 8))):
        assert by[slower].measured_ms > by[faster].measured_ms
        assert by[slower].estimate().step_ms > by[faster].estimate().step_ms
