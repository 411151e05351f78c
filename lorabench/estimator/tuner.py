"""What PEFT applies in a traced step (lorabench.measure.traced): one of lorabench's methods at a rank and targets,
spelled as the PEFT config users write, or any PEFT config read from an adapter_config.json. Pure Python: the
config is a dict that PEFT reads when the step is built.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, List, Optional, Union

from lorabench.errors import LorabenchError
from lorabench.estimator.setup import TrainingSetup
from lorabench.methods import Method
from lorabench.models.families import FAMILIES, PEFT_NAMES
from lorabench.models.hfconfig import parse_json, printable_path, read_config_text
from lorabench.spelling import option

# PEFT's peft_type -> the name answers give the tuner (a LoRA config with use_dora is DoRA)
TUNER_NAMES = {"LORA": "lora", "ADALORA": "adalora", "IA3": "ia3", "LOHA": "loha", "LOKR": "lokr", "OFT": "oft",
               "BOFT": "boft", "VERA": "vera", "FOURIERFT": "fourierft", "PROMPT_TUNING": "prompt-tuning",
               "PREFIX_TUNING": "prefix-tuning", "P_TUNING": "p-tuning", "HRA": "hra", "LN_TUNING": "ln-tuning",
               "VBLORA": "vblora", "BONE": "bone", "MISS": "miss", "RANDLORA": "randlora", "SHIRA": "shira",
               "C3A": "c3a", "ROAD": "road", "WAVEFT": "waveft", "DELORA": "delora", "GRALORA": "gralora",
               "MULTITASK_PROMPT_TUNING": "multitask-prompt-tuning", "CPT": "cpt", "XLORA": "xlora",
               "POLY": "poly", "TRAINABLE_TOKENS": "trainable-tokens"}


@dataclass(frozen=True)
class Tuner:
    """A PEFT config to apply, or none (full fine-tuning).

    Attributes:
        name: how rows name it: a lorabench method (lora, dora, ...) or PEFT's tuner (ia3, adalora, ...).
        rank: its r where it has one.
        config_json: the PEFT config (its to_dict() keys, peft_type included) as canonical JSON; "" for full.
        freeze_a: lora_A frozen after PEFT builds it (LoRA-FA).
        b_lr_ratio: B's learning rate over A's (LoRA+, through peft.optimizers.create_loraplus_optimizer).
        updates_base: the base weights are trained (full fine-tuning).
        source: where it came from ("--method" or the adapter_config.json's path), for messages.
    """

    name: str
    rank: Optional[int]
    config_json: str
    freeze_a: bool = False
    b_lr_ratio: float = 1.0
    updates_base: bool = False
    source: str = "--method"

    @property
    def config(self) -> Dict:
        return json.loads(self.config_json) if self.config_json else {}


def peft_modules(model_type: str, targets: Optional[Union[str, List[str]]]) -> Optional[Union[str, List[str]]]:
    """PEFT's target_modules for targets as the CLI takes them: None (PEFT's default for the model type),
    "all-linear", or names, each a lorabench short name (q, gate, ... through the family's PEFT names, or the
    usual ones for an undescribed family) or a module name as PEFT matches it (q_proj, c_attn, ...)."""
    if targets is None:
        return None
    names = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
    if [n.lower() for n in names] == ["all-linear"]:
        return "all-linear"
    if not names:
        raise LorabenchError(f"{option('targets')} is empty; give module names (q_proj,v_proj) or all-linear.")
    family = FAMILIES.get(model_type)
    mapping = family.peft_names if family is not None else PEFT_NAMES
    return [mapping.get(n, n) for n in names]


def method_tuner(method: Method, rank: Optional[int], model_type: str, targets, setup: TrainingSetup) -> Tuner:
    """lorabench's method as the PEFT config users write for it.

    Raises:
        LorabenchError: a method PEFT has no implementation of (Delta-LoRA).
    """
    if method.delta_update:
        raise LorabenchError(f"{method.name} has no PEFT implementation, so it cannot be traced; lorabench's "
                             "analytic model answers for the described families.")
    if not method.uses_rank:
        return Tuner(method.name, None, "", updates_base=True)
    modules = peft_modules(model_type, targets)
    if method.adapter.shared_pair:
        cfg = {"peft_type": "VERA", "task_type": "CAUSAL_LM", "r": rank, "target_modules": modules,
               "vera_dropout": setup.dropout}
    else:
        cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": setup.alpha,
               "target_modules": modules, "lora_dropout": setup.dropout, "use_dora": method.adapter.magnitude}
    return Tuner(method.name, rank, json.dumps(cfg, sort_keys=True), freeze_a=not method.trains_a,
                 b_lr_ratio=method.b_lr_ratio)


def file_tuner(path: str) -> Tuner:
    """The tuner of a PEFT adapter_config.json (a file, or a folder holding one), as PEFT saved it.

    Raises:
        LorabenchError: unreadable, not JSON, not an object, or without a peft_type.
    """
    import os

    file = os.path.join(path, "adapter_config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise LorabenchError(f"no adapter_config.json at '{printable_path(path)}' ({option('peft_config')} takes "
                             "PEFT's adapter_config.json, or a folder holding one).")
    text, _ = read_config_text(file)
    where = printable_path(file)
    cfg = parse_json(text, where)
    if not isinstance(cfg, dict):
        raise LorabenchError(f"{where}: expected a JSON object (PEFT's adapter_config.json).")
    kind = cfg.get("peft_type")
    if not isinstance(kind, str) or not kind:
        raise LorabenchError(f"{where}: 'peft_type' is missing; PEFT's adapter_config.json names its tuner "
                             "(LORA, IA3, ADALORA, ...).")
    name = TUNER_NAMES.get(kind.upper(), kind.lower())
    if kind.upper() == "LORA" and cfg.get("use_dora"):
        name = "dora"
    rank = cfg.get("r") if isinstance(cfg.get("r"), int) and not isinstance(cfg.get("r"), bool) else None
    return Tuner(name, rank, json.dumps(cfg, sort_keys=True), source=where)


__all__ = ["TUNER_NAMES", "Tuner", "peft_modules", "method_tuner", "file_tuner"]
