"""Named presets: published models as ModelSpecs, and from_name.

Pure Python: no torch import. Every preset's parameter total equals the real model's (checked in tests against
published totals and transformers models built on the meta device).
"""

from __future__ import annotations

import difflib
from typing import Dict

from lorabench.errors import LorabenchError
from lorabench.spelling import option
from lorabench.models.families import FAMILIES
from lorabench.models.spec import ModelSpec


def _llama(name, d, inter, layers, heads, kv, vocab, head_dim=None, tied=False, qkv_bias=False,
           family="llama", **extra):
    return ModelSpec(name=name, hidden_size=d, intermediate_size=inter, num_layers=layers,
                     num_heads=heads, num_kv_heads=kv, head_dim=head_dim or d // heads,
                     vocab_size=vocab, tie_embeddings=tied, qkv_bias=qkv_bias, family=family, **extra)


VISION_NOTE = ("the language model of a vision-language checkpoint: the vision tower and its projector "
               "({:,} parameters more) are not counted.")


def _gemma(name, d, inter, layers, heads, kv, head_dim, vocab, family, window, query_pre_attn_scalar=256,
           vision=0):
    """Gemma 2 (soft-capped attention and logits, every other layer sliding) or Gemma 3 (five sliding layers
    to one global, no soft-capping); embeddings tied."""
    row = FAMILIES[family]  # the soft-caps and the sliding layout are the family's defaults
    return ModelSpec(name=name, hidden_size=d, intermediate_size=inter, num_layers=layers, num_heads=heads,
                     num_kv_heads=kv, head_dim=head_dim, vocab_size=vocab, tie_embeddings=True, family=family,
                     attn_softcap=row.default("attn_logit_softcapping") or 0.0,
                     final_softcap=row.default("final_logit_softcapping") or 0.0,
                     sliding_window=window, sliding_pattern=row.global_every,
                     query_pre_attn_scalar=query_pre_attn_scalar,
                     notes=(VISION_NOTE.format(vision),) if vision else ())


# Values from each model's published config.json; totals are asserted in tests/test_specs.py.
PRESETS: Dict[str, ModelSpec] = {
    "llama-2-7b": _llama("llama-2-7b", 4096, 11008, 32, 32, 32, 32000),
    "llama-2-13b": _llama("llama-2-13b", 5120, 13824, 40, 40, 40, 32000),
    "llama-2-70b": _llama("llama-2-70b", 8192, 28672, 80, 64, 8, 32000),
    "llama-3-8b": _llama("llama-3-8b", 4096, 14336, 32, 32, 8, 128256),
    "llama-3-70b": _llama("llama-3-70b", 8192, 28672, 80, 64, 8, 128256),
    "llama-3.1-8b": _llama("llama-3.1-8b", 4096, 14336, 32, 32, 8, 128256),
    "llama-3.1-70b": _llama("llama-3.1-70b", 8192, 28672, 80, 64, 8, 128256),
    "llama-3.1-405b": _llama("llama-3.1-405b", 16384, 53248, 126, 128, 8, 128256),
    "llama-3.2-1b": _llama("llama-3.2-1b", 2048, 8192, 16, 32, 8, 128256, head_dim=64, tied=True),
    "llama-3.2-3b": _llama("llama-3.2-3b", 3072, 8192, 28, 24, 8, 128256, head_dim=128, tied=True),
    "mistral-7b": _llama("mistral-7b", 4096, 14336, 32, 32, 8, 32000, family="mistral"),
    "qwen2.5-0.5b": _llama("qwen2.5-0.5b", 896, 4864, 24, 14, 2, 151936, tied=True, qkv_bias=True, family="qwen2"),
    "qwen2.5-7b": _llama("qwen2.5-7b", 3584, 18944, 28, 28, 4, 152064, qkv_bias=True, family="qwen2"),
    "qwen2.5-72b": _llama("qwen2.5-72b", 8192, 29568, 80, 64, 8, 152064, qkv_bias=True, family="qwen2"),
    "gpt2": ModelSpec(name="gpt2", hidden_size=768, intermediate_size=3072, num_layers=12,
                      num_heads=12, num_kv_heads=12, head_dim=64, vocab_size=50257,
                      tie_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True, max_positions=1024,
                      family="gpt2"),
    "mistral-nemo-12b": _llama("mistral-nemo-12b", 5120, 14336, 40, 32, 8, 131072, head_dim=128, family="mistral"),
    "qwen3-8b": _llama("qwen3-8b", 4096, 12288, 36, 32, 8, 151936, head_dim=128, family="qwen3"),
    "gemma-2-2b": _gemma("gemma-2-2b", 2304, 9216, 26, 8, 4, 256, 256000, "gemma2", 4096),
    "gemma-2-9b": _gemma("gemma-2-9b", 3584, 14336, 42, 16, 8, 256, 256000, "gemma2", 4096),
    "gemma-3-1b": _gemma("gemma-3-1b", 1152, 6912, 26, 4, 1, 256, 262144, "gemma3_text", 512),
    # Gemma 3 4B and 27B: published totals 4,300,079,472 and 27,432,406,640 with the vision tower.
    "gemma-3-4b": _gemma("gemma-3-4b", 2560, 10240, 34, 8, 4, 256, 262208, "gemma3_text", 1024,
                         vision=419_816_304),
    "gemma-3-27b": _gemma("gemma-3-27b", 5376, 21504, 62, 32, 16, 128, 262208, "gemma3_text", 1024,
                          query_pre_attn_scalar=168, vision=423_060_336),
    "phi-3-mini": _llama("phi-3-mini", 3072, 8192, 32, 32, 32, 32064, family="phi3"),
    "phi-4": _llama("phi-4", 5120, 17920, 40, 40, 10, 100352, family="phi3"),
    "olmo-2-7b": _llama("olmo-2-7b", 4096, 11008, 32, 32, 32, 100352, family="olmo2"),
    "mixtral-8x7b": _llama("mixtral-8x7b", 4096, 0, 32, 32, 8, 32000, family="mixtral", num_experts=8,
                           experts_per_token=2, expert_intermediate_size=14336),
    "qwen1.5-moe-a2.7b": _llama("qwen1.5-moe-a2.7b", 2048, 5632, 24, 16, 16, 151936, qkv_bias=True,
                                family="qwen2_moe", num_experts=60, experts_per_token=4,
                                expert_intermediate_size=1408, shared_expert_gate=True),
    "qwen3-30b-a3b": _llama("qwen3-30b-a3b", 2048, 0, 48, 32, 4, 151936, head_dim=128, family="qwen3_moe",
                            num_experts=128, experts_per_token=8, expert_intermediate_size=768),
    # A small Llama-shaped model for CPU verification runs (not a published model).
    "tiny-llama": _llama("tiny-llama", 256, 688, 4, 8, 4, 4096),
}


def from_name(name: str) -> ModelSpec:
    """The preset called name (case-insensitive).

    Raises:
        LorabenchError: no such preset; the message suggests near names.
    """
    key = name.strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    near = difflib.get_close_matches(key, PRESETS, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(near)}?" if near else ""
    raise LorabenchError(f"unknown model '{name}'.{hint} Run 'lorabench models' for the presets, or give a "
                         f"Hugging Face Hub id (ORG/NAME) or {option('config')}.")
