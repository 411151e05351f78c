"""The work of one training step, op by op: matrix products (FLOPs, and the dtype they run in) and the bytes
the memory-bound ops move. Pure Python; lorabench.estimator.compute turns it into time on a device.

Counted as eager PyTorch runs transformers + PEFT and lorabench.nn (no torch.compile): every elementwise op
reads its inputs and writes its output once, nothing is fused, and a matrix product reads both operands and
writes its result. Forward ops follow the family's modeling file and PEFT's layers; each op's backward is
written next to it (the gradient of an elementwise op reads the output gradient and what it saved, and writes
one gradient per input). `launches` are the eager ops an entry stands for: a CPU runs them one after another
and pays PyTorch's dispatch for each.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

from lorabench.estimator.loss import liger_chunk_tokens
from lorabench.estimator.optimizer import BNB_OPTIMIZERS, trainable_tensors
from lorabench.estimator.setup import FLOAT_BYTES, QUANTIZED, TrainingSetup
from lorabench.estimator.weights import quantized_linear_bytes
from lorabench.methods import Method
from lorabench.models.spec import ModelSpec

PHASES = ("forward", "backward", "optimizer")

# FlashAttention-2's backward runs 5 matrix products to the forward's 2 (it recomputes the scores): 2.5x the
# forward's FLOPs (Dao 2023, arXiv:2307.08691, sec. 3.1.2 and the FLOP count of sec. 4.1).
FLASH_BACKWARD = 2.5


@dataclass(frozen=True)
class Op:
    """One kind of kernel in a training step.

    Attributes:
        name: what it is, for the breakdown.
        phase: "forward", "backward" (checkpointing's recomputation included) or "optimizer".
        kind: "gemm" (a matrix product), "attention" (a fused attention kernel), "stream" (memory-bound) or
            "stall" (a measured time the device idles per run, on a GPU: see MOE_STALL_S).
        flops: FLOPs of one run.
        bytes: bytes read and written by one run.
        dtype_bytes: element size the product computes in: 2 (bf16/fp16 tensor cores) or 4 (fp32).
        runs: runs per step.
        launches: eager ops one run stands for.
        strided: one operand is read across strides (a transposed view), which streams at a fraction of the
            bandwidth.
    """

    name: str
    phase: str
    kind: str
    flops: float
    bytes: float
    dtype_bytes: int = 2
    runs: int = 1
    launches: int = 1
    strided: bool = False
    seconds: float = 0.0


class _Ops:
    """Collects ops for one phase pair (forward ops and their backward)."""

    def __init__(self) -> None:
        self.ops: List[Op] = []

    def stream(self, name: str, phase: str, nbytes: float, launches: int = 1, strided: bool = False) -> None:
        if nbytes > 0:
            self.ops.append(Op(name, phase, "stream", 0.0, float(nbytes), launches=launches, strided=strided))

    def gemm(self, name: str, phase: str, m: int, k: int, n: int, db: int) -> None:
        """[m, k] x [k, n] in elements of db bytes."""
        self.ops.append(Op(name, phase, "gemm", 2.0 * m * k * n, float(db * (m * k + k * n + m * n)), db))

    def stall(self, name: str, phase: str, seconds: float) -> None:
        if seconds > 0:
            self.ops.append(Op(name, phase, "stall", 0.0, 0.0, seconds=seconds))

    def attention(self, name: str, phase: str, flops: float, nbytes: float, db: int) -> None:
        self.ops.append(Op(name, phase, "attention", float(flops), float(nbytes), db))


def _norm_bytes(spec: ModelSpec, a: int) -> Tuple[int, int, int]:
    """(forward bytes per element, backward bytes per element, eager ops) of one norm.

    transformers' RMSNorms: x.float(), pow(2), mean, x * rsqrt, cast back, the weight's product (Llama order;
    OLMo 2 and Gemma multiply in float32 and cast after: the same traffic). LayerNorm is one fused kernel."""
    if spec.norm == "layernorm":
        return 2 * a, 4 * a, 1
    fwd = (a + 4) + 8 + 4 + 8 + (4 + a) + 2 * a if a < 4 else 8 + 4 + 8 + 2 * a
    return fwd, 2 * fwd, 6


def _linear(ops: _Ops, name: str, t: int, i: int, o: int, setup: TrainingSetup, method: Method,
            needs_dx: bool, stream_fed: bool = False) -> None:
    """A frozen or trainable base projection [t, i] -> [t, o]; a quantized one dequantizes its weight for every
    product (bitsandbytes' Linear4bit/Linear8bitLt in training: forward and input gradient). Under autocast
    the fp32 weight is cast for every forward (and a trainable one's gradient cast back up), and an input
    from the fp32 residual stream (stream_fed) is cast down, its gradient cast back up."""
    a = setup.act_bytes
    if setup.autocast:
        ops.stream(f"{name} weight cast", "forward", (4 + a) * i * o)
        if method.base_trainable:
            ops.stream(f"{name} dW cast", "backward", (a + 4) * i * o)
        if stream_fed:
            ops.stream(f"{name} x cast", "forward", t * (4 + a) * i)
            if needs_dx:
                ops.stream(f"{name} dx cast", "backward", t * (a + 4) * i)
    if setup.dtype in QUANTIZED:
        deq = quantized_linear_bytes(setup.dtype, i, o) + a * i * o
        ops.stream(f"{name} dequantize", "forward", deq)
        if needs_dx:
            ops.stream(f"{name} dequantize", "backward", deq)
        if setup.dtype == "int8":
            # LLM.int8(): x quantized row-wise (absmax, then int8 codes), the int32 result scaled back
            ops.stream(f"{name} int8 in/out", "forward", t * (2 * a + 1) * i + t * (4 + a) * o, launches=3)
    ops.gemm(name, "forward", t, i, o, a)
    if needs_dx:
        ops.gemm(f"{name} dx", "backward", t, o, i, a)
    if method.base_trainable:
        ops.gemm(f"{name} dW", "backward", i, t, o, a)


def _adapter(ops: _Ops, name: str, t: int, i: int, o: int, rank: int, setup: TrainingSetup, method: Method,
             needs_dx: bool, stream_fed: bool = False) -> None:
    """The adapter on one projection, as PEFT's layer (impl "peft") or lorabench.nn's (impl "lorabench") runs it.
    Under autocast its products run in the autocast dtype: x is cast for A (from the fp32 stream; PEFT's x
    from a product goes up to fp32 and back down) and the fp32 factors are cast per forward."""
    a, r = setup.act_bytes, rank
    peft = setup.impl == "peft"
    ad = FLOAT_BYTES[setup.adapter_dtype] if peft and not setup.autocast else a  # the adapter's products' dtype
    cast = ad != a
    if setup.autocast:
        store = FLOAT_BYTES[setup.adapter_dtype]
        casts = (1 if stream_fed else 0) + (2 if peft and not stream_fed and store != a else 0)
        ops.stream(f"{name} x cast", "forward", casts * t * (store + a) * i, launches=casts)
    if setup.dropout > 0 and method.applies_dropout:  # a dropped copy of x and its bool mask
        ops.stream(f"{name} dropout", "forward", t * (2 * ad + 1) * i)
        ops.stream(f"{name} dropout", "backward", t * (2 * ad + 1) * i)
    if peft and cast:  # _cast_input_dtype: each adapted layer its own copy of x, and the result cast back
        ops.stream(f"{name} x cast", "forward", t * (a + ad) * i)
        ops.stream(f"{name} out cast", "forward", t * (ad + a) * o)
        # backward: the output gradient cast up, and the base result's gradient cast back down
        ops.stream(f"{name} out cast", "backward", t * 2 * (a + ad) * o, launches=2)
        if needs_dx:
            ops.stream(f"{name} x cast", "backward", t * (ad + a) * i)
    if not peft or setup.autocast:  # the fp32 factors cast to x's dtype (by lorabench.nn, or autocast)
        ops.stream(f"{name} factor casts", "forward", (FLOAT_BYTES[setup.adapter_dtype] + a) * r * (i + o),
                   launches=2)
    if needs_dx:  # the adapter's input gradient joins the base layer's
        ops.stream(f"{name} dx sum", "backward", t * 3 * a * i)
    # the two products, A then B (VeRA: the shared frozen pair, sliced)
    ops.gemm(f"{name} A", "forward", t, i, r, ad)
    ops.gemm(f"{name} B", "forward", t, r, o, ad)
    ops.gemm(f"{name} B dx", "backward", t, o, r, ad)
    if needs_dx:
        ops.gemm(f"{name} A dx", "backward", t, r, i, ad)
    if method.adapter.shared_pair:
        # lambda_d * (A x) (r wide), lambda_b * (B ...) (out wide), added to the result; backward: the
        # vectors' gradients reduce over tokens
        ops.stream(f"{name} vectors", "forward", t * (3 * ad * r + 2 * ad * o + (a + 2 * ad) * o), launches=3)
        ops.stream(f"{name} vectors", "backward", t * (6 * ad * r + 5 * ad * o), launches=5)
        return
    if method.trains_b:
        ops.gemm(f"{name} dB", "backward", o, t, r, ad)
    if method.trains_a:
        ops.gemm(f"{name} dA", "backward", r, t, i, ad)
    if not peft:
        # scale on the r-wide projection, then base + delta (out wide); DoRA: g * y and m's gradient
        ops.stream(f"{name} scale, add", "forward", t * (2 * a * r + 3 * a * o), launches=2)
        ops.stream(f"{name} scale", "backward", t * 2 * a * r)
        if method.adapter.magnitude:
            ops.stream(f"{name} magnitude", "forward", t * 2 * a * o, launches=3)
            ops.stream(f"{name} magnitude", "backward", t * 4 * a * o, launches=3)
            # ||W + s B A|| per row under no_grad: one addmm (out x in, inner r) and the norm's read
            ops.gemm(f"{name} W + sBA", "forward", o, r, i, a)
            ops.stream(f"{name} weight norm", "forward", a * i * o, launches=2)
        return
    if not method.adapter.magnitude:
        # lora_B(lora_A(x)) * scaling, then result + that (in ad)
        ops.stream(f"{name} scale, add", "forward", t * (2 * ad + a + 2 * ad) * o, launches=2)
        ops.stream(f"{name} scale, add", "backward", t * 2 * ad * o)
        return
    # PEFT's DoraLinearLayer.forward: (m/||W + s lora_weight|| - 1) * base + m/||.|| * lora * s, added to the
    # result; backward: each product's two gradients, m's reduced over tokens, base's cast and summed.
    ops.stream(f"{name} dora combine", "forward", t * ((a + ad) + 2 * ad + 2 * ad + 3 * ad + (a + 2 * ad)) * o,
               launches=5)
    ops.stream(f"{name} dora combine", "backward", t * (14 * ad + 5 * a) * o, launches=10)
    # ... and the weight norm, per layer (not per token): lora_weight = B(A(eye(in))).T, W cast to x's dtype,
    # W + s * lora_weight (a transposed operand), the row norms.
    w = FLOAT_BYTES.get(setup.dtype, 2) if setup.dtype not in QUANTIZED else a
    ops.stream(f"{name} eye", "forward", ad * i * i)
    ops.gemm(f"{name} A(eye)", "forward", i, i, r, ad)
    ops.gemm(f"{name} B(A(eye))", "forward", i, r, o, ad)
    if setup.dtype in QUANTIZED:
        ops.stream(f"{name} dequantize for the norm", "forward", quantized_linear_bytes(setup.dtype, i, o) + a * i * o)
    if w != ad or setup.dtype in QUANTIZED:
        ops.stream(f"{name} W cast", "forward", (w + ad) * i * o)
    ops.stream(f"{name} W + s lora_weight", "forward", 5 * ad * i * o, launches=2, strided=True)
    ops.stream(f"{name} weight norm", "forward", ad * i * o)


def _attention(ops: _Ops, spec: ModelSpec, t: int, setup: TrainingSetup, sliding: bool, live: bool) -> None:
    """Rotary embedding, the attention kernel (SDPA's flash/efficient kernels, or transformers' eager path),
    and the merge of the heads."""
    a, s, h = setup.act_bytes, setup.seq_len, spec.num_heads
    qk = spec.q_dim + spec.kv_dim
    if not spec.max_positions:  # q * cos + rotate_half(q) * sin: 5 ops over q and k (OLMo 2: in float32)
        e = 4 if spec.arch.float32_rope else a
        rope = 10 * e + (2 * (a + 4) if spec.arch.float32_rope and a < 4 else 0)
        ops.stream("rotary", "forward", t * rope * qk, launches=7)
        if live:
            ops.stream("rotary", "backward", t * rope * qk, launches=7)
    keys = spec.attended_keys(s, sliding)
    if setup.attention == "sdpa":
        flops = 4.0 * t * keys * spec.q_dim  # QK^T and AV
        io = t * a * 2 * (spec.q_dim + spec.kv_dim)
        ops.attention("attention", "forward", flops, io, a)
        if live:
            ops.attention("attention", "backward", FLASH_BACKWARD * flops, 2 * io, a)
        if spec.arch.rope_copies:  # the output is [B, H, S, hd]: merging the heads copies it
            ops.stream("merge heads", "forward", t * 2 * a * spec.q_dim)
    else:
        # eager: repeat_kv copies, full s x s scores per head, (soft-cap), mask, fp32 softmax, cast, AV
        kv = spec.q_dim if spec.num_kv_heads != spec.num_heads else spec.kv_dim
        ops.stream("repeat_kv", "forward", t * 2 * a * (kv if kv != spec.kv_dim else 0), launches=2)
        ops.gemm("QK^T", "forward", t, spec.head_dim, h * s, a)
        ops.gemm("AV", "forward", t, h * s, spec.head_dim, a)
        per = h * s * (3 * a + (a + 4) + (4 + a) + (6 * a if spec.attn_softcap else 0))
        ops.stream("scores: mask, softmax", "forward", t * per, launches=4 + (3 if spec.attn_softcap else 0))
        ops.stream("merge heads", "forward", t * 2 * a * spec.q_dim)
        if live:
            for n in ("dQ", "dK"):
                ops.gemm(f"QK^T {n}", "backward", t, h * s, spec.head_dim, a)
            for n in ("dA", "dV"):
                ops.gemm(f"AV {n}", "backward", t, spec.head_dim, h * s, a)
            ops.stream("scores: mask, softmax", "backward", 2 * t * per, launches=6)


# Routing stalls of a mixture-of-experts layer on a GPU, measured rather than derived: the H100 probes
# (reports/probes/families_h100_{2,4}layers.jsonl: transformers 5.17 grouped_mm experts, torch 2.11) take longer
# per MoE layer than every kernel of the layer at its roofline, by a time that does not grow with the experts'
# FLOPs (Mixtral's are 9x Qwen3-MoE's): in forward about 1.25 ms plus 20 us per expert, in backward about 1.46 ms.
# Each is the median over the probes' cases of the per-layer excess, (4-layer - 2-layer time) / 2 less the same
# difference of the estimate without these stalls, fitted as a + b * experts
# (`python benchmarks/check_steptime.py --fit-moe` recomputes them; tests/test_steptime.py checks they agree).
# Nothing measured separates the grouped products' kernels from the routing's host work, so the stalls stand
# for both; a GPU idles by about as long whatever its speed, and a CPU (which pays every op's host time
# already) is not charged them.
MOE_STALL_S = {"forward": 1.25e-3, "forward_per_expert": 20e-6, "backward": 1.46e-3}


def _moe(ops: _Ops, spec: ModelSpec, method: Method, rank: Optional[int], targets: Tuple[str, ...], t: int,
         setup: TrainingSetup, live: bool) -> None:
    """transformers 5's grouped_mm experts: router, top-k, sort and gather of the routed copies, two grouped
    products, the gate, the routing weights and the sum back per token; the routing stalls (MOE_STALL_S).

    PEFT's ParamWrapper on the experts folds W + s B A into every expert's weight on each forward through a
    parametrization (peft/tuners/lora/layer.py, _LoraFactorsProxy: torch.baddbmm). Registering it evaluates it
    once to check its shape (torch/nn/utils/parametrize.py, ParametrizationList: `Z = self()` unless unsafe), and
    the forward evaluates it again: two folds per forward. Each out-of-place baddbmm first copies W into its
    result, then the product reads and rewrites it (ATen's CUDA addmm/baddbmm with beta != 0)."""
    a, d, e, k, i = setup.act_bytes, spec.hidden_size, spec.num_experts, spec.experts_per_token, \
        spec.expert_intermediate_size
    full = method.base_trainable
    routed = t * k
    w = 4 if not spec.arch.routing.cast_back else a  # Mixtral weighs each expert's output in float32
    ops.gemm("router", "forward", t, d, e, a)
    ops.stream("routing", "forward", t * (e * (a + 12) + 40 * k), launches=10)
    ops.stall("MoE routing stall", "forward", MOE_STALL_S["forward"] + e * MOE_STALL_S["forward_per_expert"])
    ops.stream("gather, weigh, sum", "forward", routed * (2 * a * d + (a + w + w) * d + 2 * w * d), launches=6)
    ops.stream("expert gate", "forward", routed * 5 * a * i, launches=2)
    merged = setup.impl == "peft" and method.uses_rank and "experts" in targets
    for name, m, kk, n in (("experts gate_up", routed, d, 2 * i), ("experts down", routed, i, d)):
        ops.gemm(name, "forward", m, kk, n, a)
        if live or full or merged:
            ops.gemm(f"{name} dx", "backward", m, n, kk, a)
        if full or merged:  # the (merged) weight's gradient
            ops.gemm(f"{name} dW", "backward", kk, m, n, a)
    if live or full or merged:
        ops.stream("gather, weigh, sum", "backward", routed * 2 * (2 * a * d + (a + w + w) * d), launches=8)
        ops.stream("expert gate", "backward", routed * 2 * 5 * a * i, launches=4)
        ops.stream("routing", "backward", t * e * 3 * (a + 4), launches=4)
        ops.stall("MoE routing stall", "backward", MOE_STALL_S["backward"])
    if merged:
        ad = FLOAT_BYTES[setup.adapter_dtype]
        for name, out, inn, r in (("gate_up", 2 * i, d, 2 * rank), ("down", d, i, rank)):
            size = e * out * inn
            for fold in ("check", "forward"):  # the registration's check, then the forward's own fold
                ops.stream(f"{name} factor casts ({fold})", "forward", (ad + a) * e * r * (inn + out), launches=2)
                ops.stream(f"merge {name}: copy W ({fold})", "forward", 2 * a * size)
                ops.gemm(f"merge {name} ({fold})", "forward", e * out, r, inn, a)  # baddbmm: W + s B A
                ops.stream(f"merge {name}: read C ({fold})", "forward", a * size)  # the product reads the copy
            # backward: the merged weight's gradient (written by grouped_mm's dW) feeds B's and A's
            ops.gemm(f"merge {name} dB", "backward", e * out, inn, r, a)
            ops.gemm(f"merge {name} dA", "backward", e * r, out, inn, a)


def _layer(spec: ModelSpec, method: Method, rank: Optional[int], targets: Tuple[str, ...], setup: TrainingSetup,
           first: bool, sliding: bool) -> List[Op]:
    """Forward and backward ops of one decoder layer. In the first layer of a frozen model nothing before the
    first trainable weight needs a gradient (autograd records no op there), as in layer_saves.layer_activation_bytes."""
    ops = _Ops()
    a, s, t, d, i = setup.act_bytes, setup.stream_bytes, setup.tokens, spec.hidden_size, spec.intermediate_size
    arch, full = spec.arch, method.base_trainable
    shapes = spec.linear_shapes()
    nf, nb, nl = _norm_bytes(spec, s)  # (the residual stream's dtype: fp32 under autocast)
    live = full or not first  # the layer's input needs a gradient

    def adapted(name: str) -> bool:
        return method.uses_rank and name in targets

    def norm(name: str, width: int, needs: bool) -> None:
        ops.stream(name, "forward", t * nf * width, launches=nl)
        if needs:
            ops.stream(name, "backward", t * nb * width, launches=2 * nl)

    def project(names, stream_fed: bool = False) -> None:
        for n in names:
            if n in shapes:
                ii, oo, _ = shapes[n]
                _linear(ops, n, t, ii, oo, setup, method, live, stream_fed)
                if adapted(n):
                    _adapter(ops, n, t, ii, oo, rank, setup, method, live, stream_fed)

    def residual() -> None:
        ops.stream("residual add", "forward", t * (2 * s + a) * d)

    pre, post = arch.norm_layout in ("pre", "sandwich"), arch.norm_layout in ("post", "sandwich")
    if pre:
        norm("attention norm", d, live)
    qkv = ("qkv",) if arch.fused_qkv else ("q", "k", "v")
    project(qkv, stream_fed=True)
    live = live or any(adapted(n) for n in qkv)
    if arch.sliced_qkv and live:  # each slice's gradient is a zeroed full-width tensor, then the three summed
        ops.stream("qkv slices", "backward", t * 10 * a * (spec.q_dim + 2 * spec.kv_dim), launches=8)
    if arch.qk_norm:
        norm("q/k norms", spec.q_dim + spec.kv_dim, live)
    _attention(ops, spec, t, setup, sliding, live)
    project(("o",))
    live = live or adapted("o")
    if post:
        norm("attention post-norm", d, live)
    residual()
    if pre:
        norm("MLP norm", d, live)
    if spec.moe:
        _moe(ops, spec, method, rank, targets, t, setup, live)
        live = live or full or any(adapted(n) for n in ("router", "experts"))
        if spec.shared_expert_gate:  # Qwen2-MoE's shared expert and its sigmoid gate
            project(("gate", "up", "shared_gate"), stream_fed=True)
            ops.stream("shared expert", "forward", t * (5 * a * i + 5 * a * d), launches=4)
            project(("down",))
    else:
        gate_up = ("gate_up",) if arch.fused_gate_up else ("gate", "up") if arch.gated_mlp else ("up",)
        project(gate_up, stream_fed=True)
        live = live or any(adapted(n) for n in gate_up)
        act = (2 + 3) * a * i if arch.gated_mlp else 2 * a * i  # act(g) (* u)
        ops.stream("activation", "forward", t * act, launches=2 if arch.gated_mlp else 1)
        if live:
            ops.stream("activation", "backward", t * 2 * act, launches=4 if arch.gated_mlp else 2)
            if arch.fused_gate_up:  # chunk's backward joins the two halves' gradients into one tensor
                ops.stream("gate_up chunk", "backward", t * 2 * a * 2 * i)
        project(("down",))
        live = live or adapted("down")
    if post:
        norm("MLP post-norm", d, live)
    residual()
    return ops.ops


def _outside_layers(spec: ModelSpec, method: Method, setup: TrainingSetup) -> List[Op]:
    """Embeddings, the final norm, the output head and transformers' causal-LM loss (fp32 logits, log_softmax,
    nll_loss; Gemma 2's logit soft-cap)."""
    ops = _Ops()
    a, s, t, d, v = setup.act_bytes, setup.stream_bytes, setup.tokens, spec.hidden_size, spec.vocab_size
    full = method.base_trainable
    p = FLOAT_BYTES.get(setup.dtype, 2)
    ops.stream("embedding", "forward", t * 2 * s * d + (t * 3 * s * d if spec.arch.embed_scale else 0))
    if spec.max_positions:
        ops.stream("positions", "forward", t * 3 * s * d)
    if full:  # a zeroed V x d gradient and the rows added into it
        ops.stream("embedding", "backward", p * v * d + t * 3 * s * d)
    nf, nb, nl = _norm_bytes(spec, s)
    ops.stream("final norm", "forward", t * nf * d, launches=nl)
    ops.stream("final norm", "backward", t * nb * d, launches=2 * nl)
    if setup.loss != "standard":
        ops.ops.extend(_chunked_head(spec, method, setup))
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


def _chunks(t: int, chunk: int) -> List[Tuple[int, int]]:
    """(tokens, how many) of the chunks t tokens split into: full chunks, then the rest."""
    return [(c, n) for c, n in ((chunk, t // chunk), (t % chunk, 1)) if c and n]


def _chunked_head(spec: ModelSpec, method: Method, setup: TrainingSetup) -> List[Op]:
    """The output head and loss without full logits, chunk by chunk (each chunk's products reread the head).

    chunked (lorabench.nn.loss): forward = product, fp32 copy, max, exp in place, sum; backward recomputes
    the product (one more output-head product), exp in place, the scatter and scale, the cast, then the
    d_hidden and d_weight products. fused-linear (Liger): forward = product, one Triton kernel that reads
    each row twice (online max and sum, then the gradient) and writes the gradient over the logits, then the
    d_hidden and d_weight products, all in forward; backward only hands the gradients on.
    """
    ops = _Ops()
    a, t, d, v = setup.act_bytes, setup.tokens, spec.hidden_size, spec.vocab_size
    full = method.base_trainable
    up = a + 4 if a < 4 else 0
    fused = setup.loss == "fused-linear"
    chunk = liger_chunk_tokens(t, d, v) if fused else min(setup.loss_chunk, t)
    grads = "forward" if fused else "backward"
    for c, n in _chunks(t, chunk):
        group = _Ops()
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
        ops.ops.extend(_times(op, n) for op in group.ops)
    return ops.ops


def _optimizer(spec: ModelSpec, method: Method, rank: Optional[int], targets: Tuple[str, ...],
               setup: TrainingSetup) -> List[Op]:
    """The optimizer step over every trainable tensor, and Delta-LoRA's W update after it.

    torch's AdamW (foreach on CUDA, a loop per tensor on the CPU; torch/optim/adam.py) with weight decay 0:
    lerp_(m, g), mul_(v), addcmul_(v, g, g), sqrt(v), div_, add_(eps), addcdiv_(p, m, denom): 19 elements
    read or written per parameter. SGD: add_; with momentum mul_, add_ and add_. bitsandbytes' 8-bit AdamW:
    one fused kernel reading and writing p and both 1-byte states, reading g."""
    ops = _Ops()
    tensors = trainable_tensors(spec, method, rank, targets)
    numel = sum(n * c for n, c in tensors)
    count = sum(c for _, c in tensors)
    p = FLOAT_BYTES.get(setup.dtype, 2) if method.base_trainable else FLOAT_BYTES[setup.adapter_dtype]
    master = setup.master_weights and p < 4
    s = 4 if master else p
    per, launches = {"adamw": (19 * s, 8), "sgd": (3 * s, 1), "sgd-momentum": (8 * s, 3),
                     "adamw-8bit": (3 * s + 4, 1), "paged-adamw-8bit": (3 * s + 4, 1),
                     "paged-adamw": (3 * s + 16, 1)}[setup.optimizer]
    if master:  # fp32 master weights: the gradient read up, the weights written back down
        per += 2 * p + 4 + p
    # CUDA's foreach kernels take the tensors in lists (chunks of dozens per launch); the CPU loops per tensor
    lists = -(-count // 32) if setup.device == "cuda" and setup.optimizer not in BNB_OPTIMIZERS else count
    ops.stream("optimizer step", "optimizer", numel * per, launches=launches * lists)
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


def step_ops(spec: ModelSpec, method: Method, rank: Optional[int], targets: Tuple[str, ...],
             setup: TrainingSetup) -> Tuple[Op, ...]:
    """Every op of one optimizer step of method on spec, with its runs per step: forward and backward once per
    micro-batch (setup.grad_accum), the optimizer once. Under gradient checkpointing each layer's forward runs
    again in backward (Chen et al. 2016)."""
    setup = setup.for_spec(spec)
    targets = targets if method.uses_rank else ()
    if spec.single_matrix:
        ops = _Ops()
        d, t = spec.hidden_size, setup.tokens
        for layer in range(spec.num_layers):
            _linear(ops, "w", t, d, d, setup, method, layer > 0 or method.base_trainable)
            if method.uses_rank:
                _adapter(ops, "w", t, d, d, rank, setup, method, layer > 0)
        return tuple(_times(op, setup.grad_accum) for op in ops.ops) + tuple(_optimizer(spec, method, rank,
                                                                                         targets, setup))
    L = spec.num_layers
    sliding = spec.sliding_layers()
    out: List[Op] = []
    # layer kinds: (first?, sliding?) -> how many; the first layer is sliding wherever any layer is
    kinds = {(True, sliding > 0): 1}
    for (first, slides), n in (((False, True), sliding - (1 if sliding else 0)),
                               ((False, False), L - 1 - max(sliding - 1, 0))):
        if n > 0:
            kinds[(first, slides)] = n
    for (first, slides), n in kinds.items():
        for op in _layer(spec, method, rank, targets, setup, first, slides):
            out.append(_times(op, n))
            if setup.grad_checkpointing and op.phase == "forward":
                out.append(_times(replace(op, name=f"recompute: {op.name}", phase="backward", runs=1), n))
    micro = [_times(op, setup.grad_accum) for op in out + _outside_layers(spec, method, setup)]
    return tuple(micro + _optimizer(spec, method, rank, targets, setup))


def _times(op: Op, n: int) -> Op:
    return replace(op, runs=op.runs * n)
