"""The one registry of fine-tuning methods. Adding a variant means adding one entry here.

Each method is described along independent axes (as in PEFT's tuners): the adapter's structure,
what is trainable, and what the optimizer step does. Pure Python: no torch import.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Dict, Iterable, Tuple

from lorabench.errors import LorabenchError


@dataclass(frozen=True)
class Method:
    """One fine-tuning method.

    Attributes:
        name: the CLI name.
        adapter: structure added to each target layer: "none", "lora", "vera" or "dora".
        trains_a: the down-projection A is trained (False for LoRA-FA, whose A is frozen random).
        updates_base: W changes during training (full fine-tuning, Delta-LoRA).
        base_trainable: W gets gradients and optimizer state (full fine-tuning only).
        b_lr_ratio: learning rate of B over that of A (LoRA+), 1 otherwise.
        summary: one line for tables and --help.
        paper: where the method comes from.
    """

    name: str
    adapter: str
    trains_a: bool
    updates_base: bool
    base_trainable: bool
    summary: str
    paper: str
    b_lr_ratio: float = 1.0

    @property
    def uses_rank(self) -> bool:
        return self.adapter != "none"

    @property
    def allows_quantized_base(self) -> bool:
        # Full fine-tuning and Delta-LoRA write W, which a quantized base cannot hold.
        return not self.updates_base


METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("full", "none", False, True, True,
           "every weight trained", "baseline"),
    Method("lora", "lora", True, False, False,
           "h = Wx + (alpha/r) B A x, W frozen, B starts at zero", "Hu et al. 2021, arXiv:2106.09685"),
    Method("lora-fa", "lora", False, False, False,
           "LoRA with A frozen random: only B trained, x not kept for backward",
           "Zhang et al. 2023, arXiv:2308.03303"),
    Method("vera", "vera", False, False, False,
           "one frozen random A,B pair shared by all layers; per-layer vectors d (r) and b (out)",
           "Kopiczko et al. 2023, arXiv:2310.11454"),
    Method("delta-lora", "lora", True, True, False,
           "LoRA whose update delta also moves W: W += lambda (alpha/r)(A'B' - AB), no W gradient",
           "Zi et al. 2023, arXiv:2309.02411"),
    Method("lora-plus", "lora", True, False, False,
           "LoRA with B's learning rate = ratio x A's (16 by default)",
           "Hayou et al. 2024, arXiv:2402.12354", b_lr_ratio=16.0),
    Method("dora", "dora", True, False, False,
           "weight = m (W + sBA) / ||W + sBA||: magnitude vector plus LoRA direction",
           "Liu et al. 2024, arXiv:2402.09353"),
)}


# Names users type for an adapter on a quantized base (Dettmers et al. 2023): a method plus --dtype.
QUANTIZED_ALIASES = {"qlora": "LoRA on an nf4 base: --method lora --dtype nf4",
                     "qdora": "DoRA on an nf4 base: --method dora --dtype nf4"}


def get_method(name: str) -> Method:
    """The method called name.

    Raises:
        LorabenchError: unknown method; the message suggests near names.
    """
    key = name.strip().lower()
    if key in METHODS:
        return METHODS[key]
    if key in QUANTIZED_ALIASES:
        raise LorabenchError(f"'{name}' is not a method but {QUANTIZED_ALIASES[key]}; any adapter method runs "
                             "on a quantized base (lora, lora-fa, vera, lora-plus, dora).")
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
