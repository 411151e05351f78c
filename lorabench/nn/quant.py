"""Frozen base projections on bitsandbytes' quantized layers: what `--dtype nf4|int8` means for lorabench.nn.

The settings are transformers' BitsAndBytesConfig as lorabench.measure.qlora loads a model for --impl peft, so both
implementations quantize the same way: NF4 with double quantization, blocks of 64 and a bf16 compute dtype
(Dettmers et al. 2023, QLoRA sec. 3; transformers/integrations/bitsandbytes.py builds `Linear4bit(in, out,
bias, compute_dtype, compress_statistics=use_double_quant, quant_type, quant_storage=uint8)`), or
LLM.int8() with frozen int8 weights and transformers' default outlier threshold 6.0 (Dettmers et al. 2022;
`Linear8bitLt(..., has_fp16_weights=False, threshold=6.0)`). As transformers does, each layer is made
empty (on "meta") and its weight set from the existing one, which bitsandbytes quantizes as the parameter
moves to its device; the output head, embeddings and norms stay as built.

bitsandbytes is imported only here, and only when a quantized base is asked for.
"""

from __future__ import annotations

import sys
from typing import Tuple

import torch
from torch import nn

from lorabench.errors import LorabenchError

QUANTIZED_BASES = ("nf4", "int8")
NF4_COMPUTE_DTYPE = torch.bfloat16
INT8_THRESHOLD = 6.0  # transformers' BitsAndBytesConfig.llm_int8_threshold default


def bnb():
    """The bitsandbytes module, or LorabenchError when it is not installed."""
    try:
        import bitsandbytes
    except ImportError:
        raise LorabenchError("a quantized base (nf4/int8) needs bitsandbytes: "
                             "pip install 'lorabench[qlora]'.") from None
    return bitsandbytes


def quantized_types() -> Tuple[type, ...]:
    """bitsandbytes' Linear4bit and Linear8bitLt; () while bitsandbytes is not imported (nothing can be one
    then), so asking never imports it."""
    lib = sys.modules.get("bitsandbytes")
    return () if lib is None else (lib.nn.Linear4bit, lib.nn.Linear8bitLt)


def is_quantized(module: nn.Module) -> bool:
    """Whether module is a bitsandbytes Linear4bit or Linear8bitLt (without importing bitsandbytes)."""
    return isinstance(module, quantized_types())


def quantize_linear(linear: nn.Linear, dtype: str) -> nn.Linear:
    """A bitsandbytes layer holding linear's weight quantized to dtype ("nf4" or "int8") and its bias as is.

    Raises:
        LorabenchError: an unknown dtype, bitsandbytes missing, or a weight on "meta" (nothing to quantize).
    """
    if dtype not in QUANTIZED_BASES:
        raise LorabenchError(f"unknown base quantization '{dtype}' (choose none, nf4 or int8).")
    weight = linear.weight
    if weight.is_meta:
        raise LorabenchError("a quantized base is quantized from real weights; build the model on a device, "
                             "not on 'meta'.")
    lib = bnb()
    device, has_bias = weight.device, linear.bias is not None
    if dtype == "nf4":
        layer = lib.nn.Linear4bit(linear.in_features, linear.out_features, has_bias, NF4_COMPUTE_DTYPE,
                                  compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8,
                                  device="meta")
        # moving a Params4bit that is not quantized yet to a device quantizes it there (quantize_4bit)
        layer.weight = lib.nn.Params4bit(weight.data, requires_grad=False, compress_statistics=True,
                                         quant_type="nf4", quant_storage=torch.uint8, module=layer).to(device)
    else:
        layer = lib.nn.Linear8bitLt(linear.in_features, linear.out_features, has_bias, has_fp16_weights=False,
                                    threshold=INT8_THRESHOLD, device="meta")
        # Int8Params quantizes (row-wise absmax, int8_vectorwise_quant) when it moves from the CPU to a device
        layer.weight = lib.nn.Int8Params(weight.data.cpu(), requires_grad=False,
                                         has_fp16_weights=False).to(device)
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return layer


def quantize_base(model: nn.Module, dtype: str) -> int:
    """Replace every decoder projection of model (spec.linear_shapes, the layers weights_bytes counts as
    quantized) that is still an nn.Linear by its bitsandbytes layer, in place. Returns how many were replaced.

    Raises:
        LorabenchError: see quantize_linear.
    """
    from lorabench.nn.model import iter_targets

    count = 0
    for parent, name, linear in iter_targets(model, tuple(model.spec.linear_shapes())):
        if type(linear) is nn.Linear:
            setattr(parent, name, quantize_linear(linear, dtype))
            count += 1
    return count


def dense_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """base's weight W [out, in] in dtype, dequantized from a bitsandbytes layer: a new tensor (callers may
    write it in place) except for an nn.Linear already in dtype.

    NF4: bitsandbytes.functional.dequantize_4bit with the weight's QuantState. int8: the codes times their row
    scale / 127, as int8_vectorwise_dequant computes it, but in dtype and in place as bitsandbytes'
    MatMul8bitFp dequantizes for its own product (one out x in temporary, not an fp32 one and its cast).
    Linear8bitLt moves the codes and scales from the weight to its MatmulLtState on its first forward, so
    they are read from wherever they are (PEFT's dequantize_bnb_weight reads the state too).
    """
    weight = base.weight
    if not is_quantized(base):
        return weight.to(dtype)
    lib = bnb()
    if isinstance(base, lib.nn.Linear4bit):
        return lib.functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
    codes = base.state.CB if base.state.CB is not None else weight.data
    scales = base.state.SCB if base.state.SCB is not None else weight.SCB
    return codes.to(dtype).mul_(scales.unsqueeze(1) / 127.0)


__all__ = ["QUANTIZED_BASES", "quantize_linear", "quantize_base", "dense_weight", "is_quantized",
           "quantized_types"]
