"""A quantized base (QLoRA's NF4, LLM.int8()) traced: bitsandbytes' real layers and storage, on fake tensors.

transformers quantizes while it loads a checkpoint; a model on the meta device has nothing to load. So the
tracing engine does what the loader does, in its own pieces: transformers' quantizer picks the modules to leave
alone (the head, and any the class keeps in fp32), `replace_with_bnb_linear` swaps every other nn.Linear for
bitsandbytes' Linear4bit or Linear8bitLt, and the model is flagged as transformers flags it (PEFT reads the flag to
wrap those layers with its bitsandbytes LoRA). Then each layer's weight is quantized by bitsandbytes' own
functions on a fake bf16 weight: the packed storage (NF4: two 4-bit values a byte; int8: one byte per value),
the per-block absmax and, under double quantization, its nested state, with their real shapes and no data. A
forward dequantizes through bitsandbytes' ops, whose fake kernels give the real temporaries.

A fake tensor cannot become a Params4bit (torch refuses a second Python subclass over it), so the weight is a fake
tensor under the same class name, carrying the attributes bitsandbytes and PEFT read (quant_state; CB and SCB):
their checks go by that name.
"""

from __future__ import annotations

from typing import List

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from lorabench.measure.qlora import bnb_config

# the class names bitsandbytes' and PEFT's checks read (peft.utils.integrations, PeftModel's counts)
_PARAMS4BIT = type("Params4bit", (FakeTensor,), {})
_INT8PARAMS = type("Int8Params", (FakeTensor,), {})


def quantize_layers(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """model's linear layers swapped for bitsandbytes' (on the meta device), as transformers' quantizer swaps them
    when it loads a checkpoint with BitsAndBytesConfig (measure.qlora.bnb_config)."""
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(bnb_config(dtype), pre_quantized=False)
    keep = quantizer.get_modules_to_not_convert(model, None, getattr(model, "_keep_in_fp32_modules", None))
    replace_with_bnb_linear(model, modules_to_not_convert=keep, quantization_config=quantizer.quantization_config)
    setattr(model, "is_loaded_in_4bit" if dtype == "nf4" else "is_loaded_in_8bit", True)
    return model


def fake_quantized(model: torch.nn.Module, mode: FakeTensorMode) -> List[torch.Tensor]:
    """Every bitsandbytes layer's weight quantized on a fake bf16 weight (module docstring), in place; the
    quantization constants that are not parameters (absmax, code, SCB), for the base's bytes."""
    import bitsandbytes as bnb

    # the blockwise code book is a constant bitsandbytes builds once from Python lists: built on real tensors
    bnb.functional.name2qmap.setdefault("dynamic", bnb.functional.create_dynamic_map())
    consts: List[torch.Tensor] = []
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = module.weight
            with mode:
                data, state = bnb.functional.quantize_4bit(
                    torch.zeros(w.shape, dtype=torch.bfloat16), blocksize=w.blocksize,
                    compress_statistics=w.compress_statistics, quant_type=w.quant_type, quant_storage=w.quant_storage)
            weight = _as(data, _PARAMS4BIT, quant_state=state, blocksize=w.blocksize, quant_type=w.quant_type,
                         quant_storage=w.quant_storage, compress_statistics=w.compress_statistics, bnb_quantized=True,
                         module=module)
            module.quant_state = state
            while state is not None:
                consts += [t for t in (state.absmax, state.code, state.offset) if isinstance(t, torch.Tensor)]
                state = state.state2
        elif isinstance(module, bnb.nn.Linear8bitLt):
            with mode:
                weight = torch.zeros(module.weight.shape, dtype=torch.bfloat16)
                cb, scb, _ = bnb.functional.int8_vectorwise_quant(weight)
            weight = _as(cb, _INT8PARAMS, CB=cb, SCB=scb, has_fp16_weights=False)
            consts.append(scb)
        else:
            continue
        module._parameters["weight"] = weight
    return consts


def _as(data: torch.Tensor, cls: type, **attributes) -> torch.Tensor:
    weight = torch.nn.Parameter(data, requires_grad=False)  # a fake tensor stays itself, flagged a parameter
    weight.__class__ = cls
    for name, value in attributes.items():
        setattr(weight, name, value)
    return weight


__all__ = ["quantize_layers", "fake_quantized"]
