"""Activations one decoder layer saves for backward, op by op, per token. Pure Python: no torch import.

The activation model counts the tensors autograd saves for backward in a Hugging Face Llama/GPT-2 decoder layer
(and in lorabench.nn, which runs the same ops): which are kept depends on which weights are trainable, which is
what makes LoRA-FA and VeRA cheaper. Every formula names its source; "autograd" means PyTorch's derivatives.yaml
(what each op's backward saves), checked by measurement in `lorabench bench`.
"""

from __future__ import annotations

from typing import Optional, Tuple

from lorabench.estimator.batches import kv_cache_on, rows_of
from lorabench.estimator.case import Case
from lorabench.methods import Method
from lorabench.estimator.setup import FLOAT_BYTES, TrainingSetup
from lorabench.models.spec import ModelSpec


def _adapter_saves(method: Method, setup: TrainingSetup, rank: int, in_f: int, out_f: int,
                   dropout: float, x_bytes: Optional[int] = None, live: bool = True) -> Tuple[bool, int]:
    """(keeps the shared input x, other bytes per token) that one adapter saves for backward.

    LoRA: B's input z = A x (r) is kept for B's gradient; A's gradient needs x, unless A is frozen
    (LoRA-FA, Zhang et al. 2023 sec. 3: only the r-dim projection is kept). With dropout, A's input is the
    dropped copy of x (kept) and dropout keeps its bool mask (autograd: native_dropout saves the mask).
    DoRA: also the combined output W x + s B A x, which the magnitude's gradient needs.
    VeRA: d's gradient needs A x (r), b's needs B(d * A x) (out); A and B are frozen, so x is not kept.
    Dropout's mask is kept only when x needs a gradient (live): a bool per element on CUDA (native_dropout),
    and on the CPU, where torch's dropout is x * (bernoulli noise / (1 - p)), the noise in x's dtype.

    PEFT (impl="peft") casts x to the adapter dtype in every adapted layer (`_cast_input_dtype`) and
    computes the adapter there: when that dtype differs from x's, each layer keeps its own copy of x (ad
    in) instead of sharing x, and A x, B(...) are ad-wide. PEFT's DoRA (`DoraLinearLayer.forward`) keeps the
    base output (a out) and the low-rank output (ad out) apart. Under autocast every product runs in the
    autocast dtype: autocast casts x (x_bytes wide as it arrives) once more for A, a copy of its own unless
    x is already in that dtype and PEFT did not cast it to the fp32 adapters' dtype first.
    """
    a = setup.act_bytes
    xb = a if x_bytes is None else x_bytes
    peft = setup.impl == "peft"
    store = FLOAT_BYTES[setup.adapter_dtype]
    ad = a if setup.autocast or not peft else store  # the dtype the adapter's products run in
    own_copy = not xb == store == ad if peft else xb != ad  # x as A's product reads it is a copy of its own
    mask_bytes = 1 if setup.device == "cuda" else store if peft else xb  # (PEFT drops out its cast of x)
    mask = mask_bytes * in_f if dropout > 0 and live else 0
    keeps_own = method.trains_a and (dropout > 0 or own_copy)
    saved = mask + (ad * in_f if keeps_own else 0) + ad * rank
    if method.adapter.shared_pair:  # lambda_b's gradient needs its input B(lambda_d * A x)
        saved += ad * out_f
    if method.adapter.magnitude:
        # with dropout, PEFT's DoRA recomputes the base output from the dropped x in its own dtype
        # (F.linear(x, W.to(x.dtype)), dora.py): that product is the one kept, and W's copy with it
        base = ad if peft and dropout > 0 else a
        saved += base * out_f + (ad * out_f if peft else 0)
    return method.trains_a and not keeps_own, saved


