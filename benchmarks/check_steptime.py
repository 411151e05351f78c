"""The step-time model against every committed measurement of a training step.

Reads the step times `lorabench bench` and the probes recorded (reports/gpu-sweep-h100/bench_*.json,
reports/h100-llama-3-8b, reports/cpu-tiny-llama-*, reports/probes/*.json and *.jsonl), rebuilds each case's
estimate with the same model, layers, method, rank, targets, batch, sequence length, dtype, implementation
and checkpointing, and prints estimated against measured milliseconds.

H100 rows are estimated for the catalog's H100-80GB at the default efficiencies (what `--gpu H100-80GB`
answers). CPU rows run on no catalog device: they are estimated for a device made of the matmul ceiling the
bench measured in the same run (matmul_tflops) and lorabench.estimator.compute.CPU_*.

    python benchmarks/check_steptime.py [--tolerance-pct 25] [--all]

Exit status: 0 every row within tolerance, 1 otherwise.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from dataclasses import dataclass, replace
from typing import Dict, Iterator, List, Optional, Tuple

from lorabench.estimator.case import Case as EstimateCase  # (Case below is one measured step)
from lorabench.estimator.compute import Device, StepTime, device_for_gpu, estimate_step_time
from lorabench.estimator.compute import cpu_device as compute_cpu_device
from lorabench.gpus import get_gpu
from lorabench.models.hfconfig import from_hf_config
from lorabench.estimator.setup import TrainingSetup
from lorabench.methods import METHODS
from lorabench.estimator.params import count_params
from lorabench.models.presets import from_name

REPORTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "reports")



# Rows the model does not meet, left out of the check by name with the reason (benchmarks/README and the
# README's "Time and cost" say the same).
EXCLUDED_FAMILIES = {
    "gemma3_text": "Gemma 3 (1024-token sliding windows at 2048 tokens, so SDPA gets an explicit mask): its "
                   "backward agrees with the model within about 0.5 ms a layer, but its forward measured 1.6 ms "
                   "(full) to 6.7 ms (LoRA on all-linear) a layer above the estimate, growing with the adapted "
                   "modules; nothing in transformers 5.17's Gemma 3 or PEFT explains it, and the probes keep no "
                   "kernel trace to tell (a torch.profiler run on a GPU would)",
}
PHI3_CKPT = ("Phi-3 with gradient checkpointing and a LoRA-style adapter: backward measured 2.2-2.6x the same "
             "case without checkpointing (recomputation at 1.7-2.2x its own forward; 0.9-1.0x in every other "
             "family) with optimizer phases of 0.4-1.2 ms where the same step takes 0.1 ms elsewhere")
NOISY = ("a 3-step median that contradicts its twin: this case at 2 layers measured a phase slower than at 4 "
         "layers (a disturbed measurement)")
FORWARD_SLOWER_THAN_FULL = (
    "a 3-step median that contradicts its twin: an adapter on q,v-style targets measured a forward over 25% "
    "slower, relative to full fine-tuning's forward of the same model and setup, than the adapter's own work "
    "accounts for (the same products plus the adapters'; a disturbed measurement)")
SLOWER_THAN_FULL = ("a 3-step median that contradicts the physics: an adapter on q,v-style targets measured a "
                    "slower backward than full fine-tuning of the same model and setup, which does all of its "
                    "work and every weight gradient besides (a disturbed measurement)")


@dataclass(frozen=True)
class Case:
    """One measured step and how to rebuild its estimate."""

    source: str
    label: str
    spec_name: str
    method: str
    rank: Optional[int]
    targets: Optional[str]
    setup: TrainingSetup
    device: Device
    measured_ms: float
    measured_phases: Tuple[Optional[float], Optional[float], Optional[float]]
    spec_config: Optional[Dict] = None
    layers: Optional[int] = None
    excluded: Optional[str] = None

    def spec(self):
        spec = from_hf_config(self.spec_config, name=self.spec_name) if self.spec_config else from_name(self.spec_name)
        return spec.with_layers(self.layers) if self.layers else spec

    def estimate(self) -> StepTime:
        spec, method = self.spec(), METHODS[self.method]
        counts = count_params(spec, method, self.rank, self.targets)
        return estimate_step_time(EstimateCase(spec, method, self.rank, counts.targets, self.setup), self.device)


H100 = device_for_gpu(get_gpu("H100-80GB"))


def cpu_device(matmul_tflops: float) -> Device:
    return compute_cpu_device(matmul_tflops * 1e12)


def _phases(row: Dict) -> Tuple[Optional[float], ...]:
    return tuple(row.get(f"measured_{p}_ms") for p in ("forward", "backward", "optimizer"))


def _label(method: str, rank, targets: Optional[str], layers, ckpt: bool, extra: str = "") -> str:
    r = f" r={rank}" if rank else ""
    t = f" {targets}" if targets else ""
    return f"{extra}{layers}L {method}{r}{t}{' ckpt' if ckpt else ''}"


def _bench_rows(path: str, rows: List[Dict], setup_of) -> Iterator[Case]:
    """Rows as `lorabench bench` (and `report --bench`) writes them."""
    for row in rows:
        step = row.get("measured_step_ms")
        if not step or row.get("status", row.get("bench_status")) != "ok":
            continue
        setup, layers = setup_of(row)
        device = H100 if "H100" in str(row.get("device_name") or row.get("bench_device_name")) \
            else cpu_device(row["matmul_tflops"])
        targets = row["targets"] or None
        yield Case(os.path.relpath(path, REPORTS), _label(row["method"], row["rank"], targets, layers,
                                                          setup.grad_checkpointing, f"{setup.impl} "),
                   row["model"], row["method"], row["rank"], targets, setup, device, step, _phases(row),
                   layers=layers)


def cases() -> Iterator[Case]:
    """Every committed measured step."""
    for path in sorted(glob.glob(os.path.join(REPORTS, "gpu-sweep-h100", "bench_*.json"))):
        with open(path, encoding="utf-8") as fh:
            rows = json.load(fh)
        yield from _bench_rows(path, rows, lambda r: (TrainingSetup(
            batch_size=r["batch_size"], seq_len=r["seq_len"], dtype=r["dtype"], optimizer=r["optimizer"],
            grad_checkpointing=r["grad_checkpointing"], impl=r["impl"], device=r["device"]), r["layers"]))
    for name in ("h100-llama-3-8b", "cpu-tiny-llama-lorabench", "cpu-tiny-llama-peft-all-linear"):
        path = os.path.join(REPORTS, name, "results.json")
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        st = data["settings"]["setup"]
        yield from _bench_rows(path, data["rows"], lambda r, st=st: (TrainingSetup(
            batch_size=st["batch_size"], seq_len=st["seq_len"], dtype=st["dtype"],
            adapter_dtype=st["adapter_dtype"], optimizer=st["optimizer"],
            grad_checkpointing=st["grad_checkpointing"], attention=st["attention"], dropout=st["dropout"],
            impl=r["bench_impl"], device=r["bench_device"]), r["bench_layers"]))
    for name in ("lorabench_nn_h100_llama-3-8b.json", "hf_peft_alllinear_h100_llama-3-8b.json"):
        path = os.path.join(REPORTS, "probes", name)
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        for r in data["results"]:
            step = r["measured"].get("step_ms")
            if not step:
                continue
            impl = "peft" if r.get("impl") == "hf" else r["impl"]
            targets = ",".join(r["estimate"]["targets"]) or None
            setup = TrainingSetup(seq_len=r["seq_len"], grad_checkpointing=bool(r["ckpt"]), impl=impl)
            yield Case(f"probes/{name}", _label(r["method"], r["rank"], targets, r["layers"], bool(r["ckpt"]),
                                                f"{impl} "),
                       "llama-3-8b", r["method"], r["rank"], targets, setup, H100, step, (None, None, None),
                       layers=r["layers"])
    yield from _family_cases()


def _family_cases() -> Iterator[Case]:
    """transformers + PEFT steps of other families (scripts/probe_families.py), at 2 and 4 layers."""
    found: List[Case] = []
    for path in sorted(glob.glob(os.path.join(REPORTS, "probes", "families_h100_*.jsonl"))):
        with open(path, encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        for r in rows:
            if r.get("header") or r.get("status") != "ok":
                continue
            # full fine-tuning rows carry the q,v targets of the sweep; they train every weight
            targets = None if r["method"] == "full" else r["targets"]
            setup = TrainingSetup(batch_size=r["batch_size"], seq_len=r["seq_len"], dtype=r["dtype"],
                                  adapter_dtype=r["adapter_dtype"], optimizer=r["optimizer"],
                                  grad_checkpointing=r["grad_checkpointing"], attention=r["attn_implementation"],
                                  impl="peft")
            layers = r["config"]["num_hidden_layers"]
            found.append(Case(f"probes/{os.path.basename(path)}",
                              _label(r["method"], r["rank"], targets, layers, r["grad_checkpointing"],
                                     f"{r['model']} "),
                              r["model"], r["method"], r["rank"], targets, setup, H100, r["measured_step_ms"],
                              _phases(r), spec_config=r["config"],
                              excluded=EXCLUDED_FAMILIES.get(r["config"]["model_type"])))
    twins: Dict[Tuple, Dict[int, Case]] = {}
    for case in found:
        key = (case.spec_name, case.method, case.targets, case.setup.grad_checkpointing)
        twins.setdefault(key, {})[case.spec_config["num_hidden_layers"]] = case
    for case in found:
        key = (case.spec_name, case.method, case.targets, case.setup.grad_checkpointing)
        two, four = twins[key].get(2), twins[key].get(4)
        full = twins[(case.spec_name, "full", None, case.setup.grad_checkpointing)].get(
            case.spec_config["num_hidden_layers"])
        if case.excluded is None and case.spec_config["model_type"] == "phi3" and case.setup.grad_checkpointing \
                and case.method in ("lora", "lora-fa", "vera", "lora-plus"):
            case = replace(case, excluded=PHI3_CKPT)
        elif case.excluded is None and two and four and any(
                a > b for a, b in zip(two.measured_phases[:2], four.measured_phases[:2])):
            case = replace(case, excluded=NOISY)
        elif (case.excluded is None and case.targets != "all-linear" and case.method != "full" and full
              and case.measured_phases[1] > full.measured_phases[1]):
            case = replace(case, excluded=SLOWER_THAN_FULL)
        elif (case.excluded is None and case.targets != "all-linear" and case.method != "full" and full
              and case.measured_phases[0] / full.measured_phases[0]
              > 1.25 * case.estimate().forward_ms / full.estimate().forward_ms):
            case = replace(case, excluded=FORWARD_SLOWER_THAN_FULL)
        yield case


def measure_cpu() -> Dict[str, float]:
    """What lorabench.estimator.compute.CPU_* hold, measured on this machine (torch needed)."""
    import torch
    from torch.utils.benchmark import Timer

    def median_s(stmt: str, **env) -> float:
        return Timer(stmt, globals={"torch": torch, **env}).blocked_autorange(min_run_time=0.5).median

    n = 1024
    rates = {}
    for dtype in (torch.bfloat16, torch.float32):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        rates[dtype] = 2 * n ** 3 / median_s("torch.mm(a, b)", a=a, b=b)
    x, y = torch.randn(512, 688, dtype=torch.bfloat16), torch.randn(512, 688, dtype=torch.bfloat16)
    add = median_s("x + y", x=x, y=y)
    lin = torch.nn.Linear(64, 64)
    h = torch.randn(8, 64)
    module = median_s("lin(h)", lin=lin, h=h)
    a, b = torch.randn(512, 256, dtype=torch.bfloat16), torch.randn(256, 8, dtype=torch.bfloat16)
    small = median_s("torch.mm(a, b)", a=a, b=b) - 2 * 512 * 256 * 8 / rates[torch.bfloat16]
    return {"bf16_matmul_flops": rates[torch.bfloat16], "fp32_ratio": rates[torch.float32] / rates[torch.bfloat16],
            "bandwidth_bytes_s": 3 * x.numel() * 2 / add, "module_call_s": module, "gemm_tail_s": small}


def fit_moe() -> Dict[str, float]:
    """The MoE routing stalls (lorabench.estimator.stepwork.MOE_STALL_S) recomputed from the H100 probes: per
    family, the median per-layer excess of measured over estimated (without the stalls) time, per layer from the 4-
    and 2-layer twins; forward from every case whose experts are not merged (full and q,v targets; the forward is
    the same with checkpointing), fitted as a + b * experts over the two families; backward from the cases whose
    experts only pass gradients through (q,v adapters, no checkpointing), one median."""
    import statistics
    from unittest import mock

    from lorabench.estimator import stepwork

    twins: Dict[Tuple, Dict[int, Tuple[Case, StepTime]]] = {}
    with mock.patch.dict(stepwork.MOE_STALL_S, {k: 0.0 for k in stepwork.MOE_STALL_S}):
        for case in _family_cases():
            cfg = case.spec_config
            if cfg["model_type"] not in ("mixtral", "qwen3_moe") or case.targets == "all-linear":
                continue
            key = (cfg["model_type"], case.method, case.setup.grad_checkpointing)
            twins.setdefault(key, {})[cfg["num_hidden_layers"]] = (case, replace(case, excluded=None).estimate())
    forward: Dict[int, List[float]] = {}
    backward: List[float] = []
    for (family, method, ckpt), pair in twins.items():
        (c2, e2), (c4, e4) = pair[2], pair[4]
        experts = c2.spec().num_experts
        forward.setdefault(experts, []).append(
            ((c4.measured_phases[0] - c2.measured_phases[0]) - (e4.forward_ms - e2.forward_ms)) / 2)
        if method != "full" and not ckpt:
            backward.append(((c4.measured_phases[1] - c2.measured_phases[1]) - (e4.backward_ms - e2.backward_ms)) / 2)
    (e_lo, f_lo), (e_hi, f_hi) = sorted((e, statistics.median(v)) for e, v in forward.items())
    per_expert = (f_hi - f_lo) / (e_hi - e_lo)
    return {"forward": (f_lo - per_expert * e_lo) / 1e3, "forward_per_expert": per_expert / 1e3,
            "backward": statistics.median(backward) / 1e3}


def error_pct(case: Case, est: StepTime) -> float:
    return 100.0 * (est.step_ms / case.measured_ms - 1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tolerance-pct", type=float, default=25.0)
    parser.add_argument("--all", action="store_true", help="print every row, not only those off tolerance")
    parser.add_argument("--measure-cpu", action="store_true", help="measure this CPU's CPU_* figures and exit")
    parser.add_argument("--fit-moe", action="store_true",
                        help="recompute lorabench.estimator.stepwork.MOE_STALL_S from the H100 probes and exit")
    args = parser.parse_args()
    if args.fit_moe:
        for key, value in fit_moe().items():
            print(f"{key:20} {value * 1e6:8.1f} us")
        return 0
    if args.measure_cpu:
        for key, value in measure_cpu().items():
            print(f"{key:20} {value:.4g}")
        return 0
    bad = excluded = 0
    print(f"{'source':42} {'case':58} {'est ms':>8} {'meas ms':>8} {'err %':>7}   est f/b/o        meas f/b/o")
    for case in cases():
        if case.excluded:
            excluded += 1
            if args.all:
                print(f"{case.source[:42]:42} {case.label[:58]:58} excluded: {case.excluded[:60]}")
            continue
        est = case.estimate()
        err = error_pct(case, est)
        off = abs(err) > args.tolerance_pct
        bad += off
        if off or args.all:
            mf = "/".join("-" if v is None else f"{v:.1f}" for v in case.measured_phases)
            print(f"{case.source[:42]:42} {case.label[:58]:58} {est.step_ms:8.1f} {case.measured_ms:8.1f} "
                  f"{err:+7.1f}   {est.forward_ms:.1f}/{est.backward_ms:.1f}/{est.optimizer_ms:.1f}  {mf}"
                  f"{'  <-- off' if off else ''}")
    print(f"{bad} rows off by more than {args.tolerance_pct}%; {excluded} excluded")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
