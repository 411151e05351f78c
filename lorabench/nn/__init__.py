"""PyTorch implementations of the model and every method (imports torch; the estimation core never does).

The tensors each piece keeps for backward are documented on its class, for the memory estimator.
"""

from lorabench.nn.adapters import adapter_layers, apply_method, param_groups, step_hooks
from lorabench.nn.delta import DeltaLoRAUpdate
from lorabench.nn.lora import DoRALinear, LoRALinear
from lorabench.nn.model import (CausalLMOutput, RMSNorm, Transformer, build_model, causal_lm_loss,
                                count_module_params)
from lorabench.nn.optim import make_optimizer
from lorabench.nn.quant import quantize_base
from lorabench.nn.vera import VeRALinear, VeRAProjections

__all__ = ["Transformer", "CausalLMOutput", "RMSNorm", "build_model", "causal_lm_loss", "count_module_params",
           "LoRALinear", "DoRALinear", "VeRALinear", "VeRAProjections", "DeltaLoRAUpdate", "apply_method",
           "adapter_layers", "param_groups", "step_hooks", "make_optimizer", "quantize_base"]
