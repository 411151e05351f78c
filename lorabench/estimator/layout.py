"""Every parameter tensor of a model as data parallelism sees it: which module group holds it (the root, or one
decoder layer), its dim 0, its dtype, whether it trains. Pure Python: no torch import.

FSDP2 (torch.distributed.fsdp.fully_shard) is applied to each decoder layer and then to the root, as in
torchtitan's `apply_fsdp` and the fully_shard docs: each layer is one group all-gathered and reduce-scattered
together; the root group holds what no layer does (embeddings, final norm, output head). Each parameter is
sharded on dim 0 (`Shard(0)`), so dim 0 decides the padding (lorabench.estimator.sharding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

from lorabench.estimator.case import Case
from lorabench.estimator.setup import FLOAT_BYTES, QUANTIZED, TrainingSetup
from lorabench.estimator.weights import quantized_linear_bytes
from lorabench.methods import Method
from lorabench.estimator.params import count_params
from lorabench.models.families import MOE_TARGETS
from lorabench.models.spec import ModelSpec


@dataclass(frozen=True)
class ParamTensor:
    """One tensor a module group holds.

    Attributes:
        name: what it is ("q.weight", "q.lora_A", "embed", "q.quant_state").
        dim0: its first dimension, the one FSDP shards.
        rest: the product of its other dimensions (elements per dim-0 row).
        elem_bytes: bytes per element as stored (a packed NF4 weight: 1 byte per two weights).
        trainable: it gets a gradient and optimizer state.
        adapter: an adapter's tensor (adapter_bytes), not the base model's (weights_bytes).
        sharded: a parameter, which FSDP shards; False for what FSDP replicates: buffers (VeRA's shared
            A and B) and bitsandbytes' quantization constants, held in each weight's quant state, not in a
            parameter.
    """

    name: str
    dim0: int
    rest: int
    elem_bytes: int
    trainable: bool
    adapter: bool = False
    sharded: bool = True

    @property
    def numel(self) -> int:
        return self.dim0 * self.rest

    @property
    def nbytes(self) -> int:
        return self.numel * self.elem_bytes


@dataclass(frozen=True)
class Layout:
    """A model's tensors in FSDP's groups: the root's, and one decoder layer's (num_layers alike)."""

    root: Tuple[ParamTensor, ...]
    layer: Tuple[ParamTensor, ...]
    num_layers: int

    def tensors(self):
        """(tensor, how many of it) for every tensor of the model."""
        return [(t, 1) for t in self.root] + [(t, self.num_layers) for t in self.layer]


def _base_layer(spec: ModelSpec, method: Method, setup: TrainingSetup):
    """One decoder layer's own parameters: projections [out, in] and biases [out], norms, q/k norms, a mixture
    of experts' router [E, d] and fused experts [E, 2I, d], [E, d, I] (transformers 5)."""
    quantized = setup.dtype in QUANTIZED
    other = (4 if setup.kbit_prepare else 2) if quantized else FLOAT_BYTES[setup.dtype]
    full = method.base_trainable
    out = []
    for name, (i, o, bias) in spec.linear_shapes().items():
        if setup.dtype == "nf4":
            # bitsandbytes' Params4bit: two 4-bit codes per byte, stored [ceil(numel / 2), 1] (quantize_4bit)
            packed = math.ceil(i * o / 2)
            out.append(ParamTensor(f"{name}.weight", packed, 1, 1, False))
            out.append(ParamTensor(f"{name}.quant_state", 1, quantized_linear_bytes("nf4", i, o) - packed, 1, False,
                                   sharded=False))
        elif setup.dtype == "int8":
            # Int8Params [out, in]; its fp32 row scales (SCB) are an attribute of the weight, not a parameter
            out.append(ParamTensor(f"{name}.weight", o, i, 1, False))
            out.append(ParamTensor(f"{name}.quant_state", 1, 4 * o, 1, False, sharded=False))
        else:
            out.append(ParamTensor(f"{name}.weight", o, i, other, full))
        if bias:
            out.append(ParamTensor(f"{name}.bias", o, 1, other, full))
    if spec.single_matrix:
        return out
    for name, (e, o, i) in spec.moe_shapes().items():
        out.append(ParamTensor(name, e, o * i, other, full))  # router: (1, E, d) -> [E, d]
    d = spec.hidden_size
    widths = [d] * spec.arch.norms_per_layer * (2 if spec.norm == "layernorm" else 1)
    if spec.arch.qk_norm == "head":
        widths += [spec.head_dim, spec.head_dim]
    elif spec.arch.qk_norm == "full":
        widths += [spec.q_dim, spec.kv_dim]
    out += [ParamTensor("norm", w, 1, other, full) for w in widths]
    return out


