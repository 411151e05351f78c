"""Quantized bases for `lorabench bench --dtype nf4|int8`: the model as QLoRA users load it.

transformers quantizes while it loads a checkpoint (`from_pretrained(..., quantization_config=
BitsAndBytesConfig(...))`); a model made from a config cannot be quantized that way. So the randomly
initialised bf16 model is saved to a temporary directory and loaded back through bitsandbytes, as a user's
checkpoint would be: NF4 with double quantization and a bf16 compute dtype (Dettmers et al. 2023, QLoRA
sec. 3), or LLM.int8() with transformers' default outlier threshold (6.0; Dettmers et al. 2022).
"""

from __future__ import annotations

import tempfile
from typing import List

import torch

from lorabench.errors import LorabenchError

# The tensors of bitsandbytes' 4-bit QuantState (and of its nested double-quantization state), which are not
# parameters or buffers of the model.
_QUANT_STATE_TENSORS = ("absmax", "code", "offset")


def bnb_config(dtype: str):
    """transformers' BitsAndBytesConfig for a base stored as dtype ("nf4" or "int8")."""
    import transformers

    if dtype == "nf4":
        return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.bfloat16,
                                               bnb_4bit_use_double_quant=True)
    return transformers.BitsAndBytesConfig(load_in_8bit=True)


def load_quantized(model: torch.nn.Module, dtype: str, device: torch.device, attention: str) -> torch.nn.Module:
    """model (a transformers PreTrainedModel in bf16) saved and loaded back with its linear layers quantized.

    Raises:
        LorabenchError: bitsandbytes missing.
    """
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise LorabenchError(f"--dtype {dtype} needs bitsandbytes: pip install 'lorabench[qlora]'.") from None
    from transformers.utils import logging as hf_logging

    cls = type(model)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # saving and loading are setup, not the benchmark's progress
    try:
        with tempfile.TemporaryDirectory(prefix="lorabench-qlora-") as tmp:
            model.save_pretrained(tmp)
            del model
            return cls.from_pretrained(tmp, quantization_config=bnb_config(dtype), device_map={"": device},
                                       dtype=torch.bfloat16, attn_implementation=attention)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def quant_state_tensors(model: torch.nn.Module) -> List[torch.Tensor]:
    """The quantization constants bitsandbytes keeps beside the 4-bit weights (absmax per block, and under
    double quantization the fp32 absmax of those, the code book and the offset): not parameters, so
    model.parameters() misses them. (int8's row scales, SCB, sit on the Int8Params and on the layer's
    state; they are collected here too.)"""
    out = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        while state is not None:
            out += [t for t in (getattr(state, n, None) for n in _QUANT_STATE_TENSORS) if isinstance(t, torch.Tensor)]
            state = getattr(state, "state2", None)
        scb = getattr(weight, "SCB", None)
        if isinstance(scb, torch.Tensor):
            out.append(scb)
    return out


__all__ = ["bnb_config", "load_quantized", "quant_state_tensors"]
