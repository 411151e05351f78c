"""Activation and logits memory of one step for the whole model (ActivationBreakdown), from the per-layer saves
(lorabench.estimator.layer_saves) and the loss (lorabench.estimator.loss). Pure Python: no torch import.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorabench.estimator.batches import (bool_mask_bytes, kv_cache_on, mask_saves, positions_per_row,
                                        repeat_kv_bytes, rows_of)
from lorabench.estimator.case import Case
from lorabench.estimator.layer_saves import attention_records, layer_saves, merges_experts, norm_saves
from lorabench.estimator.loss import loss_bytes
from lorabench.estimator.setup import FLOAT_BYTES


def _weight_cast_bytes(case: Case) -> int:
    """Adapter weights cast to the activation dtype, which lorabench.nn's layers keep for backward (F.linear
    saves its weight): per adapted layer, not per token. PEFT casts x instead (see _adapter_saves)."""
    spec, method, rank, targets, setup = case.spec, case.method, case.rank, case.targets, case.setup
    a = setup.act_bytes
    # (under autocast these casts are autocast's or the same bytes made by .to(x.dtype): _autocast_casts)
    if setup.impl != "lorabench" or not method.uses_rank or FLOAT_BYTES[setup.adapter_dtype] == a or setup.autocast:
        return 0
    per_layer, shapes = 0, spec.linear_shapes()
    for t in targets:
        in_f, out_f, _ = shapes[t]
        per_layer += a * rank * (in_f + out_f)
        per_layer += a * sum(n for _, n in method.adapter.vectors(rank, out_f))  # VeRA's lambdas, DoRA's m
    return spec.num_layers * per_layer


def _merged_expert_bytes(case: Case) -> int:
    """PEFT's lora.ParamWrapper on fused experts (transformers 5) merges W + s B A into a full-size weight on
    every forward (torch.baddbmm, peft/tuners/lora/layer.py _LoraFactorsProxy), which grouped_mm keeps for
    backward: every expert's weights once more per layer, whatever the tokens. In a low-precision model the
    fp32 factors are cast for the product and kept too (B only when A is frozen: A's copies stay). The
    router's merged weight (E x d) likewise."""
    spec, method, rank, targets, setup = case.spec, case.method, case.rank, case.targets, case.setup
    if not merges_experts(method, targets, setup):
        return 0
    a, shapes = setup.act_bytes, spec.moe_shapes()
    e, i, d = spec.num_experts, spec.expert_intermediate_size, spec.hidden_size
    per_layer = a * 3 * e * i * d
    if FLOAT_BYTES[setup.adapter_dtype] != a:
        # gate_up at rank 2r: B [E, 2I, 2r], A [E, 2r, d]; down at rank r: B [E, d, r], A [E, r, I]
        per_layer += a * e * ((4 * rank * i if method.trains_a else 0) + 2 * rank * d
                              + (rank * d if method.trains_a else 0) + rank * i)
    if "router" in targets:
        per_layer += a * shapes["router"][1] * d
    return spec.num_layers * per_layer


def _layer_backward_transient(case: Case) -> int:
    """Gradient buffers alive while one layer's MLP back-propagates, for setup.tokens tokens, plus the
    residual stream's gradient twice.

    Dense MLP: grads of the product, of silu's output, of gate and up (intermediate each at worst).
    Mixture of experts (transformers' grouped_mm, per routed token copy, k per token): at the fused
    gate_up's chunk the grads of gate and up and their concatenation (4 I); at down's grouped_mm the
    input's grad (I) beyond what the layer keeps (measured on the CPU tracker, Mixtral and Qwen3-MoE).
    A trainable expert weight that is not a parameter (PEFT's merged W + sBA) also gets its full-size
    gradient there, which baddbmm's backward reduces to B's and A's: down's (E x d x I) while both merged
    weights are kept; gate_up's comes after down's merged weight and the expert activations it read are
    freed. Qwen2-MoE's shared expert back-propagates as a dense MLP, apart from the routed tokens.
    """
    spec, method, targets, setup = case.spec, case.method, case.targets, case.setup
    a, t, d = setup.act_bytes, setup.tokens, spec.hidden_size
    dense = not spec.moe or spec.shared_expert_gate  # (Mixtral and Qwen3-MoE have no dense MLP)
    mlp = (3 if spec.gated_mlp else 2) * a * spec.intermediate_size * t if dense else 0
    if spec.moe:
        k, i = spec.experts_per_token, spec.expert_intermediate_size
        merged = a * spec.num_experts * i * d if merges_experts(method, targets, setup) else 0
        down = a * k * t * i + merged
        mlp = max(mlp, a * k * t * 4 * i, down)
    return mlp + 2 * setup.stream_bytes * d * t


@dataclass(frozen=True)
class ActivationBreakdown:
    """Bytes of activations at the end of forward and of the logits/loss at their forward and backward peaks.

    cache_bytes: transformers' KV cache, which the model output holds until the loop drops it (peft impl,
    no checkpointing); during forward and early backward it is the very k and v SDPA keeps.
    layer_forward_bytes: under checkpointing, the weights one layer makes for its forward and drops after it
    (cast or merged weights), which the stored activations do not hold.
    final_norm_bytes: what the final norm (and the head's weight gradient) keeps, in saved_bytes; freed
    before any layer back-propagates.
    graph_backward_bytes: what the autograd graph holds beyond its saved tensors (int8 bases' inputs on the
    CPU, see layer_saves), in saved_bytes but not released as backward goes: alive to backward's end.
    graph_step_bytes: the same bytes when the graph outlives backward: the plain loop's output holds the loss,
    and so the graph, through the optimizer step (and, accumulating, through the next forward).
    autocast_cache_bytes: under checkpointing, the casts of trainable weights autocast caches until forward
    ends (kept for backward, hence in saved_bytes, without checkpointing).
    cache_extra_bytes: what transformers' KV cache holds beyond the saved k and v (autocast's fp32 keys),
    from the end of forward until the loop drops the output.
    """

    saved_bytes: int
    recompute_bytes: int
    transient_bytes: int
    logits_held_bytes: int
    logits_forward_bytes: int
    logits_backward_bytes: int
    logits_after_forward_bytes: int = 0
    cache_bytes: int = 0
    layer_forward_bytes: int = 0
    final_norm_bytes: int = 0
    autocast_cache_bytes: int = 0
    cache_extra_bytes: int = 0
    graph_backward_bytes: int = 0
    graph_step_bytes: int = 0
    mask_bytes: int = 0
    host_bytes: int = 0

    @property
    def after_forward_bytes(self) -> int:
        """What is alive when forward returns: saved activations, logits and the loss's kept tensors (and
        what a kept output's KV cache holds beyond them)."""
        return self.saved_bytes + self.logits_after_forward_bytes + (self.cache_extra_bytes if self.cache_bytes
                                                                     else 0)


def estimate_activations(case: Case) -> ActivationBreakdown:
    """Activation and logits memory of one step for the whole model."""
    spec, method, setup = case.spec, case.method, case.setup
    a, s, t, d = setup.act_bytes, setup.stream_bytes, setup.tokens, spec.hidden_size
    L = spec.num_layers
    # The first layer's input needs a gradient when the embeddings train, or when transformers checkpoints:
    # its activation_checkpointing_enable calls enable_input_require_grads for models read from input_ids
    # (transformers 5 modeling_utils.py), so the embeddings' output requires grad. Otherwise the first
    # layer's norm keeps nothing.
    first_live = method.base_trainable or (setup.grad_checkpointing and setup.impl == "peft")
    first, first_casts, first_held = layer_saves(case, input_needs_grad=first_live)
    rest, rest_casts, rest_held = layer_saves(case)
    graph_held = t * (first_held + (L - 1) * rest_held)
    per_token = 16  # input_ids and labels, int64
    if setup.packing or setup.padding_free:
        per_token += 8  # position_ids, int64
    if setup.padding != "none":
        per_token += 8  # the attention mask, int64 as tokenizers make it
    # what a mask adds to each layer whose attention records (batches.mask_saves): sliding-window layers may have
    # one where full ones do not (per kind, not per layer: depth is a count here)
    sliding = spec.sliding_layers()
    per_kind = {kind: _mask_layer(case, kind) for kind in (True, False)}
    first_mask = per_kind[spec.slides(0)]
    mask_all = sliding * per_kind[True] + (L - sliding) * per_kind[False] - first_mask
    mask_all += first_mask if attention_records(case, first_live) else 0
    mask_one = max(per_kind[True] if sliding else 0, per_kind[False] if L > sliding else 0)
    bool_masks = bool_mask_bytes(spec, setup)
    if spec.single_matrix:
        return ActivationBreakdown(
            saved_bytes=t * (per_token + first + (L - 1) * rest) + first_casts + (L - 1) * rest_casts,
            recompute_bytes=0, transient_bytes=t * 2 * a * d, logits_held_bytes=0, logits_forward_bytes=0,
            logits_backward_bytes=0)
    autocast_cache = 0
    if setup.grad_checkpointing:
        # Checkpointing (Chen et al. 2016) keeps each layer's input; backward recomputes one layer at a time.
        # What int8 bases hold on their autograd context stays too (layer_saves), but for what is the layer's
        # input itself (post-norm layouts feed q, k and v the residual stream).
        input_held = a * d if spec.arch.norm_layout == "post" and rest_held else 0
        # offloaded (setup.offload "checkpoints"), the inputs are in host memory, one brought back at a time; but
        # the first layer's input stays where it is a leaf that requires a gradient (the frozen embeddings' output
        # that transformers' enable_input_require_grads marks): autograd's AccumulateGrad node for it holds it
        offloaded = setup.offload == "checkpoints"
        leaf = offloaded and setup.impl == "peft" and not method.base_trainable
        stored = (1 if leaf else 0) if offloaded else L
        per_token += stored * s * d + first_held + (L - 1) * (rest_held - input_held)
        recompute = t * (rest + mask_one + (s * d if offloaded else 0)) + rest_casts
        host = L * t * s * d if offloaded else 0
        # autocast's cache keeps every trainable weight's cast until forward ends, checkpointed or not
        autocast_cache = L * _trainable_casts(case)
        layer_casts = 0
    else:
        per_token += first + (L - 1) * rest + mask_all
        recompute = host = 0
        layer_casts = first_casts + (L - 1) * rest_casts
    rope = 0
    if not spec.max_positions:
        # rotary cos and sin [1, S, hd], kept by the q/k multiplications: per position, not per token
        # (Gemma 3: one pair for its sliding layers, one for its global layers). transformers makes them in
        # the residual stream's dtype (fp32 under autocast).
        # (Gemma 3 cut to its sliding layers alone keeps one pair: the global pair is made, read by no layer, freed)
        rows, row_len = rows_of(setup)
        tables = spec.arch.rope_tables if 0 < spec.sliding_layers() < L else 1
        rope = 2 * s * spec.head_dim * row_len * tables * (rows if positions_per_row(setup) else 1)
    final = norm_saves(spec, d, 1, s, method.base_trainable)  # final norm
    if setup.loss == "chunked":
        final += s * d  # the final norm's output, from which the chunked loss recomputes the logits
    elif method.base_trainable and setup.loss == "standard":
        # the output head's weight gradient needs its input: the final norm's output, or autocast's cast of it
        # (Liger's fused loss takes its gradients in forward and keeps neither)
        final += a * d
    per_token += final
    # autocast's cast of the output head's weight, kept for the hidden states' gradient (standard loss)
    head_cast = a * spec.vocab_size * d if setup.autocast and setup.loss == "standard" else 0
    if setup.attention == "eager":
        # the materialized causal mask, shared by all layers (and a sliding-window one for sliding layers),
        # in the residual stream's dtype
        masks = 1 + (1 if 0 < spec.sliding_layers() < L else 0)
        per_token += masks * s * rows_of(setup)[1]
    held, fwd, bwd, after = loss_bytes(spec, method, setup)
    # transformers' KV cache holds every layer's rotated k and its v: SDPA's own saved k and v, except under
    # autocast, where the rotated k is fp32 (q/k times the fp32 cos/sin tables) and SDPA keeps its bf16 cast
    cache_k_extra = L * t * spec.kv_dim * s if kv_cache_on(setup) and setup.autocast else 0
    # the plain loop's output keeps the cache until the step ends (Trainer drops it)
    cache = L * t * spec.kv_dim * (s + a) if kv_cache_on(setup) else 0
    casts = _weight_cast_bytes(case) + _merged_expert_bytes(case)
    layer_forward = 0
    if setup.grad_checkpointing:  # recomputed one layer at a time, and made one layer at a time in forward
        recompute += casts // L
        layer_forward = casts // L
        casts = 0
    transient = _layer_backward_transient(case)
    return ActivationBreakdown(
        saved_bytes=t * per_token + rope + casts + layer_casts + head_cast
        + (bool_masks if setup.grad_checkpointing else 0), recompute_bytes=recompute,
        transient_bytes=transient, logits_held_bytes=held, logits_forward_bytes=fwd, logits_backward_bytes=bwd,
        logits_after_forward_bytes=after, cache_bytes=cache, layer_forward_bytes=layer_forward,
        final_norm_bytes=t * final + head_cast, autocast_cache_bytes=autocast_cache, cache_extra_bytes=cache_k_extra,
        graph_backward_bytes=graph_held,
        graph_step_bytes=(graph_held + _checkpoint_inputs_held(case)) if setup.loop == "plain" else 0,
        mask_bytes=0 if setup.grad_checkpointing else bool_masks, host_bytes=host)


def _mask_layer(case: Case, sliding: bool) -> int:
    """Bytes per token a mask adds to one layer (batches.mask_saves); with the plain loop's KV cache, the k and v
    that repeat_kv copied stay in the cache beside the copies SDPA keeps."""
    spec, setup = case.spec, case.setup
    added = mask_saves(spec, setup, sliding)
    if added and kv_cache_on(setup) and repeat_kv_bytes(spec, setup):
        added += 2 * setup.act_bytes * spec.kv_dim
    return added


def _checkpoint_inputs_held(case: Case) -> int:
    """Checkpointed transformers layers under the plain loop: the output the loop keeps references the step's
    graph, whose first checkpoint still holds its input (the embeddings' output) and the detached copy it ran on
    (torch.utils.checkpoint, non-reentrant), alive through the optimizer step (measured by the trace: 2 x tokens
    x d activations whatever the depth, tests/test_audit.py)."""
    setup = case.setup
    if not (setup.grad_checkpointing and setup.impl == "peft"):
        return 0
    if setup.offload == "checkpoints":  # no checkpoint holds it: only the graph's leaf, where it is one
        return 0 if case.method.base_trainable else setup.act_bytes * case.spec.hidden_size * setup.tokens
    return 2 * setup.act_bytes * case.spec.hidden_size * setup.tokens


def _trainable_casts(case: Case) -> int:
    """Bytes of one layer's trainable weights cast by autocast (the casts its cache keeps)."""
    spec, method, rank, targets, setup = case.spec, case.method, case.rank, case.targets, case.setup
    if not setup.autocast:
        return 0
    a, shapes = setup.act_bytes, spec.linear_shapes()
    if method.base_trainable:
        return a * sum(i * o for i, o, _ in shapes.values())
    if not method.uses_rank:
        return 0
    return a * rank * sum((i if method.trains_a else 0) + (o if method.trains_b else 0)
                          for i, o, _ in (shapes[n] for n in targets))
