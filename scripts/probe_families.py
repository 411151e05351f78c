"""CUDA measurements of transformers + PEFT training steps for model families the estimator does not model
yet (issue 10): Qwen3, Gemma 2/3, Phi-3, OLMo 2, Mixtral and Qwen3-MoE shapes cut to a few layers.

Each row holds the config the model was built from, what PEFT made trainable, the attention transformers
chose, and what was measured (the same fields as `lorabench bench`: weights, adapter, gradients, optimizer
states, activations, the forward/backward/optimizer peaks of the second step after warm-up, step times),
so the estimator can be calibrated against them on any machine later. Rows are appended to a JSON-lines
file as each case finishes.

    python scripts/probe_families.py OUT.jsonl [--layers 2] [--seq-len 2048] [--steps 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import peft
import torch
import transformers

from lorabench.estimator.setup import PHASES
from lorabench.measure.bench import Built, _memory_step
from lorabench.measure.loops import PlainLoop
from lorabench.measure.probes import MemoryProbe, PhaseTimer, summarize, warm_cuda_libraries

# Published config.json values of each model (the fields that shape it), cut to --layers when built.
FAMILIES = {
    "Qwen3-8B": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=1000000.0),
    "Gemma-2-9B": dict(model_type="gemma2", hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=256000,
                       query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh",
                       tie_word_embeddings=True),
    "Mixtral-8x7B": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, num_local_experts=8,
                         num_experts_per_tok=2, tie_word_embeddings=False, rope_theta=1000000.0),
    "Phi-3-mini": dict(model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                       tie_word_embeddings=False),
    "OLMo-2-7B": dict(model_type="olmo2", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=100352,
                      tie_word_embeddings=False),
    "Qwen3-30B-A3B": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
                          moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, vocab_size=151936, num_experts=128,
                          num_experts_per_tok=8, norm_topk_prob=True, tie_word_embeddings=False),
    "Gemma-3-4B": dict(model_type="gemma3_text", hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=262208,
                       query_pre_attn_scalar=256, sliding_window=1024, tie_word_embeddings=True),
}
# q,v-style targets, written out: PEFT 0.21 has no default for olmo2, and for MoE families its default
# looks for expert parameters (target_parameters) and finds none.
QV_TARGETS = {"phi3": ["qkv_proj"]}  # fused q, k and v: PEFT's own default for phi3
# (method, rank, targets): q,v-style (None) and all-linear.
CASES = [("full", None, None), ("lora", 16, None), ("lora", 16, "all-linear"), ("lora-fa", 16, "all-linear"),
         ("dora", 16, None), ("dora", 16, "all-linear"), ("vera", 16, None)]


def build(cfg: dict, method: str, rank, targets, ckpt: bool, device: torch.device) -> Built:
    config = transformers.AutoConfig.for_model(**cfg)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base_ids = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    if method != "full":
        targets = targets or QV_TARGETS.get(cfg["model_type"], ["q_proj", "v_proj"])
        if method == "vera":
            pcfg = peft.VeraConfig(r=rank, target_modules=targets)
        else:
            pcfg = peft.LoraConfig(r=rank, lora_alpha=16, target_modules=targets, use_dora=method == "dora")
        model = peft.get_peft_model(model, pcfg)
        if method == "lora-fa":
            for name, p in model.named_parameters():
                if "lora_A" in name:
                    p.requires_grad_(False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    tensors = list(model.parameters()) + list(model.buffers())
    return Built(model, opt, [], lambda ids: model(input_ids=ids, labels=ids),
                 [t for t in tensors if id(t) in base_ids], [t for t in tensors if id(t) not in base_ids])


def counts(model) -> dict:
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
    else:
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    adapted = set()
    for name, _ in model.named_parameters():  # ...layers.0.self_attn.q_proj.lora_A.default.weight -> q_proj
        parts = name.split(".")
        marks = [i for i, part in enumerate(parts) if part.startswith(("lora_", "vera_"))]
        if marks and marks[0] > 0:
            adapted.add(parts[marks[0] - 1])
    return {"peft_trainable_params": trainable, "peft_all_params": total,
            "attn_implementation": getattr(inner.config, "_attn_implementation", None),
            "adapted_modules": sorted(adapted)}


def measure(name, cfg, method, rank, targets, ckpt, args, device) -> dict:
    row = {"model": name, "model_type": cfg["model_type"], "config": cfg, "method": method, "rank": rank,
           "targets": targets or ",".join(QV_TARGETS.get(cfg["model_type"], ["q_proj", "v_proj"])), "grad_checkpointing": ckpt, "seq_len": args.seq_len,
           "batch_size": 1, "dtype": "bf16", "adapter_dtype": "fp32", "optimizer": "adamw", "status": "ok"}
    built = None
    try:
        gc.collect()
        torch.cuda.empty_cache()
        probe = MemoryProbe(device)
        built = build(cfg, method, rank, targets, ckpt, device)
        row.update(counts(built.model))
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg["vocab_size"], (1, args.seq_len), generator=g).to(device)
        loop = PlainLoop(built, 1, device)
        for _ in range(2):  # the first step creates AdamW's states: measure the steady state after it
            loop.step(ids)
        row.update(_memory_step(built, lambda i, mark: loop.step(i, mark), ids, probe))
        timer = PhaseTimer(device)
        samples = []
        for _ in range(args.steps):
            loop.step(ids, lambda phase: timer.start() if phase == "start" else timer.mark(phase))
            samples.append(timer.finish())
        for phase in PHASES + ("step",):
            row[f"measured_{phase}_ms"] = summarize([s[phase] for s in samples])["median"]
    except torch.cuda.OutOfMemoryError as exc:
        row.update(status="oom", error=str(exc).splitlines()[0][:300])
    except Exception as exc:  # a combination PEFT refuses, say: recorded, the sweep goes on
        row.update(status="error", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
    finally:
        del built
        gc.collect()
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--models", default=",".join(FAMILIES))
    args = parser.parse_args()
    device = torch.device("cuda")
    warm_cuda_libraries(device)
    with open(args.out, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"header": True, "torch": torch.__version__, "cuda": torch.version.cuda,
                             "transformers": transformers.__version__, "peft": peft.__version__,
                             "device": torch.cuda.get_device_name(device), "layers": args.layers,
                             "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
        for name in args.models.split(","):
            cfg = dict(FAMILIES[name], num_hidden_layers=args.layers)
            for ckpt in (False, True):
                for method, rank, targets in CASES:
                    row = measure(name, cfg, method, rank, targets, ckpt, args, device)
                    fh.write(json.dumps(row) + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                    print(f"{name:14} {method:8} {str(targets or 'default'):10} ckpt={ckpt!s:5} {row['status']:5} "
                          f"peak={row.get('measured_peak_bytes', 0) / 2**30:7.3f} GiB "
                          f"step={row.get('measured_step_ms') or 0:7.1f} ms {row.get('error', '')[:80]}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
