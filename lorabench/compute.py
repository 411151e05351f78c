"""FLOPs of one training step per method, and the step time they imply on a GPU. Pure Python.

Matrix multiplies dominate: a [t, in] x [in, out] product costs 2 t in out FLOPs (Kaplan et al. 2020,
sec. 2.1; PaLM, Chowdhery et al. 2022, appendix B). Backward costs one such product for the input
gradient and one for the weight gradient; a frozen weight skips the second, which is why adapters train
at about 2/3 of full fine-tuning's cost per token. Elementwise work (norms, activations, optimizer) is
left out, as in those references.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from lorabench.gpus import GPU
from lorabench.memory import TrainingSetup
from lorabench.methods import Method
from lorabench.specs import ModelSpec


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


def _attention_flops_per_token(spec: ModelSpec, seq_len: int) -> int:
    """QK^T and AV for one token of one layer, causal: 2 products of 2 s q_dim, half of them masked out
    (FlashAttention-2, Dao 2023, counts causal attention at half the dense FLOPs; so do we)."""
    return 2 * seq_len * spec.q_dim  # = 2 * (2 * s * q_dim) / 2


def estimate_flops(spec: ModelSpec, method: Method, rank: Optional[int],
                   targets: Tuple[str, ...], setup: TrainingSetup) -> StepFlops:
    """FLOPs of one training step of method on spec at setup's batch and sequence length."""
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
        weight_grads = (2 * rank * i if method.trains_a else 0) + 2 * rank * o
        if method.adapter == "vera":
            weight_grads = 0  # only the scaling vectors learn: elementwise work
        layer_bwd += adapter + weight_grads
        if method.adapter == "dora":
            update += spec.num_layers * 2 * rank * i * o  # B A for ||W + s B A|| each step
        if method.name == "delta-lora":
            update += spec.num_layers * 2 * (2 * rank) * i * o  # W += [B' B][A'; -A] in one product
    attn = 0 if spec.single_matrix else _attention_flops_per_token(spec, setup.seq_len)
    layer_fwd += attn
    layer_bwd += 2 * attn  # dQ, dK, dV, and dP: twice the forward products
    head = 0 if spec.single_matrix else 2 * spec.hidden_size * spec.vocab_size
    head_bwd = head * (2 if method.base_trainable else 1)
    fwd = t * (spec.num_layers * layer_fwd + head)
    bwd = t * (spec.num_layers * layer_bwd + head_bwd)
    recompute = t * spec.num_layers * layer_fwd if setup.grad_checkpointing else 0
    total = fwd + bwd + recompute + update
    return StepFlops(fwd, bwd, recompute, update, total, total / t)


@dataclass(frozen=True)
class StepTime:
    """Step time implied by a FLOP count on a GPU at a stated model-FLOPs utilisation."""

    gpu: str
    mfu: float
    step_ms: float
    tokens_per_s: float


def estimate_step_time(flops: StepFlops, gpu: GPU, mfu: float, tokens: int) -> StepTime:
    """step time = FLOPs / (peak dense bf16 FLOP/s x utilisation)."""
    seconds = flops.step_flops / (gpu.bf16_flops * mfu)
    return StepTime(gpu.name, mfu, 1e3 * seconds, tokens / seconds)
