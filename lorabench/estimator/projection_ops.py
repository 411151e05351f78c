"""The ops of one projection in a step: the base layer (float or quantized, under autocast or not) and the
adapter on it, as PEFT's layers and lorabench.nn's run them. Pure Python.
"""

from __future__ import annotations

from lorabench.estimator.ops import Ops
from lorabench.estimator.setup import FLOAT_BYTES, QUANTIZED, TrainingSetup
from lorabench.estimator.weights import quantized_linear_bytes
from lorabench.methods import Method


def linear_ops(ops: Ops, name: str, t: int, i: int, o: int, setup: TrainingSetup, method: Method,
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


def adapter_ops(ops: Ops, name: str, t: int, i: int, o: int, rank: int, setup: TrainingSetup, method: Method,
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
