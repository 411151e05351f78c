"""Building the model bench measures: lorabench's own layers or transformers + PEFT, with the method applied,
its optimizer and after-step hooks, and the tensors the measurement tells apart (base, adapter). A data-parallel
strategy (lorabench.measure.distributed) can be applied to the built model before its optimizer is made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from lorabench.errors import LorabenchError
from lorabench.estimator.case import Case
from lorabench.models.hfwrite import hf_config_dict
from lorabench.estimator.setup import QUANTIZED
from lorabench.estimator.params import parse_targets
from lorabench.measure.hfbuild import (TORCH_DTYPES, causal_lm, checkpointing, expected_library_warnings, hf_config,
                                      optimizer, with_peft)
from lorabench.measure.qlora import quant_state_tensors
from lorabench.models.families import MOE_TARGETS

LR = 1e-4


@dataclass
class Built:
    """A model ready to train and what the measurement needs to tell its tensors apart."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    hooks: list
    forward: Callable[[torch.Tensor], object]  # ids -> output with .loss
    base_tensors: List[torch.Tensor]
    adapter_tensors: List[torch.Tensor]
    # the model's further inputs each micro-batch passes beside input_ids and labels (a vision-language model's
    # pixel values...), set when the step's inputs are made
    inputs: Dict[str, torch.Tensor] = field(default_factory=dict)

    def step_state(self) -> List[torch.Tensor]:
        """Tensors a method keeps between steps besides the optimizer (Delta-LoRA's copy of A and B)."""
        return [t for h in self.hooks for t in getattr(h, "state_tensors", lambda: [])()]


def _split_tensors(model: torch.nn.Module, base_ids: set) -> tuple:
    tensors = list(model.parameters()) + list(model.buffers())
    return ([t for t in tensors if id(t) in base_ids], [t for t in tensors if id(t) not in base_ids])


Wrap = Callable[[torch.nn.Module], torch.nn.Module]


def _wrapped(model: torch.nn.Module, base_ids: set, wrap: Optional[Wrap]) -> tuple:
    """(what to call for forward, base tensors, adapter tensors) after wrap (lorabench.measure.distributed's
    strategies). fully_shard replaces each parameter with a DTensor of the same name, so the base tensors are
    found again by name; the optimizer is made after this, on the parameters the model then holds."""
    base, adapter = _split_tensors(model, base_ids)
    if wrap is None:
        return model, base, adapter
    ids = {id(t) for t in base}
    names = {n for n, t in _named_tensors(model) if id(t) in ids}
    runner = wrap(model)
    tensors = _named_tensors(model)
    return runner, [t for n, t in tensors if n in names], [t for n, t in tensors if n not in names]


def _named_tensors(model: torch.nn.Module) -> list:
    return list(model.named_parameters()) + list(model.named_buffers())


def build_lorabench(case: Case, device: torch.device, seed: int = 0, wrap: Optional[Wrap] = None, lr: float = LR,
                    delta_lambda: float = 0.5, delta_start_step: int = 0) -> Built:
    """lorabench.nn's model with method applied, its optimizer (setup.optimizer at lr, in the method's param
    groups) and after-step hooks (Delta-LoRA's update with delta_lambda from delta_start_step). A quantized base
    (setup.dtype nf4 or int8) is built in bf16, its decoder projections put on bitsandbytes' layers
    (lorabench.nn.quant), and the adapters wrap those. wrap (a data-parallel strategy) is applied before the
    optimizer is made.

    Raises:
        LorabenchError: --kbit-prepare (PEFT's function, for --impl peft), or what apply_method raises.
    """
    spec, method, rank, targets, setup = case.spec, case.method, case.rank, case.targets, case.setup
    from lorabench.nn.adapters import apply_method, param_groups, step_hooks
    from lorabench.nn.model import build_model
    from lorabench.nn.quant import quantize_base
    from lorabench.nn.optim import make_optimizer

    quantized = setup.dtype in QUANTIZED
    if setup.kbit_prepare:
        raise LorabenchError(KBIT_LORABENCH)
    model = build_model(spec, device=device, dtype=TORCH_DTYPES.get(setup.dtype, torch.bfloat16), seed=seed)
    model.grad_checkpointing = setup.grad_checkpointing
    if quantized:
        quantize_base(model, setup.dtype)
    quant_consts = quant_state_tensors(model) if quantized else []
    base_ids = {id(t) for t in list(model.parameters()) + list(model.buffers()) + quant_consts}
    apply_method(model, method, rank, setup.alpha, targets, dropout=setup.dropout, seed=seed,
                 adapter_dtype=TORCH_DTYPES[setup.adapter_dtype], quantization=setup.dtype if quantized else None)
    model.train()
    runner, base, adapter = _wrapped(model, base_ids, wrap)
    opt = make_optimizer(setup.optimizer, param_groups(model, method, lr), lr, device=device)
    hooks = step_hooks(model, method, delta_lambda, delta_start_step)
    return Built(runner, opt, hooks, lambda ids: runner(input_ids=ids, labels=ids), base + quant_consts, adapter)


