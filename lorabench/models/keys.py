"""The config.json keys a family reads: one Key per setting, its sane range, and the check of a value.

Pure Python: no torch import. The families' tables of keys are in lorabench.models.families; reading a file
with them is lorabench.models.hfconfig.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Optional, Tuple

from lorabench.errors import LorabenchError

# Sane ranges for sizes. The largest published models are far inside them (Llama-3.1-405B: d=16384,
# 53248 MLP, 126 layers; Gemma-3: 262,208 vocab): the bounds only stop absurd inputs from becoming
# absurd numbers.
MAX_WIDTH = 1 << 20        # hidden size, head_dim
MAX_MLP = 1 << 22          # intermediate size
MAX_LAYERS = 10_000
MAX_HEADS = 1 << 16
MAX_VOCAB = 1 << 24
MAX_POSITIONS = 1 << 24


@dataclass(frozen=True)
class Key:
    """One config.json key a family reads.

    Attributes:
        name: the key, as the builder reads it.
        kind: "int" (an integer in [1, hi]), "bool" (a JSON boolean), "float" (a positive finite number),
            "ints" (a list of integers in [0, hi]) or "strs" (a list of strings).
        default: the value when the key is absent: transformers' config class default for the family (None:
            the builder derives it, as transformers does: head_dim = hidden_size / heads).
        hi: largest accepted integer.
        nullable: null is accepted (transformers' configs write `"head_dim": null`, "no soft-capping").
        aliases: other spellings transformers reads as the same setting (its config class's attribute_map:
            gpt2's hidden_size is n_embd; Qwen3-MoE saves num_experts as num_local_experts).
    """

    name: str
    kind: str = "int"
    default: object = None
    hi: int = MAX_WIDTH
    nullable: bool = False
    aliases: Tuple[str, ...] = ()


def int_key(name, default=None, hi=MAX_WIDTH, nullable=False, aliases=()) -> Key:
    return Key(name, "int", default, hi, nullable, aliases)


def bool_key(name, default=None) -> Key:
    return Key(name, "bool", default)


def float_key(name, default=None) -> Key:
    return Key(name, "float", default, nullable=True)


def list_key(name, kind, hi=MAX_LAYERS) -> Key:
    return Key(name, kind, hi=hi, nullable=True)


def shown(value) -> str:
    """value as an error message quotes it, cut to 40 characters."""
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_value(key: Key, value, where: str, name: Optional[str] = None):
    """value if it is what key allows; raises LorabenchError naming the file and the key (name: the spelling
    the file used, default key.name)."""
    key = replace(key, name=name) if name and name != key.name else key
    if value is None and key.nullable:
        return None
    if key.kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise LorabenchError(f"{where}: '{key.name}' must be a positive number or null, got {shown(value)}.")
        return float(value)
    if key.kind in ("ints", "strs"):
        item = (lambda x: isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= key.hi) \
            if key.kind == "ints" else (lambda x: isinstance(x, str))
        if not isinstance(value, list) or not all(item(x) for x in value):
            what = f"integers from 0 to {key.hi:,}" if key.kind == "ints" else "strings"
            raise LorabenchError(f"{where}: '{key.name}' must be a list of {what}, got {shown(value)}.")
        return value
    if key.kind == "bool":
        if not isinstance(value, bool):
            raise LorabenchError(f"{where}: '{key.name}' must be true or false (a JSON boolean), "
                                 f"got {shown(value)}.")
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        kind = ("not an integer" if not isinstance(value, float) else "a fraction" if not value.is_integer()
                else f"a float; write {int(value)}" if abs(value) < 1e15 else "a float")
        raise LorabenchError(f"{where}: '{key.name}' must be a positive integer, got {shown(value)} ({kind}).")
    if not 1 <= value <= key.hi:
        raise LorabenchError(f"{where}: '{key.name}' must be an integer from 1 to {key.hi:,}, got {shown(value)}.")
    return value
