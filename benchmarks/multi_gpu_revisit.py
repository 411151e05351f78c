"""The "Neurons, Weights & Fine-Tuning" deep dive's claim revisited past one GPU: "Llama 70B needs ~600 GB, so
you'd need 8 A100s".

For Llama-3-70B (batch 1 x 2,048 tokens per GPU, gradient checkpointing, AdamW, transformers + PEFT layers):
full fine-tuning (bf16 weights, gradients and AdamW states, as the deep dive counts them), LoRA r=16 on every
linear layer over a bf16 base, and QLoRA (the same over an nf4 base), per GPU under none, ddp, zero2 and fsdp on
an A100-80GB and an H100-80GB, with the GPUs each strategy needs; then QLoRA of the 70B model on 2 RTX 4090s
under fsdp, with and without CPU offload: does it fit, and at what batch and sequence length.

Every figure is the estimator's (lorabench.estimator.sharding, lorabench.estimator.comms), with the allocator
allowance of `lorabench memory` (7.6% of the peak) counted in "fits" and "GPUs needed".

    python benchmarks/multi_gpu_revisit.py           # print the tables
    python benchmarks/multi_gpu_revisit.py --write   # rewrite reports/multi-gpu/README.md and results.json
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from typing import Dict, List

from lorabench.estimator.comms import comm_volume, parallel_step_time
from lorabench.estimator.compute import device_for_gpu, estimate_step_time
from lorabench.estimator.fit import Case, limits
from lorabench.gpus import get_gpu
from lorabench.estimator.memory import ALLOCATOR_ALLOWANCE
from lorabench.estimator.setup import TrainingSetup
from lorabench.methods import METHODS
from lorabench.estimator.sharding import Parallel, fit_on_gpu, plan_need_bytes, plan_step, rank_memory
from lorabench.models.presets import from_name

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "reports", "multi-gpu")
MODEL = "llama-3-70b"
SETUP = TrainingSetup(batch_size=1, seq_len=2048, grad_checkpointing=True)
# (label, method, rank, targets, base dtype)
CASES = (("full fine-tuning", "full", None, None, "bf16"), ("LoRA r=16 all-linear", "lora", 16, "all-linear", "bf16"),
         ("QLoRA r=16 all-linear", "lora", 16, "all-linear", "nf4"))
GPUS = ("A100-80GB", "H100-80GB")
SEED_GPUS = 8  # the deep dive's count
GIB = 2 ** 30


def strategy_rows() -> List[Dict]:
    """Per case, GPU and strategy: the GPUs it needs and one GPU's bytes there, and on the deep dive's 8."""
    spec, rows = from_name(MODEL), []
    for label, method, rank, targets, dtype in CASES:
        setup = replace(SETUP, dtype=dtype)
        plan = plan_step(Case(spec, METHODS[method], rank, targets, setup))
        for name in GPUS:
            gpu = get_gpu(name)
            fit = fit_on_gpu(plan, gpu)
            step = estimate_step_time(Case(spec, METHODS[method], rank, plan.parts.counts.targets, setup),
                                      device_for_gpu(gpu))
            needed = {"none": 1 if fit.fits else None, "ddp": fit.gpus_needed_ddp,
                      "zero2": fit.gpus_needed_zero2, "fsdp": fit.gpus_needed_fsdp}
            for sharding, n in needed.items():
                on = 1 if sharding == "none" else SEED_GPUS
                p = Parallel(on, sharding)
                at_seed = rank_memory(plan, p)
                t = parallel_step_time(step, comm_volume(plan, p), p, gpu)
                at_n = None
                if n is not None:  # one GPU whole, or n of them under the strategy
                    at_n = rank_memory(plan, Parallel(n, sharding if n > 1 else "none"))
                rows.append({
                    "case": label, "model": MODEL, "method": method, "rank": rank, "targets": targets, "dtype": dtype,
                    "gpu": name, "gpu_memory_bytes": gpu.memory_bytes, "sharding": sharding, "gpus_needed": n,
                    "peak_bytes_at_needed": at_n.peak_bytes if at_n else None,
                    "device_bytes_at_needed": at_n.device_bytes if at_n else None,
                    "gpus": on, "peak_bytes": at_seed.peak_bytes, "peak_phase": at_seed.peak_phase,
                    "device_bytes": at_seed.device_bytes,
                    "weights_bytes": at_seed.weights_bytes, "gradients_bytes": at_seed.gradients_bytes,
                    "optimizer_bytes": at_seed.optimizer_bytes, "gather_bytes": at_seed.gather_bytes,
                    "bucket_bytes": at_seed.bucket_bytes, "activations_bytes": at_seed.activations_bytes,
                    "fits": plan_need_bytes(plan, p) <= gpu.memory_bytes,
                    "comm_bytes": comm_volume(plan, p).total_bytes, "comm_ms": t.comm_ms,
                    "step_ms_overlap": t.step_ms_overlap, "step_ms_no_overlap": t.step_ms_no_overlap})
    return rows


def rtx4090_rows() -> List[Dict]:
    """QLoRA of the 70B model on 2 RTX 4090s under fsdp: fits at 2,048 tokens, and the largest batch and
    sequence that do (with and without CPU offload; also with the chunked loss, whose logits are a chunk's)."""
    spec, gpu, rows = from_name(MODEL), get_gpu("RTX-4090"), []
    for offload in (False, True):
        for loss in ("standard", "chunked"):
            setup = replace(SETUP, dtype="nf4", loss=loss)
            case = Case(spec, METHODS["lora"], 16, "all-linear", setup, Parallel(2, "fsdp", offload))
            plan = plan_step(case)
            rm = rank_memory(plan, case.parallel)
            lim = limits(case, gpu.memory_bytes)
            step = estimate_step_time(Case(spec, case.method, 16, plan.parts.counts.targets, setup),
                                      device_for_gpu(gpu))
            t = parallel_step_time(step, comm_volume(plan, case.parallel), case.parallel, gpu)
            rows.append({
                "case": "QLoRA r=16 all-linear", "model": MODEL, "gpu": gpu.name, "gpus": 2, "sharding": "fsdp",
                "cpu_offload": offload, "loss": loss, "batch_size": 1, "seq_len": 2048,
                "peak_bytes": rm.peak_bytes, "peak_phase": rm.peak_phase, "device_bytes": rm.device_bytes,
                "weights_bytes": rm.weights_bytes, "gather_bytes": rm.gather_bytes,
                "cpu_offload_bytes": rm.cpu_offload_bytes,
                "required_bytes": plan_need_bytes(plan, case.parallel),
                "fits": plan_need_bytes(plan, case.parallel) <= gpu.memory_bytes,
                "max_batch_size": lim.max_batch_size, "max_seq_len": lim.max_seq_len,
                "comm_ms": t.comm_ms, "step_ms_overlap": t.step_ms_overlap, "step_ms_no_overlap": t.step_ms_no_overlap})
    return rows


def _gib(v) -> str:
    return "" if v is None else f"{v / GIB:,.1f}"


def _n(v) -> str:
    return "none" if v is None else f"{v:,}"


def markdown(rows: List[Dict], small: List[Dict]) -> str:
    out = ["# The deep dive's 70B claim, past one GPU", "",
           "The \"Neurons, Weights & Fine-Tuning\" deep dive: \"Llama 70B at 2 bytes/weight = 140GB just to store "
           "weights. Add gradient memory (another 140GB) and optimiser states (x2) = ~600GB GPU RAM. [...] You'd "
           "need 8 of them [A100 80GB].\"", "",
           f"Estimated by `python benchmarks/multi_gpu_revisit.py --write` for {MODEL}, batch 1 x 2,048 tokens per "
           "GPU, gradient checkpointing, AdamW (bf16 states for bf16 weights), transformers + PEFT layers, "
           f"Trainer's loop; 'fits' keeps {ALLOCATOR_ALLOWANCE:.1%} of the peak free for the allocator, as "
           "`lorabench memory` does. GiB per GPU (the largest, rank 0): its peak plus the CUDA runtime (0.69 "
           "GiB); 'fits' is on 8 GPUs (1 for none). zero2 is fully_shard with "
           "reshard_after_forward=False, fsdp is FSDP2 per decoder layer (see the README, \"Past one GPU\"). "
           "Communication: bytes each GPU sends per step, at the link's per-direction datasheet rate "
           "(NVLink 3: 300 GB/s, NVLink 4: 450 GB/s).", ""]
    for label, *_ in CASES:
        out += [f"## {label}", "",
                "| GPU | strategy | GPUs needed | GiB per GPU there | on 8 GPUs: GiB per GPU | fits | gathered GiB | "
                "sent per step GB | comm ms | step ms overlapped / not |",
                "|---|---|---:|---:|---:|---|---:|---:|---:|---:|"]
        for r in rows:
            if r["case"] != label:
                continue
            on8 = "(1 GPU) " if r["sharding"] == "none" else ""
            timed = r["comm_ms"] is not None and r["sharding"] != "none"
            comm = f"{r['comm_ms']:,.0f}" if timed else ""
            step = f"{r['step_ms_overlap']:,.0f} / {r['step_ms_no_overlap']:,.0f}" if timed else ""
            out.append(f"| {r['gpu']} | {r['sharding']} | {_n(r['gpus_needed'])} | {_gib(r['device_bytes_at_needed'])} "
                       f"| {on8}{_gib(r['device_bytes'])} | {'yes' if r['fits'] else 'no'} | {_gib(r['gather_bytes'])} "
                       f"| {r['comm_bytes'] / 1e9:,.1f} | {comm} | {step} |")
        out.append("")
    out += ["## QLoRA of the 70B model on 2 RTX 4090s (fsdp)", "",
            "| CPU offload | loss | GiB per GPU at 1 x 2,048 | fits | in host memory per GPU | max batch at 2,048 | "
            "max seq at batch 1 | step ms overlapped / not |", "|---|---|---:|---|---:|---:|---:|---:|"]
    for r in small:
        out.append(f"| {'yes' if r['cpu_offload'] else 'no'} | {r['loss']} | {_gib(r['device_bytes'])} | "
                   f"{'yes' if r['fits'] else 'no'} | {_gib(r['cpu_offload_bytes'])} | {_n(r['max_batch_size'])} | "
                   f"{_n(r['max_seq_len'])} | {r['step_ms_overlap']:,.0f} / {r['step_ms_no_overlap']:,.0f} |")
    out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite reports/multi-gpu/README.md and results.json")
    args = parser.parse_args()
    rows, small = strategy_rows(), rtx4090_rows()
    text = markdown(rows, small)
    if not args.write:
        print(text)
        return
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "results.json"), "w") as f:
        json.dump({"command": "python benchmarks/multi_gpu_revisit.py --write", "strategies": rows,
                   "rtx4090": small}, f, indent=1)
        f.write("\n")
    with open(os.path.join(OUT, "README.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
