"""What the CUDA caching allocator would reserve for LoRA and LoRA-FA steps of one fixed shape and of varying, bucketed
lengths, as PEFT's MetaMathQA benchmark runs them (its loop: out = model(**batch); out.loss.backward(); step;
empty_cache every 10 steps; memory_reserved() read after each step): the steps run on the CPU under the live-tensor
tracker with its event log on, replayed through lorabench.estimator.allocator's rules.

A Llama of d=1024 and 4 layers (MiB-sized tensors, so that the allocator's 2 and 20 MiB segments matter as they do
at full size), LoRA r=32 on q and v, bf16, batch 4, rows padded to the batch's longest (at most 512 tokens), lengths
drawn log-normal (median 200 tokens) and bucketed 4 at a time as PEFT's BucketIterator does.

    python scripts/allocator_study.py            # prints one line per (shape, method); about 6 minutes on 2 cores

Kernel workspaces that never surface as tensors are not in the event log, and the CPU's kernels return what CUDA's
return for these ops (the tracker's peaks match the estimate to 0.01%); the replay is the allocator's bookkeeping,
not a CUDA measurement.
"""

from __future__ import annotations

import random
import sys
import warnings


def main() -> int:
    import torch
    import transformers
    import peft
    from peft.optimizers import create_lorafa_optimizer

    from lorabench.estimator.allocator import CachingAllocator, replay
    from lorabench.measure.probes import LiveTensorTracker

    warnings.filterwarnings("ignore")
    cfg = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                                   num_attention_heads=16, num_key_value_heads=4, vocab_size=32000, pad_token_id=0)
    draw = random.Random(0)
    lengths = [min(512, max(32, int(draw.lognormvariate(5.3, 0.5)))) for _ in range(4000)]

    def batches(steps: int, fixed: bool):
        rnd = random.Random(1)
        for _ in range(steps):
            if fixed:
                yield [512] * 4
                continue
            pick = sorted(rnd.sample(lengths, 80))  # a bucket of 20 batches' examples, sorted by length
            i = rnd.randrange(20) * 4
            yield pick[i:i + 4]

    def run(lorafa: bool, fixed: bool, steps: int = 24):
        torch.manual_seed(0)
        tracker = LiveTensorTracker("cpu", record_events=True)
        with tracker:
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
            model = peft.get_peft_model(model, peft.LoraConfig(r=32, lora_alpha=64, target_modules=["q_proj", "v_proj"]))
            if lorafa:
                optimizer = create_lorafa_optimizer(model, r=32, lora_alpha=64, lr=1e-4)
            else:
                optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            model.train()
            peak = 0
            for step, rows in enumerate(batches(steps, fixed), 1):
                ids = torch.randint(1, cfg.vocab_size, (4, max(rows)))
                mask = torch.zeros_like(ids)
                for r, n in enumerate(rows):
                    mask[r, :n] = 1
                tracker.reset_peak()
                out = model(input_ids=ids, attention_mask=mask, labels=ids)
                out.loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                del out
                peak = max(peak, tracker.peak_bytes)
                if step % 10 == 0:
                    tracker.events.append(("e", None, 0))
                tracker.events.append(("m", step, 0))
        allocator, after_steps = CachingAllocator(), []
        for event in tracker.events:
            if event[0] == "m":
                after_steps.append(allocator.reserved_bytes)
            else:
                replay([event], allocator)
        return peak, max(after_steps), sum(after_steps) / len(after_steps)

    for fixed in (True, False):
        for lorafa in (False, True):
            peak, most, mean = (x / 2 ** 20 for x in run(lorafa, fixed))
            print(f"{'fixed 4 x 512' if fixed else 'varying, bucketed'}  {'lora-fa' if lorafa else 'lora   '}  "
                  f"allocated peak {peak:7.1f} MiB  reserved after a step: max {most:7.1f} MiB "
                  f"({most / peak:.2f} x peak), mean {mean:7.1f} MiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
