"""Bytes of a model's base weights, float or quantized (bitsandbytes' layouts). Pure Python: no torch import."""

from __future__ import annotations

import math

from lorabench.estimator.params import count_base_params
from lorabench.estimator.setup import FLOAT_BYTES
from lorabench.models.spec import ModelSpec


# bitsandbytes NF4 (Dettmers et al. 2023, QLoRA sec. 2): 4-bit codes, one absmax per 64-element block.
# With double quantization the absmax values are themselves 8-bit, one fp32 constant per 256 blocks,
# plus a 256-entry fp32 code book per tensor: 8/64 + 32/(64*256) bits of constants per parameter. Each
# tensor's QuantState also holds its own copy of the 16-value NF4 code (fp32) and the fp32 offset
# subtracted from the absmax before their quantization (bitsandbytes.functional.quantize_4bit).
NF4_BLOCK = 64
NF4_DQ_BLOCK = 256
NF4_CODE = 16
DQ_CODE = 256
# bitsandbytes LLM.int8() (Dettmers et al. 2022): int8 weights plus one fp32 scale per output row.


def quantized_linear_bytes(dtype: str, in_f: int, out_f: int) -> int:
    """Bytes of one quantized frozen weight with its quantization constants (bitsandbytes layout)."""
    numel = in_f * out_f
    if dtype == "int8":
        return numel + 4 * out_f  # int8 codes + fp32 row scales (SCB)
    blocks = math.ceil(numel / NF4_BLOCK)
    # packed 4-bit codes, uint8 absmax per block, fp32 absmax per 256 blocks, the fp32 code books of both
    # quantizations and the offset
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / NF4_DQ_BLOCK) + 4 * (DQ_CODE + NF4_CODE + 1)


def weights_bytes(spec: ModelSpec, dtype: str, kbit_prepare: bool = False) -> int:
    """Base weights. Quantized bases quantize the decoder's Linear weights only; embeddings, the
    output head, norms and biases stay in bf16 (transformers keeps the head out of bitsandbytes), or in fp32
    after peft.prepare_model_for_kbit_training (peft/utils/other.py casts every bf16/fp16 parameter that
    is not a Params4bit to fp32)."""
    total = count_base_params(spec)
    if dtype in FLOAT_BYTES:
        return total * FLOAT_BYTES[dtype]
    shapes = spec.linear_shapes().values()
    quant_numel = spec.num_layers * sum(i * o for i, o, _ in shapes)
    quant = spec.num_layers * sum(quantized_linear_bytes(dtype, i, o) for i, o, _ in shapes)
    return quant + (total - quant_numel) * (4 if kbit_prepare else 2)
