"""The ops of a step outside the decoder layers: embeddings, final norm, output head and loss (standard,
chunked or Liger's fused), and the optimizer step with what a method does after it. Pure Python.
"""

from __future__ import annotations

from typing import List, Tuple

from lorabench.estimator.case import Case
from lorabench.estimator.loss import liger_chunk_tokens
from lorabench.estimator.ops import Op, Ops, norm_bytes, times
from lorabench.estimator.optimizer import OPTIMIZERS, trainable_tensors
from lorabench.estimator.setup import FLOAT_BYTES, TrainingSetup
from lorabench.methods import Method
from lorabench.models.spec import ModelSpec


def outside_layers(spec: ModelSpec, method: Method, setup: TrainingSetup) -> List[Op]:
    """Embeddings, the final norm, the output head and transformers' causal-LM loss (fp32 logits, log_softmax,
    nll_loss; Gemma 2's logit soft-cap)."""
    ops = Ops()
    a, s, t, d, v = setup.act_bytes, setup.stream_bytes, setup.tokens, spec.hidden_size, spec.vocab_size
    full = method.base_trainable
    p = FLOAT_BYTES.get(setup.dtype, 2)
    ops.stream("embedding", "forward", t * 2 * s * d + (t * 3 * s * d if spec.arch.embed_scale else 0))
    if spec.max_positions:
        ops.stream("positions", "forward", t * 3 * s * d)
    if full:  # a zeroed V x d gradient and the rows added into it
        ops.stream("embedding", "backward", p * v * d + t * 3 * s * d)
    nf, nb, nl = norm_bytes(spec, s)
    ops.stream("final norm", "forward", t * nf * d, launches=nl)
    ops.stream("final norm", "backward", t * nb * d, launches=2 * nl)
    if setup.loss != "standard":
        ops.ops.extend(chunked_head(spec, method, setup))
        return ops.ops
    if setup.autocast:  # the head's weight and its input cast down (a trainable head's gradient back up)
        ops.stream("output head casts", "forward", (4 + a) * v * d + t * (s + a) * d, launches=2)
        ops.stream("output head casts", "backward", t * (a + s) * d + ((a + 4) * v * d if full else 0))
    ops.gemm("output head", "forward", t, d, v, a)
    ops.gemm("output head dx", "backward", t, v, d, a)
    if full:
        ops.gemm("output head dW", "backward", d, t, v, a)
    if spec.final_softcap:  # cap * tanh(logits / cap)
        ops.stream("logit soft-cap", "forward", t * 6 * a * v, launches=3)
        ops.stream("logit soft-cap", "backward", t * 8 * a * v, launches=3)
    up = a + 4 if a < 4 else 0  # logits.float()
    # log_softmax over a long row reads it three times (max, sum of exp, output) and writes once; its
    # backward reads the gradient twice (sum, output) and the output once; nll_loss's gradient is a zeroed V
    ops.stream("loss: fp32 logits, log_softmax", "forward", t * (up + 16 * v), launches=4)
    ops.stream("loss: fp32 logits, log_softmax", "backward", t * (up + 20 * v), launches=4)
    return ops.ops


def chunks(t: int, chunk: int) -> List[Tuple[int, int]]:
    """(tokens, how many) of the chunks t tokens split into: full chunks, then the rest."""
    return [(c, n) for c, n in ((chunk, t // chunk), (t % chunk, 1)) if c and n]


def chunked_head(spec: ModelSpec, method: Method, setup: TrainingSetup) -> List[Op]:
    """The output head and loss without full logits, chunk by chunk (each chunk's products reread the head).

    chunked (lorabench.nn.loss): forward = product, fp32 copy, max, exp in place, sum; backward recomputes
    the product (one more output-head product), exp in place, the scatter and scale, the cast, then the
    d_hidden and d_weight products. fused-linear (Liger): forward = product, one Triton kernel that reads
    each row twice (online max and sum, then the gradient) and writes the gradient over the logits, then the
    d_hidden and d_weight products, all in forward; backward only hands the gradients on.
    """
    ops = Ops()
    a, t, d, v = setup.act_bytes, setup.tokens, spec.hidden_size, spec.vocab_size
    full = method.base_trainable
    up = a + 4 if a < 4 else 0
    fused = setup.loss == "fused-linear"
    chunk = liger_chunk_tokens(t, d, v) if fused else min(setup.loss_chunk, t)
    grads = "forward" if fused else "backward"
    for c, n in chunks(t, chunk):
        group = Ops()
        group.gemm("output head", "forward", c, d, v, a)
        if fused:
            group.stream("loss: Liger's cross-entropy kernel", "forward", c * 3 * a * v)
        else:
            group.stream("loss: fp32 logits, log-sum-exp", "forward", c * (up + 16 * v), launches=5)
            group.gemm("output head (recomputed)", "backward", c, d, v, a)
            group.stream("loss: softmax gradient", "backward", c * (up + 16 * v + up), launches=6)
        group.gemm("output head dx", grads, c, v, d, a)
        if full:
            group.gemm("output head dW", grads, d, c, v, a)
        ops.ops.extend(times(op, n) for op in group.ops)
    return ops.ops


def optimizer_ops(case: Case) -> List[Op]:
    """The optimizer step over every trainable tensor, and Delta-LoRA's W update after it.

    What each optimizer's step reads and writes per parameter is its OPTIMIZERS row (torch's AdamW: foreach on
    CUDA, a loop per tensor on the CPU; torch/optim/adam.py)."""
    spec, method, rank, targets, setup = case.spec, case.method, case.rank, case.targets, case.setup
    ops = Ops()
    tensors = trainable_tensors(case)
    numel = sum(n * c for n, c in tensors)
    count = sum(c for _, c in tensors)
    p = FLOAT_BYTES.get(setup.dtype, 2) if method.base_trainable else FLOAT_BYTES[setup.adapter_dtype]
    master = setup.master_weights and p < 4
    s = 4 if master else p
    opt = OPTIMIZERS[setup.optimizer]
    per = opt.step_state_reads * s + opt.step_extra_bytes
    if master:  # fp32 master weights: the gradient read up, the weights written back down
        per += 2 * p + 4 + p
    # CUDA's foreach kernels take the tensors in lists (chunks of dozens per launch); the CPU loops per tensor
    lists = -(-count // 32) if setup.device == "cuda" and opt.foreach else count
    ops.stream("optimizer step", "optimizer", numel * per, launches=opt.launches * lists)
    if method.delta_update:
        # W += lambda s [B1 B0][A1; -A0] per adapted layer (lorabench.nn.delta): one addmm of inner 2r, in place
        a, shapes, moe = setup.act_bytes, spec.linear_shapes(), spec.moe_shapes()
        weights = [(n, 1, shapes[n][1], shapes[n][0], rank) for n in targets if n in shapes]
        if "router" in targets:
            weights.append(("router",) + moe["router"][:2] + (moe["router"][2], rank))
        if "experts" in targets:  # PEFT's ranks on fused experts: gate_up 2r, down r
            weights += [("experts " + k, e, o, i, r) for k, (e, o, i), r in
                        (("gate_up", moe["gate_up_proj"], 2 * rank), ("down", moe["down_proj"], rank))]
        for name, e, oo, ii, r in weights:
            for _ in range(spec.num_layers):
                ops.gemm(f"{name} W update", "optimizer", e * oo, 2 * r, ii, a)
                ops.stream(f"{name} W update", "optimizer", a * e * ii * oo, launches=8)
    return ops.ops