def _adapters(spec: ModelSpec, method: Method, rank: int, targets: Tuple[str, ...], setup: TrainingSetup):
    """One layer's adapter tensors as PEFT makes them: lora_A [r, in], lora_B [out, r], DoRA's magnitude [out],
    VeRA's lambda_d [r] and lambda_b [out]; on a mixture of experts' router and fused experts (ParamWrapper, as
    params.adapter_tensors) A [r E, in] and B [out, r E], gate_up at rank 2r."""
    ad, out = FLOAT_BYTES[setup.adapter_dtype], []
    for t in targets:
        if t in MOE_TARGETS:
            shapes = spec.moe_shapes()
            wrapped = [("router",) + shapes["router"] + (rank,)] if t == "router" else \
                [("gate_up",) + shapes["gate_up_proj"] + (2 * rank,), ("down",) + shapes["down_proj"] + (rank,)]
            for name, e, o, i, r in wrapped:
                out += [ParamTensor(f"{name}.lora_A", r * e, i, ad, method.trains_a, True),
                        ParamTensor(f"{name}.lora_B", o, r * e, ad, True, True)]
            continue
        i, o, _ = spec.linear_shapes()[t]
        if not method.adapter.shared_pair:  # (a shared pair is the root's: model_layout)
            out += [ParamTensor(f"{t}.lora_A", rank, i, ad, method.trains_a, True),
                    ParamTensor(f"{t}.lora_B", o, rank, ad, True, True)]
        out += [ParamTensor(f"{t}.{name}", n, 1, ad, True, True) for name, n in method.adapter.vectors(rank, o)]
    return out


def model_layout(case: Case) -> Layout:
    """Every tensor of method on spec in FSDP's groups. Their bytes add up to step_parts' weights_bytes and
    adapter_bytes, and their trainable elements to its trainable parameters (tests/test_sharding.py).

    Raises:
        LorabenchError: bad rank or targets (as count_params).
    """
    spec, method, rank, targets, setup = case.spec, case.method, case.rank, case.targets, case.setup
    setup = setup.for_spec(spec)
    counts = count_params(spec, method, rank, targets)
    layer = _base_layer(spec, method, setup)
    root = []
    if method.uses_rank:
        layer += _adapters(spec, method, rank, counts.targets, setup)
        if method.adapter.shared_pair:  # its shared A and B: buffers, on every GPU whole
            root.append(ParamTensor(f"{method.adapter.name}_shared", counts.shared_buffer_numel, 1,
                                    FLOAT_BYTES[setup.adapter_dtype], False, True, sharded=False))
    if not spec.single_matrix:
        other = (4 if setup.kbit_prepare else 2) if setup.dtype in QUANTIZED else FLOAT_BYTES[setup.dtype]
        full, d = method.base_trainable, spec.hidden_size
        root.append(ParamTensor("embed", spec.vocab_size, d, other, full))
        if spec.max_positions:
            root.append(ParamTensor("positions", spec.max_positions, d, other, full))
        root += [ParamTensor("final_norm", d, 1, other, full)] * (2 if spec.norm == "layernorm" else 1)
        if not spec.tie_embeddings:
            root.append(ParamTensor("lm_head", spec.vocab_size, d, other, full))
    return Layout(tuple(root), tuple(layer), spec.num_layers)