def _autocast_casts(method: Method, setup: TrainingSetup, rank: int, in_f: int, out_f: int, adapted: bool,
                    live: bool) -> int:
    """Bytes of one layer's weights cast to the autocast dtype that outlive its forward. A product's
    backward needs its weight for the input's gradient, so the cast weight is kept whenever the input needs a
    gradient, frozen or not; autocast also caches every trainable leaf weight's cast until its context
    exits (torch/csrc/autograd/autocast_mode.cpp, cached_cast), so those last through forward anyway."""
    if not setup.autocast:
        return 0
    a = setup.act_bytes
    copies = a * in_f * out_f if live or method.base_trainable else 0
    if adapted and method.uses_rank:
        copies += a * rank * in_f if live or method.trains_a else 0  # A (VeRA: its slice of the shared A)
        copies += a * rank * out_f  # B: trainable (cached), or read by the trainable lambda_d's product
    return copies


def norm_saves(spec: ModelSpec, width: int, rows: int, a: int, weight_trainable: bool) -> int:
    """Bytes per token one norm over `width` keeps once its input needs a gradient (rows: norms per token,
    e.g. one per head for a per-head q norm).

    RMSNorm as transformers writes it (x.float(); pow(2).mean; x * rsqrt): the fp32 copy of x (4 width) and
    the rsqrt (4 per row). A trainable weight keeps its other factor: x * rsqrt cast back to x's dtype (a
    width) in Llama's order (weight * x.to(dtype)); in float32 (4 width) where the product is taken before
    the cast (OLMo 2's weight * x, Gemma's x * (1 + weight)). LayerNorm (native_layer_norm): its input (a
    width) plus fp32 mean and rstd (8).
    """
    if spec.norm == "layernorm":
        return a * width + 8 * rows
    weight = (a if spec.norm == "rmsnorm" else 4) * width if weight_trainable else 0
    return 4 * width + 4 * rows + weight


def _consumers_keep_input(names, spec, method, targets, setup, dropout, rank, live: bool = False,
                          x_bytes: Optional[int] = None) -> Tuple[bool, int, int]:
    """Whether the tensor fed to the projections `names` is kept, what they keep beyond it per token, and the
    bytes of their weights cast for backward per layer (autocast). live: the input needs a gradient, so a
    quantized base that keeps its input (setup.base_keeps_input) keeps it. x_bytes: the input's element size
    (the residual stream's, or a product's: setup.act_bytes)."""
    shapes = spec.linear_shapes()
    a = setup.act_bytes
    xb = a if x_bytes is None else x_bytes
    # a trainable W needs its input for the weight gradient: x itself, or where autocast casts x (x is not
    # in its dtype) each projection's own cast, as autocast caches no activation's cast
    needs = method.base_trainable or (setup.base_keeps_input and live)
    keep = needs and xb == a
    extra = casts = 0
    for n in names:
        if n not in shapes:
            continue
        i, o, _ = shapes[n]
        adapted = n in targets and method.uses_rank
        extra += a * i if needs and xb != a else 0
        casts += _autocast_casts(method, setup, rank, i, o, adapted, live)
        if adapted:
            if method.adapter.magnitude and setup.impl == "peft" and dropout > 0 and live:
                # PEFT's DoRA with dropout: W cast to the adapter's dtype (and by autocast to its own), kept by
                # the product that recomputes the base output (_adapter_saves)
                casts += (a if setup.autocast else FLOAT_BYTES[setup.adapter_dtype]) * i * o
            keeps_x, saved = _adapter_saves(method, setup, rank, i, o, dropout, xb, live)
            keep = keep or keeps_x
            extra += saved
    return keep, extra, casts


def _eager_attention_saves(spec: ModelSpec, a: int, seq_len: int) -> int:
    """Bytes per token transformers' eager_attention_forward keeps: q and k for QK^T, where k (and v) are
    repeat_kv copies at full query width under grouped-query attention; the tanh of soft-capped scores
    (Gemma 2); the fp32 softmax output and its cast to q's dtype for the AV product; v."""
    kv = spec.q_dim if spec.num_kv_heads != spec.num_heads else spec.kv_dim
    scores = spec.num_heads * seq_len
    return (a * (spec.q_dim + 2 * kv) + scores * (4 + (a if a < 4 else 0))
            + (a * scores if spec.attn_softcap else 0))


