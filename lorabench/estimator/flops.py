"""Model FLOPs of one training step. Pure Python.

Model FLOPs (estimate_flops) follow the references: a [t, in] x [in, out] product costs 2 t in out FLOPs
(Kaplan et al. 2020, sec. 2.1; PaLM, Chowdhery et al. 2022, appendix B); backward costs one such product
for the input gradient and one for the weight gradient; a frozen weight skips the second, which is why
adapters train at about 2/3 of full fine-tuning's FLOPs per token. Elementwise work is left out there, as in
those references, and the MFU is taken over these FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lorabench.estimator.batches import useful_keys
from lorabench.estimator.case import Case
from lorabench.models.spec import ModelSpec


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step.

    Attributes:
        forward_flops: the forward pass (and the loss head).
        backward_flops: input and weight gradients.
        recompute_flops: the extra forward of gradient checkpointing.
        update_flops: per-step matrix work outside forward/backward (DoRA's weight norm, Delta-LoRA's W update).
        step_flops: their sum.
        flops_per_token: step_flops / tokens.
    """

    forward_flops: int
    backward_flops: int
    recompute_flops: int
    update_flops: int
    step_flops: int
    flops_per_token: float


def _attention_flops_per_token(spec: ModelSpec, setup) -> int:
    """QK^T and AV for one token, summed over the layers, causal: 2 products of 2 q_dim FLOPs per key the query
    attends to (batches.useful_keys: half the row, or about the window on a sliding-window layer; its own example
    where a row holds several). FlashAttention-2 (Dao 2023) counts causal attention at half the dense FLOPs; so do
    we. These are model FLOPs, what MFU is taken over: a masked kernel computing every key takes longer (the step
    time's ops, stepwork) but does no more of the model's work."""
    sliding = spec.sliding_layers()
    keys = (sliding * useful_keys(spec, setup, True)
            + (spec.num_layers - sliding) * useful_keys(spec, setup, False))
    return round(4 * spec.q_dim * keys)


def _first_layer_skipped_flops(case: Case) -> int:
    """Per token: the backward products of the first layer (the first matrix of --d matrices) that autograd does
    not run, as lorabench.estimator.stepwork._layer times them: on a frozen base nothing before the first adapted
    projection needs a gradient, so neither do the input gradients of the projections (and adapters) up to it,
    nor the attention's backward before it, nor the routed experts' (unless PEFT merges them)."""
    spec, method, rank, targets = case.spec, case.method, case.rank, case.targets
    if method.base_trainable:
        return 0
    shapes = spec.linear_shapes()
    rank = rank or 0

    def adapted(name: str) -> bool:
        return method.uses_rank and name in targets

    def dx(names) -> int:  # the base's input gradient, and the adapter's through A
        return sum(2 * i * o + (2 * rank * i if adapted(n) else 0)
                   for n, (i, o, _) in shapes.items() if n in names)

    if spec.single_matrix:
        return dx(("w",))
    arch, skipped = spec.arch, 0
    qkv = ("qkv",) if arch.fused_qkv else ("q", "k", "v")
    skipped += dx(qkv)
    live = any(adapted(n) for n in qkv)
    if not live:
        keys = useful_keys(spec, case.setup, spec.slides(0))
        skipped += 2 * round(4 * spec.q_dim * keys)  # the attention's backward: twice its forward
        skipped += dx(("o",))
    live = live or adapted("o")
    if spec.moe:
        merged = method.uses_rank and "experts" in targets  # (PEFT's merged experts compute their input grad)
        if not live and not merged:
            skipped += 2 * spec.experts_per_token * spec.expert_params
        live = live or any(adapted(n) for n in ("router", "experts"))
        if not live and spec.shared_expert_gate:
            skipped += dx(("gate", "up", "shared_gate", "down"))
        return skipped
    gate_up = ("gate_up",) if arch.fused_gate_up else ("gate", "up") if arch.gated_mlp else ("up",)
    if not live:
        skipped += dx(gate_up)
    live = live or any(adapted(n) for n in gate_up)
    return skipped + (0 if live else dx(("down",)))


def estimate_flops(case: Case) -> StepFlops:
    """FLOPs of one optimizer step of method on spec at setup's batch and sequence length, over its
    setup.grad_accum micro-batches."""
    spec, method, rank, targets, setup = case.spec, case.method, case.rank, case.targets, case.setup
    t = setup.tokens
    shapes = spec.linear_shapes()
    linear = sum(i * o for i, o, _ in shapes.values())
    if spec.moe:  # the router, and the experts each token is routed to (its active parameters)
        linear += spec.num_experts * spec.hidden_size + spec.experts_per_token * spec.expert_params
    layer_fwd = 2 * linear  # per token
    layer_bwd = 2 * linear * (2 if method.base_trainable else 1)
    update = 0
    for name in targets if method.uses_rank else ():
        if name not in shapes:  # a mixture of experts' router and experts (PEFT's ParamWrapper)
            continue
        i, o, _ = shapes[name]
        # Adapter products: A (r x in) then B (out x r). VeRA runs the same two shapes (shared A, B).
        adapter = 2 * rank * (i + o)
        layer_fwd += adapter
        # (a shared pair's vectors learn by elementwise work)
        weight_grads = (2 * rank * i if method.trains_a else 0) + (2 * rank * o if method.trains_b else 0)
        layer_bwd += adapter + weight_grads
        if method.adapter.magnitude:
            update += spec.num_layers * 2 * rank * i * o  # B A for ||W + s B A|| each step
        if method.delta_update:
            update += spec.num_layers * 2 * (2 * rank) * i * o  # W += [B' B][A'; -A] in one product
    attn = 0 if spec.single_matrix else _attention_flops_per_token(spec, setup)  # every layer's
    head = 0 if spec.single_matrix else 2 * spec.hidden_size * spec.vocab_size
    head_bwd = head * (2 if method.base_trainable else 1)
    fwd = t * (spec.num_layers * layer_fwd + attn + head)
    bwd = t * (spec.num_layers * layer_bwd + 2 * attn + head_bwd  # dQ, dK, dV, dP: twice the forward products
               - _first_layer_skipped_flops(replace(case, targets=targets if method.uses_rank else ())))
    recompute = t * (spec.num_layers * layer_fwd + attn) if setup.grad_checkpointing else 0
    k = setup.grad_accum  # micro-batches per optimizer step: forward and backward run k times, the update once
    fwd, bwd, recompute = k * fwd, k * bwd, k * recompute
    total = fwd + bwd + recompute + update
    return StepFlops(fwd, bwd, recompute, update, total, total / (t * k))