def build_peft(case: Case, device: torch.device, seed: int = 0, wrap: Optional[Wrap] = None) -> Built:
    """transformers' model for spec's family (AutoModelForCausalLM from the spec's config; dropout off; the
    attention setup.attention names) wrapped by PEFT as users train it; then by wrap (a data-parallel
    strategy), before the optimizer is made.

    LoRA-FA is PEFT LoRA with lora_A frozen; LoRA+ is PEFT LoRA with peft.optimizers'
    create_loraplus_optimizer. Delta-LoRA has no PEFT implementation.

    Raises:
        LorabenchError: transformers/peft missing, a spec transformers cannot express, delta-lora, or an
            attention transformers refuses for the family.
    """
    spec, method, rank, targets, setup = case.spec, case.method, case.rank, case.targets, case.setup
    try:
        import peft  # it imports transformers
    except ImportError:
        raise LorabenchError("--impl peft needs transformers and peft: pip install transformers peft.") from None
    if method.delta_update:
        raise LorabenchError(f"{method.name} has no PEFT implementation; measure it with --impl lorabench.")
    if setup.dtype == "int8" and method.adapter.magnitude and device.type == "cpu":
        raise LorabenchError("PEFT's DoRA on a bitsandbytes int8 base fails on the CPU from its second step "
                             "(bitsandbytes 0.50, PEFT 0.21: the layer's row scales are lost); measure it on CUDA.")
    if spec.family_row.peft_refusal:
        raise LorabenchError(f"--impl peft does not build {spec.family} ({spec.family_row.peft_refusal}); use "
                             "--impl lorabench.")
    cfg = dict(hf_config_dict(spec))
    try:
        hf = hf_config(cfg, spec.name)
    except LorabenchError as exc:  # a value transformers' class refuses
        raise LorabenchError(f"transformers cannot build {spec.name} with {setup.attention} attention: "
                             f"{str(exc).split(': ', 2)[-1]}") from None
    torch.manual_seed(seed)
    model = checkpointing(causal_lm(hf, setup, device, setup.attention, spec.name), setup)
    quant_consts = quant_state_tensors(model)
    base_ids = {id(t) for t in list(model.parameters()) + list(model.buffers()) + quant_consts}
    if method.uses_rank:
        modules = [spec.peft_name(t) for t in targets]
        if set(targets) == set(parse_targets(spec, "all-linear", modules_only=method.adapter.linear_modules_only)):
            modules = "all-linear"  # PEFT's own resolution: its conversion for fused experts included
        elif set(targets) & set(MOE_TARGETS):
            raise LorabenchError("--impl peft adapts a mixture of experts' router and experts through all-linear "
                                 "only (PEFT's conversion for transformers 5); use -t all-linear.")
        if method.adapter.shared_pair:
            pcfg = peft.VeraConfig(r=rank, target_modules=modules, vera_dropout=setup.dropout)
        else:
            pcfg = peft.LoraConfig(r=rank, lora_alpha=setup.alpha, target_modules=modules,
                                   lora_dropout=setup.dropout, use_dora=method.adapter.magnitude)
        model = with_peft(model, pcfg, freeze_a=not method.trains_a, adapter_dtype=setup.adapter_dtype)
    model.train()
    runner, base, adapter = _wrapped(model, base_ids, wrap)
    opt = optimizer(model, setup.optimizer, LR, method.b_lr_ratio, device)
    inputs: Dict[str, torch.Tensor] = {}  # a batch's attention_mask or position_ids, made with its token ids
    return Built(runner, opt, [], lambda ids: runner(input_ids=ids, labels=ids, **inputs), base + quant_consts, adapter,
                 inputs)


BUILDERS = {"lorabench": build_lorabench, "peft": build_peft}
KBIT_LORABENCH = ("--kbit-prepare runs PEFT's prepare_model_for_kbit_training on transformers' model; measure it "
                  "with --impl peft.")


__all__ = ["TORCH_DTYPES", "expected_library_warnings", "Built", "Wrap", "build_lorabench", "build_peft", "BUILDERS",
           "KBIT_LORABENCH"]
