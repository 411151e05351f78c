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

from dataclasses import replace
from typing import List, Optional, Tuple

from lorabench.estimator.batches import keys_attended, mask_saves, repeat_kv_bytes, rows_of
from lorabench.estimator.case import Case
from lorabench.estimator.ops import Op, Ops, norm_bytes, times
from lorabench.estimator.outer_ops import optimizer_ops, outside_layers
from lorabench.estimator.projection_ops import adapter_ops, linear_ops
from lorabench.estimator.setup import FLOAT_BYTES, TrainingSetup
from lorabench.methods import Method
from lorabench.models.spec import ModelSpec

# FlashAttention-2's backward runs 5 matrix products to the forward's 2 (it recomputes the scores): 2.5x the
# forward's FLOPs (Dao 2023, arXiv:2307.08691, sec. 3.1.2 and the FLOP count of sec. 4.1).
FLASH_BACKWARD = 2.5

def _attention(ops: Ops, spec: ModelSpec, t: int, setup: TrainingSetup, sliding: bool, live: bool) -> None:
    """Rotary embedding, the attention kernel (SDPA's flash/efficient kernels, or transformers' eager path),
    and the merge of the heads."""
    a, s, h = setup.act_bytes, rows_of(setup)[1], spec.num_heads
    qk = spec.q_dim + spec.kv_dim
    if not spec.max_positions:  # q * cos + rotate_half(q) * sin: 5 ops over q and k (OLMo 2: in float32)
        e = 4 if spec.arch.float32_rope else a
        rope = 10 * e + (2 * (a + 4) if spec.arch.float32_rope and a < 4 else 0)
        ops.stream("rotary", "forward", t * rope * qk, launches=7)
        if live:
            ops.stream("rotary", "backward", t * rope * qk, launches=7)
    keys = keys_attended(spec, setup, sliding)
    if setup.attention == "sdpa":
        flops = 4.0 * t * keys * spec.q_dim  # QK^T and AV
        io = t * a * 2 * (spec.q_dim + spec.kv_dim)
        mask = mask_saves(spec, setup, sliding)  # per token: the additive mask, and repeat_kv's copies
        if mask:
            repeat = repeat_kv_bytes(spec, setup)
            # torch's where() turns the bool mask into the additive one (reads 1 byte, writes a); the copies
            ops.stream("attention mask", "forward", t * (mask - repeat) * (1 + a) // a)
            if repeat:
                ops.stream("repeat_kv", "forward", t * 2 * repeat, launches=2)
            io += t * mask  # the kernel reads the mask and the wider k and v
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


def _moe(ops: Ops, spec: ModelSpec, method: Method, rank: Optional[int], targets: Tuple[str, ...], t: int,
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


def _layer(case: Case, first: bool, sliding: bool) -> List[Op]:
    """Forward and backward ops of one decoder layer. In the first layer of a frozen model nothing before the
    first trainable weight needs a gradient (autograd records no op there), as in layer_saves.layer_activation_bytes."""
    spec, method, rank, targets, setup = case.spec, case.method, case.rank, case.targets, case.setup
    ops = Ops()
    a, s, t, d, i = setup.act_bytes, setup.stream_bytes, setup.tokens, spec.hidden_size, spec.intermediate_size
    arch, full = spec.arch, method.base_trainable
    shapes = spec.linear_shapes()
    nf, nb, nl = norm_bytes(spec, s)  # (the residual stream's dtype: fp32 under autocast)
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
                linear_ops(ops, n, t, ii, oo, setup, method, live, stream_fed)
                if adapted(n):
                    adapter_ops(ops, n, t, ii, oo, rank, setup, method, live, stream_fed)

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


def step_ops(case: Case) -> Tuple[Op, ...]:
    """Every op of one optimizer step of method on spec, with its runs per step: forward and backward once per
    micro-batch (setup.grad_accum), the optimizer once. Under gradient checkpointing each layer's forward runs
    again in backward (Chen et al. 2016)."""
    spec, method, rank, targets, setup = case.spec, case.method, case.rank, case.targets, case.setup
    setup = setup.for_spec(spec)
    targets = targets if method.uses_rank else ()
    case = replace(case, targets=targets, setup=setup)  # what _layer and optimizer_ops read
    if spec.single_matrix:
        ops = Ops()
        d, t = spec.hidden_size, setup.tokens
        for layer in range(spec.num_layers):
            linear_ops(ops, "w", t, d, d, setup, method, layer > 0 or method.base_trainable)
            if method.uses_rank:
                adapter_ops(ops, "w", t, d, d, rank, setup, method, layer > 0)
        return tuple(times(op, setup.grad_accum) for op in ops.ops) + tuple(optimizer_ops(case))
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
        for op in _layer(case, first, slides):
            out.append(times(op, n))
            if setup.grad_checkpointing and op.phase == "forward":
                out.append(times(replace(op, name=f"recompute: {op.name}", phase="backward", runs=1), n))
    if setup.offload == "checkpoints":  # each layer's input to host memory in forward, and back in backward
        offload = Ops()
        moved = setup.tokens * setup.stream_bytes * spec.hidden_size
        offload.host("layer input to host", "forward", moved)
        offload.host("layer input from host", "backward", moved)
        out += [times(op, L) for op in offload.ops]
    micro = [times(op, setup.grad_accum) for op in out + outside_layers(spec, method, setup)]
    return tuple(micro + optimizer_ops(case))
