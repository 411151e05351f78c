"""Building the model bench measures: lorabench's own layers or transformers + PEFT, with the method applied,
its optimizer and after-step hooks, and the tensors the measurement tells apart (base, adapter). A data-parallel
strategy (lorabench.measure.distributed) can be applied to the built model before its optimizer is made.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from lorabench.errors import LorabenchError
from lorabench.estimator.case import Case
from lorabench.models.hfwrite import hf_config_dict
from lorabench.estimator.setup import QUANTIZED
from lorabench.estimator.params import parse_targets
from lorabench.measure.qlora import load_quantized, quant_state_tensors
from lorabench.models.families import MOE_TARGETS

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LR = 1e-4


@contextlib.contextmanager
def expected_library_warnings():
    """Silences the warnings transformers, PEFT and bitsandbytes raise on every model of ours, none of which the
    reader can act on; every other warning stays visible."""
    with warnings.catch_warnings():
        # PEFT 0.21's PeftModel.__init__ reads model.is_gradient_checkpointing, and prepare_model_for_kbit_training
        # calls gradient_checkpointing_enable: both renamed (activation_...) in transformers 5.2x
        warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing(_enable)?` is deprecated",
                                category=FutureWarning)
        # PEFT's conversion for fused experts sets gate_up's rank and alpha by pattern, and warns where the model
        # has no gate_up_proj module (every dense model)
        warnings.filterwarnings("ignore", message=r"The following (rank|alpha)_pattern keys did not match",
                                category=RuntimeWarning)
        # GPT-2's Conv1D stores its weight [in, out]: PEFT sets fan_in_fan_out itself, and says so
        warnings.filterwarnings("ignore", message=r"fan_in_fan_out is set to False but the target module is `Conv1D`",
                                category=UserWarning)
        # bitsandbytes' paged optimizers run unpaged on the CPU (the README says so once)
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU", category=UserWarning)
        yield


@dataclass
class Built:
    """A model ready to train and what the measurement needs to tell its tensors apart."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    hooks: list
    forward: Callable[[torch.Tensor], object]  # ids -> output with .loss
    base_tensors: List[torch.Tensor]
    adapter_tensors: List[torch.Tensor]

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
        import peft
        import transformers
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
        hf = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        torch.manual_seed(seed)
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(
                hf, attn_implementation=setup.attention).to(TORCH_DTYPES.get(setup.dtype, torch.bfloat16))
        if setup.dtype in QUANTIZED:
            model = load_quantized(model, setup.dtype, device, setup.attention)
    except ValueError as exc:  # e.g. Gemma 2 refuses SDPA
        raise LorabenchError(f"transformers cannot build {spec.name} with {setup.attention} attention: "
                             f"{str(exc).splitlines()[0][:200]}") from None
    if setup.kbit_prepare:
        with expected_library_warnings():
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=setup.grad_checkpointing,
                                                         gradient_checkpointing_kwargs={"use_reentrant": False})
    elif setup.grad_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x's name for it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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
        with expected_library_warnings():
            model = peft.get_peft_model(model, pcfg)
        if not method.trains_a:
            for name, p in model.named_parameters():
                if "lora_A" in name:
                    p.requires_grad_(False)
    model.train()
    runner, base, adapter = _wrapped(model, base_ids, wrap)
    params = [p for p in model.parameters() if p.requires_grad]
    if method.b_lr_ratio != 1.0:
        from peft.optimizers import create_loraplus_optimizer

        opt = create_loraplus_optimizer(model, optimizer_cls=torch.optim.AdamW, lr=LR,
                                        loraplus_lr_ratio=method.b_lr_ratio)
    else:
        from lorabench.nn.optim import make_optimizer

        opt = make_optimizer(setup.optimizer, [{"params": params}], LR, device=device)
    return Built(runner, opt, [], lambda ids: runner(input_ids=ids, labels=ids), base + quant_consts, adapter)


BUILDERS = {"lorabench": build_lorabench, "peft": build_peft}
KBIT_LORABENCH = ("--kbit-prepare runs PEFT's prepare_model_for_kbit_training on transformers' model; measure it "
                  "with --impl peft.")


__all__ = ["TORCH_DTYPES", "Built", "Wrap", "build_lorabench", "build_peft", "BUILDERS", "KBIT_LORABENCH"]
