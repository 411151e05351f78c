"""Probe for issue 23's "any PEFT tuner": each tuner's training step (tiny Llama, batch 2 x 64, bf16, AdamW),
its per-phase peaks measured by the live-tensor tracker on real CPU tensors and traced on fake ones (built on
meta, then lorabench.measure.trace.fake_tensors), side by side. Prints EXACT, the differences in bytes, or why a
tuner cannot be traced yet.

    python scripts/trace_tuners_probe.py

Session 10 found (PEFT 0.21.2, torch 2.13 CPU): IA3, OFT, rsLoRA, HRA and LN tuning exact; FourierFT, prompt and prefix
tuning within 64 bytes in forward/backward (6,400 bytes in FourierFT's optimizer phase); AdaLoRA 393,264 bytes under
in forward/backward; LoHa, LoKr and VB-LoRA read a data-dependent scalar (aten._local_scalar_dense: LoHa and LoKr
are traced since with module dropout kept, measure.trace._modules_kept), BOFT calls
.item() on a meta tensor while it initialises.
"""

import contextlib
import warnings

import peft
import torch
import transformers
from torch._subclasses.fake_tensor import FakeTensorMode

from lorabench.measure.probes import LiveTensorTracker
from lorabench.measure.trace import fake_tensors

cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8,
                               num_key_value_heads=4, vocab_size=4096)
TUNERS = {
 "ia3": lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
 "loha": lambda: peft.LoHaConfig(r=8, target_modules=["q_proj", "v_proj"]),
 "lokr": lambda: peft.LoKrConfig(r=8, target_modules=["q_proj", "v_proj"]),
 "adalora": lambda: peft.AdaLoraConfig(r=8, target_modules=["q_proj", "v_proj"], total_step=10),
 "oft": lambda: peft.OFTConfig(oft_block_size=32, r=0, target_modules=["q_proj", "v_proj"]),
 "boft": lambda: peft.BOFTConfig(boft_block_size=4, target_modules=["q_proj", "v_proj"]),
 "fourierft": lambda: peft.FourierFTConfig(n_frequency=100, target_modules=["q_proj", "v_proj"]),
 "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
 "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
 "rslora": lambda: peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], use_rslora=True),
 "vblora": lambda: peft.VBLoRAConfig(r=4, target_modules=["q_proj", "v_proj"], num_vectors=64, vector_length=64),
 "hra": lambda: peft.HRAConfig(r=8, target_modules=["q_proj", "v_proj"]),

 "ln_tuning": lambda: peft.LNTuningConfig(target_modules=["input_layernorm"]),
}


def run(name, fake):
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    dev = "meta" if fake else "cpu"
    torch.manual_seed(0)
    with torch.device(dev):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
        model = peft.get_peft_model(model, TUNERS[name]())
    if fake:
        fake_tensors(mode)(model)
    params = [p for p in model.parameters() if p.requires_grad]
    with (mode if fake else contextlib.nullcontext()):
        opt = torch.optim.AdamW(params, lr=1e-4, foreach=False)
        ids = torch.zeros((2, 64), dtype=torch.long)
    tr = LiveTensorTracker("cpu"); peaks = {}
    with (mode if fake else contextlib.nullcontext()), tr:
        tr.track(list(model.parameters()) + list(model.buffers()))
        for _ in range(2):
            tr.peak_bytes = tr.current_bytes
            out = model(input_ids=ids, labels=ids); peaks["f"] = tr.peak_bytes; tr.peak_bytes = tr.current_bytes
            out.loss.backward(); del out; peaks["b"] = tr.peak_bytes; tr.peak_bytes = tr.current_bytes
            opt.step(); opt.zero_grad(set_to_none=True); peaks["o"] = tr.peak_bytes
    return peaks


def main():
    warnings.filterwarnings("ignore")
    for name in TUNERS:
        try:
            r, f = run(name, False), run(name, True)
            print(name, "EXACT" if r == f else {k: f[k] - r[k] for k in r}, r, flush=True)
        except Exception as e:  # noqa: BLE001 (a probe: every tuner's outcome is printed)
            print(name, "ERR", type(e).__name__, str(e).splitlines()[0][:160] if str(e) else "", flush=True)


if __name__ == "__main__":
    main()
