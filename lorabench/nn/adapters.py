"""Apply a registered method (lorabench.methods.METHODS) to a Transformer's target projections.

Three independent axes, as in PEFT's tuners: the adapter's structure (LoRALinear, DoRALinear, VeRALinear),
what is trainable (LoRA-FA freezes A; full trains everything), and the optimizer/step (LoRA+ param
groups, Delta-LoRA's W update after the step). Counts read off the resulting modules equal
lorabench.estimator.params.count_params (tested for every preset and method).
"""

from __future__ import annotations

from typing import List, Optional, Union

import torch
from torch import nn

from lorabench.errors import LorabenchError
from lorabench.methods import Method, get_method
from lorabench.nn.delta import DeltaLoRAUpdate
from lorabench.nn.lora import DoRALinear, LoRALinear
from lorabench.nn.model import Transformer, iter_targets
from lorabench.nn.quant import QUANTIZED_BASES, is_quantized, quantize_base
from lorabench.nn.vera import VeRALinear, VeRAProjections
from lorabench.estimator.params import check_targets, parse_targets
from lorabench.models.families import MOE_TARGETS

ADAPTER_TYPES = (LoRALinear, DoRALinear, VeRALinear)


def _lora(linear, method, rank, alpha, dropout, dtype, generator, shared, vera_d_initial):
    return LoRALinear(linear, rank, alpha, dropout, method.trains_a, dtype, generator)


def _dora(linear, method, rank, alpha, dropout, dtype, generator, shared, vera_d_initial):
    return DoRALinear(linear, rank, alpha, dropout, dtype, generator, train_a=method.trains_a)


def _vera(linear, method, rank, alpha, dropout, dtype, generator, shared, vera_d_initial):
    return VeRALinear(linear, shared, dropout, vera_d_initial, dtype)


# The module each adapter structure (lorabench.methods.ADAPTERS) wraps a target Linear in; the method's axes
# (what trains) are its arguments.
MODULES = {"lora": _lora, "dora": _dora, "vera": _vera}


def _resolve(method: Union[str, Method]) -> Method:
    return method if isinstance(method, Method) else get_method(method)


def _check_quantization(method: Method, quantization: Optional[str]) -> Optional[str]:
    """quantization as a QUANTIZED_BASES name, or None for a float base."""
    if quantization in (None, "none"):
        return None
    if quantization not in QUANTIZED_BASES:
        raise LorabenchError(f"unknown base quantization '{quantization}' (choose none, nf4 or int8).")
    if not method.allows_quantized_base:
        raise LorabenchError(f"{method.name} writes the base weights, which a {quantization} base cannot hold.")
    return quantization