def _moe_saves(spec: ModelSpec, method: Method, targets: Tuple[str, ...], a: int, live: bool) -> int:
    """Bytes per token a mixture-of-experts block keeps, past its input, as transformers' default
    grouped_mm experts (transformers/integrations/moe.py) and the family's router run it.

    Router: the fp32 softmax over E experts, the top-k indices (int64) and, where the top-k weights are
    renormalised (Mixtral, Qwen3-MoE), those weights and their sum. Dispatch: the sort permutation, the
    token index and the inverse permutation (int64, k each). Experts, per routed token copy (k per token):
    the gate_up output (2I, kept whole: silu keeps the gate half, the product the up half), silu's output
    (I), the down output (d, for the routing weight's gradient) and the routing weight (fp32 for Mixtral).
    A trainable expert weight (full fine-tuning, or PEFT's ParamWrapper, whose merged weight requires a
    gradient) also keeps the gathered input (d) and the product (I). Qwen2-MoE's shared expert keeps its
    gate and up outputs and silu's (3 S), its output (d) and the sigmoid gate (1).
    Measured against the tracker for every family.
    """
    if not live:
        return 0
    e, k, i, d = spec.num_experts, spec.experts_per_token, spec.expert_intermediate_size, spec.hidden_size
    routing = spec.arch.routing
    renorm = routing.renormalize
    w = a if routing.cast_back else 4
    trains_experts = method.base_trainable or (method.uses_rank and "experts" in targets)
    saved = 4 * e + 8 * k + (4 * k + 4 if renorm else 0)
    saved += k * (24 + a * d + 3 * a * i + w + (a * (d + i) if trains_experts else 0))
    if spec.shared_expert_gate:  # (the product, down's input, is counted with down's consumers)
        saved += 3 * a * spec.intermediate_size + a * d + a
    return saved


def _trains(method: Method, targets: Tuple[str, ...], names) -> bool:
    """A weight of these projections gets a gradient."""
    return method.base_trainable or (method.uses_rank and any(n in targets for n in names))


def _held_input(setup: TrainingSetup, width: int, live: bool) -> int:
    """An int8 base's input on its autograd context (setup.base_keeps_input), once its input is recorded."""
    return setup.act_bytes * width if setup.base_keeps_input and live else 0


def _out_bytes(method: Method, targets: Tuple[str, ...], setup: TrainingSetup, names, x_bytes: int) -> int:
    """Element size of these projections' output: the product's dtype, except under autocast where an
    adapter multiplies its output by fp32 parameters cast to x's dtype (lorabench's VeRA lambda_b and
    DoRA scale) or casts its result to x's dtype (PEFT's VeRA): then x's."""
    adapted = method.uses_rank and any(n in targets for n in names)
    if adapted and (method.adapter.shared_pair or (method.adapter.magnitude and setup.impl == "lorabench")):
        return x_bytes
    return setup.act_bytes


def layer_activation_bytes(case: Case, input_needs_grad: bool = True) -> int:
    """Bytes per token one decoder layer saves for backward (no checkpointing); see layer_saves."""
    return layer_saves(case, input_needs_grad)[0]


