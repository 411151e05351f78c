"""Exact parameter counts for full fine-tuning and every adapter method.

Counts follow what PEFT's `get_nb_trainable_parameters()` reports for the same model and config:
adapter parameters are added to the total, LoRA-FA's frozen A is a parameter (counted in the total),
VeRA's shared projections are buffers (counted in neither). Pure Python: no torch import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Tuple

from lorabench.errors import LorabenchError
from lorabench.methods import Method
from lorabench.specs import ModelSpec


def parse_targets(spec: ModelSpec, targets: Optional[Iterable[str] | str]) -> Tuple[str, ...]:
    """Target projections in the model's layer order.

    Args:
        targets: names such as "q,v" (or a list), "all-linear" (PEFT's meaning: every Linear but the
            output head), or None for the family's PEFT default.

    Raises:
        LorabenchError: a name the model does not have.
    """
    valid = spec.target_names
    if spec.single_matrix:
        if targets is not None:
            raise LorabenchError("--targets does not apply to a --d matrix: the matrix is its one target.")
        return valid
    if targets is None:
        return spec.default_targets
    if isinstance(targets, str):
        targets = targets.split(",")
    names = {t.strip().lower() for t in targets if t.strip()}
    if not names:
        raise LorabenchError("--targets is empty.")
    if "all-linear" in names or "all" in names:
        return valid
    unknown = sorted(names - set(valid))
    if unknown:
        hint = " (gpt2 fuses q, k and v: use qkv)" if spec.fused_qkv and set(unknown) & {"q", "k", "v"} else ""
        raise LorabenchError(f"unknown target(s) {', '.join(unknown)} for {spec.name}{hint}; "
                             f"choose from {', '.join(valid)} or all-linear.")
    return tuple(n for n in valid if n in names)


def count_base_params(spec: ModelSpec) -> int:
    """All parameters of the model, tied embeddings counted once (as `model.num_parameters()`)."""
    layer = sum(i * o + (o if bias else 0) for i, o, bias in spec.linear_shapes().values())
    if spec.single_matrix:
        return spec.num_layers * layer
    layer += 2 * spec.norm_params
    embed = spec.vocab_size * spec.hidden_size
    head = 0 if spec.tie_embeddings else embed
    return embed + head + spec.max_positions * spec.hidden_size + spec.num_layers * layer + spec.norm_params


@dataclass(frozen=True)
class AdapterParams:
    """Adapter parameters added to one target projection."""

    trainable: int
    frozen: int


def adapter_params(method: Method, rank: int, in_features: int, out_features: int) -> AdapterParams:
    """Adapter parameters on one in x out projection.

    LoRA: A is r x in, B is out x r (Hu et al. 2021). DoRA adds a magnitude vector of size out
    (Liu et al. 2024). VeRA trains lambda_d (r) and lambda_b (out); its A and B are shared buffers.
    """
    a, b = rank * in_features, out_features * rank
    if method.adapter == "lora":
        return AdapterParams(trainable=a + b, frozen=0) if method.trains_a else AdapterParams(b, a)
    if method.adapter == "dora":
        return AdapterParams(trainable=a + b + out_features, frozen=0)
    if method.adapter == "vera":
        return AdapterParams(trainable=rank + out_features, frozen=0)
    return AdapterParams(0, 0)


def vera_shared_numel(spec: ModelSpec, rank: int, targets: Tuple[str, ...]) -> int:
    """Elements of VeRA's one shared A (r x max in) and B (max out x r), sliced per layer shape."""
    shapes = [spec.linear_shapes()[t] for t in targets]
    return rank * max(s[0] for s in shapes) + rank * max(s[1] for s in shapes)


def check_rank(spec: ModelSpec, rank: int, targets: Tuple[str, ...]) -> None:
    """Raises LorabenchError unless 0 < rank <= the smallest dimension of every target."""
    if not isinstance(rank, int) or rank <= 0:
        raise LorabenchError(f"rank must be a positive integer, got {rank!r}.")
    shapes = spec.linear_shapes()
    for t in targets:
        i, o, _ = shapes[t]
        if rank > min(i, o):
            raise LorabenchError(f"rank {rank} is larger than target '{t}' ({o} x {i}) of {spec.name}.")


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts for one (model, method, rank).

    Attributes:
        base_params: the model without adapters.
        adapter_params: parameters the method adds (trainable and frozen).
        trainable_params: parameters that receive gradients (PEFT's trainable count).
        total_params: base + adapter parameters (PEFT's all_param).
        trainable_pct: 100 x trainable / total, as PEFT prints it.
        pct_of_full: 100 x trainable / base_params: the share of full fine-tuning.
        reduction: base_params / trainable_params (the seed's "256x").
        shared_buffer_numel: VeRA's frozen shared projections (buffers, in no count above).
        updates_base_weights: W itself changes (full, Delta-LoRA) although it may get no gradient.
        per_target: trainable adapter parameters per target name, all layers together.
    """

    method: str
    rank: Optional[int]
    targets: Tuple[str, ...]
    base_params: int
    adapter_params: int
    trainable_params: int
    total_params: int
    trainable_pct: float
    pct_of_full: float
    reduction: float
    shared_buffer_numel: int
    updates_base_weights: bool
    per_target: Dict[str, int]


def count_params(spec: ModelSpec, method: Method, rank: Optional[int] = None,
                 targets: Optional[Iterable[str] | str] = None) -> ParamCount:
    """Exact parameter counts for method at rank on the target projections of spec.

    Raises:
        LorabenchError: bad targets, or a rank that is not positive or exceeds a target's dimensions.
    """
    base = count_base_params(spec)
    if not method.uses_rank:
        return ParamCount(method.name, None, (), base, 0, base, base, 100.0, 100.0, 1.0, 0,
                          True, {})
    names = parse_targets(spec, targets)
    if rank is None:
        raise LorabenchError(f"{method.name} needs a rank (--rank).")
    check_rank(spec, rank, names)
    shapes = spec.linear_shapes()
    per_target: Dict[str, int] = {}
    trainable = frozen = 0
    for t in names:
        p = adapter_params(method, rank, shapes[t][0], shapes[t][1])
        per_target[t] = spec.num_layers * p.trainable
        trainable += spec.num_layers * p.trainable
        frozen += spec.num_layers * p.frozen
    total = base + trainable + frozen
    shared = vera_shared_numel(spec, rank, names) if method.adapter == "vera" else 0
    return ParamCount(method.name, rank, names, base, trainable + frozen, trainable, total,
                      100.0 * trainable / total, 100.0 * trainable / base, base / trainable,
                      shared, method.updates_base, per_target)
