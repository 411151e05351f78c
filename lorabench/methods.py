"""The one registry of fine-tuning methods. Adding a variant means adding one entry here (and, for an adapter
structure not yet in ADAPTERS, its row there and its module in lorabench.nn.adapters).

Each method is described along independent axes (as in PEFT's tuners): the adapter's structure (ADAPTERS),
what is trainable, what happens after the optimizer step, and the optimizer's parameter groups. The estimator,
the nn modules and the measured builders read these axes, never a method's name. Pure Python: no torch import.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Tuple

from lorabench.errors import LorabenchError
from lorabench.spelling import option


@dataclass(frozen=True)
class Adapter:
    """The structure an adapter adds to each target layer.

    Attributes:
        name: "none", "lora", "vera" or "dora" (the key of ADAPTERS and of lorabench.nn.adapters' modules).
        low_rank: adds a rank-r path B A (takes a rank); False: no adapter (full fine-tuning).
        shared_pair: A and B are one frozen random pair shared by every adapted layer (buffers [r, max in] and
            [max out, r], sliced per layer); each layer trains the vectors lambda_d [r] and lambda_b [out] that
            scale A x and B(...) instead (VeRA, Kopiczko et al. 2023).
        magnitude: a trained magnitude vector m [out] rescales W + s B A normalised per output row (DoRA,
            Liu et al. 2024).
        linear_modules_only: "all-linear" means the nn.Linear modules only, not a mixture of experts' router
            and fused experts (PEFT's VeRA has no conversion for them).
        moe_refusal: why it cannot adapt a mixture of experts' router and experts, or None where PEFT can
            (lora.ParamWrapper).
    """

    name: str
    low_rank: bool
    shared_pair: bool = False
    magnitude: bool = False
    linear_modules_only: bool = False
    moe_refusal: Optional[str] = None

    def vectors(self, rank: int, out_features: int) -> Tuple[Tuple[str, int], ...]:
        """(name, numel) of the trained vectors one adapted layer of out_features outputs holds."""
        return ((("lambda_d", rank), ("lambda_b", out_features)) if self.shared_pair else ()) + \
            ((("magnitude", out_features),) if self.magnitude else ())


ADAPTERS: Dict[str, Adapter] = {a.name: a for a in (
    Adapter("none", low_rank=False),
    Adapter("lora", low_rank=True),
    Adapter("vera", low_rank=True, shared_pair=True, linear_modules_only=True,
            moe_refusal="PEFT's VeRA adapts nn.Linear modules only (its all-linear leaves them out)."),
    Adapter("dora", low_rank=True, magnitude=True,
            moe_refusal="PEFT wraps them in lora.ParamWrapper, which does not work with use_dora=True; target the "
                        "attention (-t q,k,v,o) or use lora."),
)}


@dataclass(frozen=True)
class Method:
    """One fine-tuning method.

    Attributes:
        name: the CLI name (for display, row keys and messages only: nothing branches on it).
        adapter: the structure added to each target layer (ADAPTERS).
        summary: one line for tables and --help.
        paper: where the method comes from.
        trains_a: the down-projection A is trained (False for LoRA-FA, whose A is frozen random, and for a
            shared pair).
        base_trainable: W gets gradients and optimizer state (full fine-tuning only).
        delta_update: after each optimizer step W moves by lambda times the change of s B A (Delta-LoRA, Zi et
            al. 2023, eq. 7-8): W is written though it gets no gradient, a copy of A and B is kept for the
            change, and the low-rank path has no dropout, so that the change is the parameters' product alone.
        b_lr_ratio: learning rate of B over that of A in the optimizer's parameter groups (LoRA+), 1 otherwise.
    """

    name: str
    adapter: Adapter
    summary: str
    paper: str
    trains_a: bool = False
    base_trainable: bool = False
    delta_update: bool = False
    b_lr_ratio: float = 1.0

    def __post_init__(self) -> None:
        a = self.adapter
        if a.low_rank == self.base_trainable:
            raise ValueError(f"{self.name}: a method trains either W (no adapter) or an adapter.")
        if self.trains_a and a.shared_pair:
            raise ValueError(f"{self.name}: a shared pair's A is a frozen buffer.")
        if (self.delta_update or self.b_lr_ratio != 1.0) and (not a.low_rank or a.shared_pair):
            raise ValueError(f"{self.name}: Delta-LoRA's update and LoRA+'s ratio need per-layer A and B.")

    @property
    def uses_rank(self) -> bool:
        return self.adapter.low_rank

    @property
    def trains_b(self) -> bool:
        """B is a trained parameter (every low-rank structure but a shared pair)."""
        return self.adapter.low_rank and not self.adapter.shared_pair

    @property
    def updates_base(self) -> bool:
        """W changes during training (full fine-tuning, Delta-LoRA)."""
        return self.base_trainable or self.delta_update

    @property
    def applies_dropout(self) -> bool:
        """Adapter dropout is applied to the low-rank path's input (not under Delta-LoRA's update)."""
        return not self.delta_update

    @property
    def allows_quantized_base(self) -> bool:
        # Full fine-tuning and Delta-LoRA write W, which a quantized base cannot hold.
        return not self.updates_base


LORA, VERA, DORA, NONE = ADAPTERS["lora"], ADAPTERS["vera"], ADAPTERS["dora"], ADAPTERS["none"]
METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("full", NONE, "every weight trained", "baseline", base_trainable=True),
    Method("lora", LORA, "h = Wx + (alpha/r) B A x, W frozen, B starts at zero", "Hu et al. 2021, arXiv:2106.09685",
           trains_a=True),
    Method("lora-fa", LORA, "LoRA with A frozen random: only B trained, x not kept for backward",
           "Zhang et al. 2023, arXiv:2308.03303"),
    Method("vera", VERA, "one frozen random A,B pair shared by all layers; per-layer vectors d (r) and b (out)",
           "Kopiczko et al. 2023, arXiv:2310.11454"),
    Method("delta-lora", LORA,
           "LoRA whose update delta also moves W: W += lambda (alpha/r)(A'B' - AB), no W gradient",
           "Zi et al. 2023, arXiv:2309.02411", trains_a=True, delta_update=True),
    Method("lora-plus", LORA, "LoRA with B's learning rate = ratio x A's (16 by default)",
           "Hayou et al. 2024, arXiv:2402.12354", trains_a=True, b_lr_ratio=16.0),
    Method("dora", DORA, "weight = m (W + sBA) / ||W + sBA||: magnitude vector plus LoRA direction",
           "Liu et al. 2024, arXiv:2402.09353", trains_a=True),
)}


# Names users type for an adapter on a quantized base (Dettmers et al. 2023): a method plus --dtype.
# name: (what it is, the method, the base dtype)
QUANTIZED_ALIASES = {"qlora": ("LoRA on an nf4 base", "lora", "nf4"), "qdora": ("DoRA on an nf4 base", "dora", "nf4")}


def get_method(name: str) -> Method:
    """The method called name.

    Raises:
        LorabenchError: unknown method; the message suggests near names.
    """
    key = name.strip().lower()
    if key in METHODS:
        return METHODS[key]
    if key in QUANTIZED_ALIASES:
        what, method, dtype = QUANTIZED_ALIASES[key]
        raise LorabenchError(f"'{name}' is not a method but {what}: {option('method', method)} "
                             f"{option('dtype', dtype)}; any adapter method runs on a quantized base (lora, lora-fa, "
                             "vera, lora-plus, dora).")
    near = difflib.get_close_matches(key, METHODS, n=2, cutoff=0.5)
    hint = f" Did you mean {', '.join(near)}?" if near else ""
    raise LorabenchError(f"unknown method '{name}'.{hint} Choose from: {', '.join(METHODS)}, all.")


def resolve_methods(names: Iterable[str]) -> Tuple[Method, ...]:
    """Methods in the order asked, 'all' expanding to every registered method, duplicates dropped."""
    out: Dict[str, Method] = {}
    for name in names:
        for part in name.split(","):
            if part.strip().lower() == "all":
                out.update(METHODS)
            elif part.strip():
                method = get_method(part)
                out[method.name] = method
    if not out:
        raise LorabenchError("no method given.")
    return tuple(out.values())