def apply_method(model: Transformer, method: Union[str, Method], rank: Optional[int] = 8,
                 alpha: Optional[float] = None, targets=None, dropout: float = 0.0, seed: int = 0,
                 adapter_dtype: torch.dtype = torch.float32, quantization: Optional[str] = None,
                 vera_d_initial: float = 0.1) -> List[nn.Module]:
    """Freeze the model and wrap its target Linears for method, in place.

    Args:
        model: a Transformer (any device, "meta" included).
        method: a METHODS name or Method.
        rank: r (ignored by full fine-tuning).
        alpha: LoRA/DoRA scale numerator, update scaled by alpha / r (None: alpha = r, scale 1).
        targets: target names, "all-linear", or None for PEFT's default of the family.
        dropout: adapter-input dropout. Delta-LoRA ignores it (Method.applies_dropout): the paper removes
            dropout from the low-rank path so that W moves by the change of B A alone.
        seed: draws LoRA's A (one CPU generator for all layers) and is VeRA's projection_prng_key.
        adapter_dtype: dtype of adapter parameters (float32, as PEFT keeps them).
        quantization: None, or "nf4"/"int8": every decoder projection still an nn.Linear is first put on
            bitsandbytes' Linear4bit / Linear8bitLt (lorabench.nn.quant.quantize_base), which the adapters
            wrap (needs bitsandbytes and real weights, not "meta").
        vera_d_initial: starting value of VeRA's lambda_d.

    Returns:
        The adapter modules in layer order (empty for full fine-tuning).

    Raises:
        LorabenchError: unknown method or targets, a bad rank, a quantized base under a method that writes
            W (full, delta-lora) or on "meta", bitsandbytes missing, a mixture of experts'
            router or experts as targets (nn.Linear wrappers only: PEFT's ParamWrapper adapts those), or a
            model that already has adapters.
    """
    method = _resolve(method)
    quantization = _check_quantization(method, quantization)
    spec = model.spec
    if quantization is not None:
        quantize_base(model, quantization)
    if not method.uses_rank:
        model.requires_grad_(method.base_trainable)
        return []
    # VeRA's all-linear is the nn.Linear modules only, as in PEFT and count_params.
    names = parse_targets(spec, targets, modules_only=method.adapter.linear_modules_only)
    if rank is None:
        raise LorabenchError(f"{method.name} needs a rank.")
    check_targets(spec, method, rank, names)
    if set(names) & set(MOE_TARGETS):
        raise LorabenchError("lorabench's layers do not adapt a mixture of experts' router or experts; "
                             "use --impl peft")
    found = list(iter_targets(model, names))
    if not all(type(linear) is nn.Linear or is_quantized(linear) for _, _, linear in found):
        raise LorabenchError("the model already has adapters; build a fresh one per method.")
    alpha = float(rank if alpha is None else alpha)
    dropout = dropout if method.applies_dropout else 0.0
    model.requires_grad_(False)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    shared = None
    if method.adapter.shared_pair:
        shapes = [spec.linear_shapes()[t] for t in names]
        shared = VeRAProjections(rank, max(s[0] for s in shapes), max(s[1] for s in shapes), seed=seed,
                                 device=model.embed.weight.device, dtype=adapter_dtype)
    wrapped: List[nn.Module] = []
    for parent, name, linear in found:
        module = MODULES[method.adapter.name](linear, method, rank, alpha, dropout, adapter_dtype, generator, shared,
                                              vera_d_initial)
        setattr(parent, name, module)
        wrapped.append(module)
    return wrapped


def adapter_layers(model: nn.Module) -> List[nn.Module]:
    """The LoRA, DoRA and VeRA wrappers in model, in module order."""
    return [m for m in model.modules() if isinstance(m, ADAPTER_TYPES)]


def param_groups(model: nn.Module, method: Union[str, Method], lr: float) -> List[dict]:
    """Optimizer param groups of the trainable parameters.

    LoRA+ (Hayou et al. 2024, arXiv:2402.12354) puts every B in a group at lr x method.b_lr_ratio and the
    rest at lr; other methods get one group.
    """
    method = _resolve(method)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if method.b_lr_ratio == 1.0:
        return [{"params": trainable, "lr": lr, "name": "trainable"}]
    b_ids = {id(m.lora_b) for m in adapter_layers(model) if hasattr(m, "lora_b")}
    return [{"params": [p for p in trainable if id(p) not in b_ids], "lr": lr, "name": "lora_a"},
            {"params": [p for p in trainable if id(p) in b_ids], "lr": lr * method.b_lr_ratio,
             "name": "lora_b"}]


def step_hooks(model: nn.Module, method: Union[str, Method], delta_lambda: float = 0.5,
               delta_start_step: int = 0) -> list:
    """Objects whose .step() runs after each optimizer step: Delta-LoRA's W update, else none."""
    method = _resolve(method)
    if method.delta_update:
        return [DeltaLoRAUpdate(adapter_layers(model), delta_lambda, delta_start_step)]
    return []


__all__ = ["apply_method", "adapter_layers", "param_groups", "step_hooks", "ADAPTER_TYPES",
           "LoRALinear", "DoRALinear", "VeRALinear", "VeRAProjections", "DeltaLoRAUpdate"]
