"""The ops of a training step as the step-time model counts them (Op), and what collects them. Pure Python.

Counted as eager PyTorch runs transformers + PEFT and lorabench.nn (no torch.compile): every elementwise op
reads its inputs and writes its output once, nothing is fused, and a matrix product reads both operands and
writes its result. `launches` are the eager ops an entry stands for: a CPU runs them one after another and pays
PyTorch's dispatch for each.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Tuple

from lorabench.models.spec import ModelSpec


@dataclass(frozen=True)
class Op:
    """One kind of kernel in a training step.

    Attributes:
        name: what it is, for the breakdown.
        phase: "forward", "backward" (checkpointing's recomputation included) or "optimizer".
        kind: "gemm" (a matrix product), "attention" (a fused attention kernel), "stream" (memory-bound),
            "host" (a copy to or from host memory, at the host link's rate) or "stall" (a measured time the device
            idles per run, on a GPU: see MOE_STALL_S).
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


class Ops:
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

    def host(self, name: str, phase: str, nbytes: float) -> None:
        """A copy of nbytes between device and (pinned) host memory, at the host link's rate."""
        if nbytes > 0:
            self.ops.append(Op(name, phase, "host", 0.0, float(nbytes)))

    def attention(self, name: str, phase: str, flops: float, nbytes: float, db: int) -> None:
        self.ops.append(Op(name, phase, "attention", float(flops), float(nbytes), db))


def norm_bytes(spec: ModelSpec, a: int) -> Tuple[int, int, int]:
    """(forward bytes per element, backward bytes per element, eager ops) of one norm.

    transformers' RMSNorms: x.float(), pow(2), mean, x * rsqrt, cast back, the weight's product (Llama order;
    OLMo 2 and Gemma multiply in float32 and cast after: the same traffic). LayerNorm is one fused kernel."""
    if spec.norm == "layernorm":
        return 2 * a, 4 * a, 1
    fwd = (a + 4) + 8 + 4 + 8 + (4 + a) + 2 * a if a < 4 else 8 + 4 + 8 + 2 * a
    return fwd, 2 * fwd, 6


def times(op: Op, n: int) -> Op:
    return replace(op, runs=op.runs * n)
