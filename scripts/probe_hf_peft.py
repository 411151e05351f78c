"""Measure a Hugging Face transformers + PEFT training step against lorabench's memory estimate.

One-off calibration probe (the full harness is `lorabench bench`): for each method it builds a
Llama model from a preset cut to a few layers, wraps it with PEFT, runs AdamW steps and reads the
caching allocator's counters per phase (CUDA), the bytes autograd saves for backward (any device), and
the process's device memory from NVML (the runtime overhead the estimator reports apart).

Usage: python scripts/probe_hf_peft.py --out results.json [--device cuda] [--model llama-3-8b] ...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from lorabench.memory import TrainingSetup, estimate_memory  # noqa: E402
from lorabench.methods import METHODS  # noqa: E402
from lorabench.specs import from_name  # noqa: E402

PEFT_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
                "up": "up_proj", "down": "down_proj"}


def nvml_process_bytes():
    """Device memory NVML attributes to this process, or None without NVML."""
    try:
        import pynvml
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if p.pid == os.getpid():
                return int(p.usedGpuMemory or 0)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:  # noqa: BLE001 - NVML absent or not permitted: report nothing
        return None


def runtime_overhead(device):
    """NVML process memory after CUDA init, and after the first cuBLAS matmul, minus what torch reserved."""
    if device != "cuda":
        return {}
    torch.cuda.init()
    x = torch.ones(1, device="cuda")
    ctx = nvml_process_bytes()
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    (a @ a).sum().item()
    after = nvml_process_bytes()
    reserved = torch.cuda.memory_reserved()
    del a, x
    return {"nvml_after_init": ctx, "nvml_after_matmul": after, "torch_reserved": reserved,
            "overhead_bytes": None if after is None else after - reserved}


def build(spec, method, rank, targets, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                      num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                      num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                      vocab_size=spec.vocab_size, tie_word_embeddings=spec.tie_embeddings,
                      attention_dropout=0.0)
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    if method.name == "full":
        return model
    from peft import LoraConfig, VeraConfig, get_peft_model

    tm = [PEFT_TARGETS[t] for t in targets]
    if method.adapter == "vera":
        pcfg = VeraConfig(r=rank, target_modules=tm, vera_dropout=0.0)
    else:
        pcfg = LoraConfig(r=rank, lora_alpha=16, target_modules=tm, lora_dropout=0.0,
                          use_dora=method.adapter == "dora")
    model = get_peft_model(model, pcfg)
    if method.name == "lora-fa":
        for n, p in model.named_parameters():
            if "lora_A" in n:
                p.requires_grad_(False)
    return model


def saved_bytes(fn, model):
    """Run fn under saved_tensors_hooks; bytes of distinct storages autograd saved, parameters and
    buffers (and casts of them, which autograd keeps only as long as the weights) excluded."""
    seen = {}
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}

    def pack(t):
        try:
            st = t.untyped_storage()
            if st.data_ptr() not in own and t.dim() > 1 and t.shape[0] * 0 == 0:
                seen[st.data_ptr()] = st.nbytes()
        except Exception:  # noqa: BLE001 - e.g. meta or sparse tensors
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def measure(spec, method, rank, targets, setup, device, steps, impl="hf"):
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[setup.dtype]
    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base_alloc = torch.cuda.memory_allocated() if cuda else 0
    hooks = []
    if impl == "lorabench":
        from lorabench.nn.train import build_training

        trainer = build_training(spec, method, rank, 16.0, targets, dtype=dtype, device=device)
        model, opt, hooks = trainer.model, trainer.optimizer, trainer.hooks
        return _run_steps(model, opt, hooks, spec, setup, device, steps, base_alloc, lambda m: m(ids, labels=ids))
    model = build(spec, method, rank, targets, dtype, device)
    if setup.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if method.name != "full":
            model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    return _run_steps(model, opt, hooks, spec, setup, device, steps, base_alloc,
                      lambda m: m(input_ids=ids, labels=ids))


ids = None


def _run_steps(model, opt, hooks, spec, setup, device, steps, base_alloc, forward):
    global ids
    cuda = device == "cuda"
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (setup.batch_size, setup.seq_len), generator=g).to(device)
    rec, times = {}, []
    for step in range(steps):
        last = step == steps - 1
        if cuda:
            torch.cuda.synchronize()
            start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        if cuda:
            t0 = torch.cuda.Event(enable_timing=True)
            t0.record()
        out, saved = saved_bytes(lambda: forward(model), model)
        if cuda:
            fwd_peak, after_fwd = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        out.loss.backward()
        if cuda:
            bwd_peak, after_bwd = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        opt.step()
        for hook in hooks:
            hook.step()
        if cuda:
            opt_peak = torch.cuda.max_memory_allocated()
            t1 = torch.cuda.Event(enable_timing=True)
            t1.record()
            torch.cuda.synchronize()
            times.append(t0.elapsed_time(t1))
        opt.zero_grad(set_to_none=True)
        if last:
            rec = {"saved_bytes": saved, "loss": float(out.loss)}
            if cuda:
                rec.update({"persistent_bytes": start - base_alloc, "forward_peak_bytes": fwd_peak - base_alloc,
                            "after_forward_bytes": after_fwd - base_alloc,
                            "backward_peak_bytes": bwd_peak - base_alloc,
                            "after_backward_bytes": after_bwd - base_alloc,
                            "optimizer_peak_bytes": opt_peak - base_alloc,
                            "peak_bytes": max(fwd_peak, bwd_peak, opt_peak) - base_alloc,
                            "step_ms": sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else None})
        del out
    del model, opt
    return rec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--layers", type=int, nargs="+", default=[2])
    ap.add_argument("--methods", default="full,lora,lora-fa,vera,dora")
    ap.add_argument("--ranks", type=int, nargs="+", default=[8])
    ap.add_argument("--targets", default="q,v")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[2048])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--ckpt", type=int, nargs="+", default=[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default="probe.json")
    ap.add_argument("--impl", choices=("hf", "lorabench"), default="hf")
    a = ap.parse_args()
    import peft
    import transformers

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
           "peft": peft.__version__, "python": platform.python_version(),
           "gpu": torch.cuda.get_device_name() if a.device == "cuda" else None}
    overhead = runtime_overhead(a.device)
    results = []
    targets = tuple(a.targets.split(","))
    for layers in a.layers:
        spec = from_name(a.model).with_layers(layers)
        for seq in a.seq_lens:
            for ckpt in a.ckpt:
                for name in a.methods.split(","):
                    method = METHODS[name]
                    for rank in (a.ranks if method.uses_rank else [None]):
                        setup = TrainingSetup(batch_size=a.batch, seq_len=seq, dtype=a.dtype,
                                              grad_checkpointing=bool(ckpt), device=a.device)
                        t0 = time.perf_counter()
                        try:
                            rec = measure(spec, method, rank, targets, setup, a.device, a.steps, a.impl)
                        except torch.cuda.OutOfMemoryError:
                            rec = {"oom": True}
                        est = estimate_memory(spec, method, rank, targets, setup)
                        row = {"impl": a.impl, "layers": layers, "seq_len": seq, "ckpt": ckpt, "method": name, "rank": rank,
                               "measured": rec, "estimate": est.__dict__, "seconds": time.perf_counter() - t0}
                        results.append(row)
                        m = rec.get("peak_bytes")
                        at_rest = est.activations_bytes + (2 + 4) * spec.vocab_size * setup.tokens
                        print(f"L={layers} s={seq} ckpt={ckpt} {name:10s} r={rank}: saved {rec.get('saved_bytes', 0) / 2**20:9.1f} MiB "
                              f"(est {at_rest / 2**20:9.1f}) peak {0 if m is None else m / 2**20:9.1f} MiB "
                              f"(est {est.peak_bytes / 2**20:9.1f}, {est.peak_phase}) {rec.get('step_ms') or 0:.1f} ms", flush=True)
    with open(a.out, "w") as fh:
        json.dump({"env": env, "overhead": overhead, "results": results}, fh, indent=1, default=str)
    print(json.dumps(env), json.dumps(overhead))


if __name__ == "__main__":
    main()
