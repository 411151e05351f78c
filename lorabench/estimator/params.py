"""Exact parameter counts for full fine-tuning and every adapter method.

Counts follow what PEFT's `get_nb_trainable_parameters()` reports for the same model and config:
adapter parameters are added to the total, LoRA-FA's frozen A is a parameter (counted in the total),
VeRA's shared projections are buffers (counted in neither). Pure Python: no torch import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Tuple

from lorabench.errors import LorabenchError
from lorabench.spelling import option
from lorabench.methods import Method
from lorabench.models.families import MOE_TARGETS
from lorabench.models.spec import ModelSpec


def _target_aliases(spec: ModelSpec) -> Dict[str, str]:
    """Every name a user may give for a target, lower-case, mapped to ours: q, q_proj, ..."""
    names = {t: t for t in spec.target_names}
    for t in spec.target_names:
        if not spec.single_matrix:
            names[spec.peft_name(t).lower()] = t
    return names


def parse_targets(spec: ModelSpec, targets: Optional[Iterable[str] | str],
                  modules_only: bool = False) -> Tuple[str, ...]:
    """Target projections in the model's layer order.

    Args:
        targets: names such as "q,v" or PEFT's "q_proj,v_proj" (or a list), "all-linear" (PEFT's meaning:
            every Linear but the output head, and a mixture of experts' fused expert weights), or None for
            the family's PEFT default.
        modules_only: all-linear means the nn.Linear modules only, not a mixture of experts' router and
            experts (PEFT's VeRA, which has no conversion for fused experts).

    Raises:
        LorabenchError: a name the model does not have (the message lists the ones it has).
    """
    valid = spec.target_names
    if spec.single_matrix:
        if targets is not None:
            raise LorabenchError(f"{option('targets')} does not apply to a {option('d')} matrix: the matrix is its "
                                 "one target.")
        return valid
    if targets is None:
        return spec.default_targets
    if isinstance(targets, str):
        targets = targets.split(",")
    names = {t.strip().lower() for t in targets if t.strip()}
    if not names:
        raise LorabenchError(f"{option('targets')} is empty.")
    if "all-linear" in names or "all" in names:
        return tuple(t for t in valid if not (modules_only and t in MOE_TARGETS))
    aliases = _target_aliases(spec)
    unknown = sorted(n for n in names if n not in aliases)
    if unknown:
        fused = ""
        if spec.fused_qkv and set(unknown) & {"q", "k", "v", "q_proj", "k_proj", "v_proj"}:
            fused = f" ({spec.arch.label} fuses q, k and v into one projection: use qkv)"
        elif spec.arch.fused_gate_up and set(unknown) & {"gate", "up", "gate_proj", "up_proj"}:
            fused = f" ({spec.arch.label} fuses gate and up into one projection: use gate_up)"
        have = ", ".join(f"{t} ({spec.peft_name(t)})" if spec.peft_name(t) != t else t for t in valid)
        raise LorabenchError(f"unknown target(s) {', '.join(unknown)} for {spec.name}{fused}; "
                             f"it has {have}, or all-linear.")
    chosen = {aliases[n] for n in names}
    return tuple(n for n in valid if n in chosen)


def base_tensors(spec: ModelSpec) -> Tuple[Tuple[int, int], ...]:
    """(numel, count) of each kind of the model's own parameter tensors, tied embeddings once: what full
    fine-tuning trains (bnb's 8-bit optimizer decides per tensor) and what the total counts."""
    L, d, out = spec.num_layers, spec.hidden_size, []
    for i, o, bias in spec.linear_shapes().values():
        out.append((i * o, L))
        if bias:
            out.append((o, L))
    if spec.single_matrix:
        return tuple(out)
    out += [(e * o * i, L) for e, o, i in spec.moe_shapes().values()]
    norms = spec.arch.norms_per_layer * L + 1  # the final norm too
    out += [(d, norms * (2 if spec.norm == "layernorm" else 1)), (spec.vocab_size * d, 1 if spec.tie_embeddings else 2)]
    if spec.arch.qk_norm == "head":
        out.append((spec.head_dim, 2 * L))
    elif spec.arch.qk_norm == "full":
        out += [(spec.q_dim, L), (spec.kv_dim, L)]
    if spec.max_positions:
        out.append((spec.max_positions * d, 1))
    return tuple(out)


def count_base_params(spec: ModelSpec) -> int:
    """All parameters of the model, tied embeddings counted once (as `model.num_parameters()`)."""
    return sum(numel * count for numel, count in base_tensors(spec))


def count_active_params(spec: ModelSpec) -> int:
    """Parameters one token computes with: a mixture of experts uses experts_per_token of its experts
    (the rest are resident but idle); every other parameter, the embedding row lookup aside, is used."""
    idle = spec.num_layers * (spec.num_experts - spec.experts_per_token) * spec.expert_params
    return count_base_params(spec) - idle


def adapter_tensors(spec: ModelSpec, method: Method, rank: int, target: str) -> Tuple[Tuple[int, bool], ...]:
    """(numel, trainable) of each adapter tensor the method adds to one target of one layer.

    An nn.Linear gets PEFT's lora.Linear (adapter_params). A mixture of experts' router and fused experts
    are parameters, which PEFT wraps in lora.ParamWrapper (peft/tuners/lora/layer.py): for a 3-D weight
    [E, out, in], A is (r E) x in and B is out x (r E); the router is one matrix (E = 1). PEFT's conversion
    for transformers 5 gives the fused gate_up_proj rank 2r (its rank_pattern), down_proj rank r.
    """
    if target not in MOE_TARGETS:
        i, o, _ = spec.linear_shapes()[target]
        # a shared pair's A and B are buffers (vera_shared_numel), in no count: only its vectors are parameters
        factors = () if method.adapter.shared_pair else ((rank * i, method.trains_a), (o * rank, True))
        return factors + tuple((n, True) for _, n in method.adapter.vectors(rank, o))
    shapes = spec.moe_shapes()
    wrapped = [shapes["router"] + (rank,)] if target == "router" else \
        [shapes["gate_up_proj"] + (2 * rank,), shapes["down_proj"] + (rank,)]
    out = []
    for e, o, i, r in wrapped:
        out += [(r * e * i, method.trains_a), (o * r * e, True)]
    return tuple(out)


def vera_shared_numel(spec: ModelSpec, rank: int, targets: Tuple[str, ...]) -> int:
    """Elements of VeRA's one shared A (r x max in) and B (max out x r), sliced per layer shape."""
    shapes = [spec.linear_shapes()[t] for t in targets]
    return rank * max(s[0] for s in shapes) + rank * max(s[1] for s in shapes)


def check_targets(spec: ModelSpec, method: Method, rank: int, targets: Tuple[str, ...]) -> None:
    """Raises LorabenchError unless 0 < rank <= the smallest dimension of every attention and MLP target,
    and the method can adapt every target as PEFT does.

    PEFT checks no rank: a router (E outputs) or Qwen2-MoE's shared-expert gate (1 output) takes any rank,
    so those are not checked either.
    """
    if not isinstance(rank, int) or rank <= 0:
        raise LorabenchError(f"rank must be a positive integer, got {rank!r}.")
    moe = [t for t in targets if t in MOE_TARGETS]
    if moe and method.adapter.moe_refusal:
        raise LorabenchError(f"{method.name} cannot adapt the {' and '.join(moe)} of {spec.name}: "
                             f"{method.adapter.moe_refusal}")
    shapes = spec.linear_shapes()
    for t in targets:
        if t in moe or t == "shared_gate":
            continue
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
    names = parse_targets(spec, targets, modules_only=method.adapter.linear_modules_only)
    if rank is None:
        raise LorabenchError(f"{method.name} needs a rank (--rank).")
    check_targets(spec, method, rank, names)
    per_target: Dict[str, int] = {}
    trainable = frozen = 0
    for t in names:
        tensors = adapter_tensors(spec, method, rank, t)
        layer_trainable = sum(n for n, train in tensors if train)
        per_target[t] = spec.num_layers * layer_trainable
        trainable += spec.num_layers * layer_trainable
        frozen += spec.num_layers * sum(n for n, train in tensors if not train)
    total = base + trainable + frozen
    shared = vera_shared_numel(spec, rank, names) if method.adapter.shared_pair else 0
    return ParamCount(method.name, rank, names, base, trainable + frozen, trainable, total,
                      100.0 * trainable / total, 100.0 * trainable / base, base / trainable,
                      shared, method.updates_base, per_target)
