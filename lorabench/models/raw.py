"""A model lorabench has no description of: its config.json as transformers reads it, answered by tracing the
real libraries (lorabench.measure.traced) rather than by the analytic model. Pure Python: no torch import.

A described family (lorabench.models.families) reads its config into a ModelSpec; any other model_type is kept as
a RawModel, whole, so that transformers builds exactly what the user's file says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

from lorabench.errors import LorabenchError

# The config keys that give a decoder's depth, in the order transformers' classes spell it.
DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


class Undescribed(LorabenchError):
    """A config.json whose model_type lorabench has no description of: the message is the analytic model's
    refusal; `config` is the parsed file, which the tracing engine can build instead."""

    def __init__(self, message: str, config: Mapping, where: str):
        super().__init__(message)
        self.config, self.where = config, where


@dataclass(frozen=True)
class RawModel:
    """A model known only by its config.json.

    Attributes:
        name: how answers name it (its folder, file or Hub id).
        config_json: the config, as canonical JSON text (sorted keys): hashable, and the cache's key.
        refusal: why the analytic model does not answer for it (Undescribed's message).
        notes: what every answer for it says.
    """

    name: str
    config_json: str
    refusal: str = ""
    notes: Tuple[str, ...] = field(default=())
    single_matrix: bool = False  # what answers read of a ModelSpec: never one d x d matrix

    @property
    def config(self) -> Dict:
        return json.loads(self.config_json)

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type"))

    @property
    def text_config(self) -> Dict:
        """The language model's config: text_config for a vision-language model, else the config itself."""
        cfg = self.config
        return cfg["text_config"] if isinstance(cfg.get("text_config"), dict) else cfg

    @property
    def num_layers(self) -> Optional[int]:
        """The decoder's depth as the file gives it (None: absent, transformers' default applies)."""
        text = self.text_config
        return next((text[k] for k in DEPTH_KEYS if isinstance(text.get(k), int)), None)

    def with_layers(self, num_layers: int) -> "RawModel":
        """The same model cut to num_layers decoder blocks (per-layer lists, layer_types, cut alike)."""
        cfg = self.config
        text = cfg["text_config"] if isinstance(cfg.get("text_config"), dict) else cfg
        key = next((k for k in DEPTH_KEYS if isinstance(text.get(k), int)), "num_hidden_layers")
        text[key] = num_layers
        if isinstance(text.get("layer_types"), list):
            text["layer_types"] = text["layer_types"][:num_layers]
        return RawModel(self.name, canonical(cfg), self.refusal, self.notes)


def canonical(cfg: Mapping) -> str:
    return json.dumps(cfg, sort_keys=True, separators=(",", ":"))


def raw_model(error: Undescribed, name: str) -> RawModel:
    return RawModel(name=name, config_json=canonical(error.config), refusal=str(error))


__all__ = ["DEPTH_KEYS", "Undescribed", "RawModel", "canonical", "raw_model"]