def layer_saves(case: Case, input_needs_grad: bool = True) -> Tuple[int, int, int]:
    """(bytes per token, bytes per layer, graph-held bytes per token) one decoder layer saves for backward
    (no checkpointing). The per-layer bytes are weights cast for backward (_autocast_casts, PEFT's DoRA with
    dropout).

    The graph-held bytes, part of the first, are the inputs that int8 bases keep (setup.base_keeps_input):
    bitsandbytes' MatMul8bitFp (CPU) and MatMul8bitLt (CUDA) store the input on their autograd context
    (`ctx.A = A`, `ctx.tensors`), not through save_for_backward, so backward does not release it after use and
    gradient checkpointing does not drop it (its saved-tensor hooks see only saved tensors): it lives as long
    as the graph, until the loss that holds the graph dies. q, k and v read one tensor; a gated MLP's gate
    and up another. Measured on the CPU tracker: a LoRA step on an int8 tiny-llama frees exactly these bytes
    when the loss is deleted after backward, and none on an nf4 (MatMul4Bit keeps only the packed weight) or
    a bf16 base.

    input_needs_grad is False for the first layer when the embeddings are frozen. Autograd records an op
    only when something it reads needs a gradient, so until the first trainable weight in that layer
    (LoRA on down only: the whole attention block and the MLP up to down) nothing is kept. The family's
    structure (spec.arch) decides the rest: where the norms sit, q/k norms, fused projections, experts.
    """
    spec, method, rank, targets, setup = case.spec, case.method, case.rank, case.targets, case.setup
    setup = setup.for_spec(spec)
    a, s, d, i = setup.act_bytes, setup.stream_bytes, spec.hidden_size, spec.intermediate_size
    arch = spec.arch
    dropout = setup.dropout if method.applies_dropout else 0.0
    args = (spec, method, targets, setup, dropout, rank)
    full = method.base_trainable
    casts = 0  # weights cast for backward, per layer (_consumers_keep_input)
    if spec.single_matrix:
        keep, extra, c = _consumers_keep_input(("w",), *args, x_bytes=s)
        casts += c
        return (a * d if keep else 0) + extra, casts, 0
    pre, post = arch.norm_layout in ("pre", "sandwich"), arch.norm_layout in ("post", "sandwich")
    live = input_needs_grad  # the residual stream needs a gradient
    total = 0
    # Attention block: (pre-norm), q/k/v, (q/k norms), rotary (cos/sin shared by all layers), attention, o.
    total += norm_saves(spec, d, 1, s, full) if live and pre else 0
    qkv = ("qkv",) if arch.fused_qkv else ("q", "k", "v")
    keep, extra, c = _consumers_keep_input(qkv, *args, live=live, x_bytes=s)
    casts += c
    total += (s * d if keep else 0) + extra  # the norm's output (or the residual), shared by q, k and v
    held = _held_input(setup, d, live)
    if arch.qk_norm:
        head = arch.qk_norm == "head"
        if live or _trains(method, targets, ("q", "qkv")):
            total += norm_saves(spec, spec.q_dim, spec.num_heads if head else 1, a, full)
        if live or _trains(method, targets, ("k", "qkv")):
            total += norm_saves(spec, spec.kv_dim, spec.num_kv_heads if head else 1, a, full)
    live = live or _trains(method, targets, qkv)
    if live and setup.attention == "sdpa":
        # SDPA (flash / efficient kernels) keeps q, k, v, its output and fp32 logsumexp per head
        # (Dao 2023, FlashAttention-2 Alg. 2). With GQA, k and v stay at kv width (enable_gqa). (A fused
        # qkv's v is a slice of its output, but what SDPA keeps is a contiguous copy: measured.)
        total += a * (2 * spec.q_dim + 2 * spec.kv_dim) + 4 * spec.num_heads
        if arch.fused_qkv and arch.rope_copies and not kv_cache_on(setup):
            # v is a slice of qkv's output, so SDPA's v keeps the whole output alive, q's and k's widths
            # more than v (the rotation copied q and k). transformers' KV cache, on in a PEFT step without
            # checkpointing, hands SDPA its own copies of k and v instead.
            total += a * (spec.q_dim + spec.kv_dim)
    elif live:
        total += _eager_attention_saves(spec, a, rows_of(setup)[1])
    keep, extra, c = _consumers_keep_input(("o",), *args, live=live)
    casts += c
    held += _held_input(setup, spec.q_dim, live)
    # o's input: the heads merged. The fused SDPA kernels (CUDA flash/efficient, and the CPU flash kernel
    # for q made as view(B, S, H, hd).transpose(1, 2)) write their output as [B, S, H, hd], so
    # transpose(1, 2).contiguous() is free and o shares the tensor SDPA keeps; eager makes a copy, and so
    # does SDPA where the rotation wrote q anew in [B, H, S, hd] order (Phi-3).
    shared = live and setup.attention == "sdpa" and not arch.rope_copies
    total += (a * spec.q_dim if keep and not shared else 0) + extra
    live = live or _trains(method, targets, ("o",))
    total += norm_saves(spec, d, 1, s, full) if live and post else 0  # post-attention norm on o's output
    # MLP block.
    total += norm_saves(spec, d, 1, s, full) if live and pre else 0
    if spec.moe:
        router = ("router", "experts") + (("gate", "up", "shared_gate") if spec.shared_expert_gate else ())
        keep, extra, c = _consumers_keep_input(router, *args, live=live)
        casts += c
        keep = keep or method.uses_rank and "router" in targets  # PEFT's merged router weight needs x
        total += (a * d if keep else 0) + extra + _moe_saves(spec, method, targets, a, live)
        live = live or _trains(method, targets, router)
        if spec.shared_expert_gate:
            keep, extra, c = _consumers_keep_input(("down",), *args, live=live)
            casts += c
            total += (a * i if keep else 0) + extra
        total += norm_saves(spec, d, 1, s, full) if live and post else 0
        return total, casts, held
    if spec.gated_mlp:
        gate_up = ("gate_up",) if arch.fused_gate_up else ("gate", "up")
        keep, extra, c = _consumers_keep_input(gate_up, *args, live=live, x_bytes=s)
        casts += c
        held += _held_input(setup, d, live)
        total += (s * d if keep else 0) + extra
        # act(g) * u: the activation keeps g, the product keeps act(g) for u's gradient and u for g's.
        g_grad = live or _trains(method, targets, ("gate", "gate_up"))
        u_grad = live or _trains(method, targets, ("up", "gate_up"))
        gb = _out_bytes(method, targets, setup, ("gate", "gate_up"), s)
        ub = _out_bytes(method, targets, setup, ("up", "gate_up"), s)
        total += i * ((gb + ub if g_grad else 0) + (gb if u_grad else 0))
        live = g_grad or u_grad
        hb = max(gb, ub)  # the product's (type promotion)
    else:
        keep, extra, c = _consumers_keep_input(("up",), *args, live=live, x_bytes=s)
        casts += c
        held += _held_input(setup, d, live)
        total += (s * d if keep else 0) + extra
        live = live or _trains(method, targets, ("up",))
        hb = _out_bytes(method, targets, setup, ("up",), s)
        # gelu keeps its input; transformers' gelu_new, written out in Python, also keeps tanh's output, 0.5 x and
        # 1 + tanh (lorabench's layers run the fused op)
        written_out = 3 if spec.arch.activation == "gelu-new" and setup.impl == "peft" else 0
        total += hb * i * (1 + written_out) if live else 0
    keep, extra, c = _consumers_keep_input(("down",), *args, live=live, x_bytes=hb)
    casts += c
    held += _held_input(setup, i, live)
    total += (hb * i if keep else 0) + extra
    total += norm_saves(spec, d, 1, s, full) if live and post else 0  # post-feedforward norm on down's output
    return total, casts, held


def attention_records(case: Case, input_needs_grad: bool = True) -> bool:
    """The layer's attention kernel is recorded by autograd (keeps q, k, v): its input needs a gradient, or q, k or
    v trains (layer_saves)."""
    qkv = ("qkv",) if case.spec.arch.fused_qkv else ("q", "k", "v")
    return input_needs_grad or _trains(case.method, case.targets, qkv)


def merges_experts(method: Method, targets: Tuple[str, ...], setup: TrainingSetup) -> bool:
    """PEFT adapts the fused experts through lora.ParamWrapper, which merges W + s B A on every forward."""
    return setup.impl == "peft" and method.uses_rank and "experts" in targets
