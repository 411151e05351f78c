"""Hugging Face config.json: read strictly, validate against one schema per family, build a ModelSpec.

Everything a config.json can get wrong is refused here, in one line that names the file and the key:
a file that is not a regular file or is larger than a config ever is, nesting deeper than a config
ever has, JSON's non-standard NaN/Infinity, duplicate keys, wrong types (a boolean must be a JSON
boolean, a size an integer, never 4096.5 or "4096"), sizes outside a sane range, and two spellings of one
key that disagree. Otherwise a config.json reads as transformers reads it: every spelling its config class
accepts, and its defaults for absent keys. A family is one row of lorabench.models.families.FAMILIES: the
keys it reads, and fields that say how the spec is built from them. Pure Python: no torch import.
"""

from __future__ import annotations

import json
import math
import os
import stat
import sys
from typing import Dict, Optional, Tuple, Union

from lorabench.errors import LorabenchError
from lorabench.spelling import option
from lorabench.models.families import FAMILIES, MULTIMODAL, Family
from lorabench.models.keys import check_value, shown
from lorabench.models.raw import RawModel, Undescribed, raw_model
from lorabench.models.spec import ModelSpec

# A real config.json is a few KB (Llama-3-8B: 0.7 KB; the largest multimodal ones ~10 KB).
MAX_CONFIG_BYTES = 1 << 20
# Real configs nest 3-4 levels (text_config.rope_scaling...); 64 also keeps json clear of recursion limits.
MAX_DEPTH = 64

class _Values(dict):
    """A config's values by the table's key names, and the spelling the file used for each (None: absent, so
    transformers' default), for messages that name what the file says."""

    def __init__(self):
        super().__init__()
        self.written: Dict[str, Optional[str]] = {}

    def said(self, name: str, value) -> str:
        written = self.written.get(name, name)
        return f"'{written}' {value}" if written else f"'{name}' {value} (absent: transformers' default)"


def _attention(v: _Values, where: str) -> Tuple[int, int, int]:
    """(heads, kv_heads, head_dim) of a llama-style config, checked for consistency."""
    d, heads = v["hidden_size"], v["num_attention_heads"]
    kv = v.get("num_key_value_heads") or heads
    if kv > heads or heads % kv:
        raise LorabenchError(f"{where}: {v.said('num_attention_heads', heads)} is not a multiple of "
                             f"{v.said('num_key_value_heads', kv)}.")
    head_dim = v.get("head_dim")
    if head_dim is None:
        if d % heads:
            raise LorabenchError(f"{where}: {v.said('hidden_size', d)} is not divisible by "
                                 f"{v.said('num_attention_heads', heads)} (and no 'head_dim' is given).")
        head_dim = d // heads
    return heads, kv, head_dim


# transformers 5 reads a legacy layer type under its new name (configuration_utils._LEGACY_LAYER_TYPE_REMAP).
LEGACY_LAYER_TYPES = {"attention": "full_attention"}


def _sliding_pattern(v: _Values, where: str, family: Family) -> int:
    """A sliding-window layout as "every Nth layer is global": from layer_types (transformers 5) or
    sliding_window_pattern (older Gemma 3 configs), else the family's default (Gemma 2 alternates: N = 2;
    Gemma3TextConfig reads the older sliding_window_pattern, default 6)."""
    types = [LEGACY_LAYER_TYPES.get(t, t) for t in v.get("layer_types") or ()]
    if types:
        sliding = [t == "sliding_attention" for t in types]
        if not all(t in ("sliding_attention", "full_attention") for t in types):
            raise LorabenchError(f"{where}: 'layer_types' holds a type other than sliding_attention and "
                                 "full_attention.")
        if all(sliding):
            return 1
        n = sliding.index(False) + 1
        if any(s != bool((i + 1) % n) for i, s in enumerate(sliding)):
            raise LorabenchError(f"{where}: 'layer_types' is not a repeating pattern of sliding layers and one "
                                 "global layer; lorabench models only that layout.")
        return n
    return v.get("sliding_window_pattern") or family.global_every


def _experts(v: _Values, where: str, family: Family) -> Dict:
    """A mixture of experts' fields. Refuses layouts with dense layers among the sparse ones (no published Qwen
    MoE has them)."""
    if v.get("decoder_sparse_step", 1) != 1 or v.get("mlp_only_layers"):
        raise LorabenchError(f"{where}: dense layers among the experts ('decoder_sparse_step' other than 1 or "
                             "a non-empty 'mlp_only_layers') are not modelled.")
    experts, top_k = v["num_experts"], v["num_experts_per_tok"]
    if top_k > experts:
        raise LorabenchError(f"{where}: {v.said('num_experts_per_tok', top_k)} is more than "
                             f"{v.said('num_experts', experts)} (the experts per layer).")
    shared = v.get("shared_expert_intermediate_size", 0)  # Qwen2-MoE's always-on expert
    return dict(intermediate_size=shared, num_experts=experts, experts_per_token=top_k,
                expert_intermediate_size=v[family.expert_width_key], shared_expert_gate=bool(shared))


def _read_decoder(v: _Values, where: str, family: Family) -> Dict:
    """A llama-style config's spec fields. Only the keys the family reads are present: the others read as
    absent (no bias, no soft-capping, no sliding window)."""
    heads, kv, head_dim = _attention(v, where)
    # transformers: Qwen2 always has q/k/v biases and no o bias; llama's attention_bias puts one on all four
    # (so do Qwen3's, OLMo 2's, Gemma's and Qwen3-MoE's); Qwen2-MoE's qkv_bias is its own key; Phi-3 has none.
    bias = v.get("attention_bias", False)
    fields = dict(hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                  num_layers=v["num_hidden_layers"], num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
                  vocab_size=v["vocab_size"], tie_embeddings=v["tie_word_embeddings"],
                  qkv_bias=family.qkv_bias or v.get("qkv_bias", bias), o_bias=bias, mlp_bias=v.get("mlp_bias", False),
                  attn_softcap=v.get("attn_logit_softcapping") or 0.0,
                  final_softcap=v.get("final_logit_softcapping") or 0.0,
                  sliding_window=v.get("sliding_window") or 0,
                  sliding_pattern=_sliding_pattern(v, where, family) if v.get("sliding_window") else 0,
                  query_pre_attn_scalar=v.get("query_pre_attn_scalar", 0))
    if family.arch.moe:
        fields.update(_experts(v, where, family))
    return fields


def _read_gpt2(v: _Values, where: str, family: Family) -> Dict:
    """gpt2's config: n_embd, n_head, n_layer, n_inner (default 4 n_embd), n_positions; every projection biased."""
    d, heads = v["n_embd"], v["n_head"]
    if d % heads:
        raise LorabenchError(f"{where}: {v.said('n_embd', d)} is not divisible by {v.said('n_head', heads)}.")
    return dict(hidden_size=d, intermediate_size=v["n_inner"] or 4 * d, num_layers=v["n_layer"], num_heads=heads,
                num_kv_heads=heads, head_dim=d // heads, vocab_size=v["vocab_size"],
                tie_embeddings=v["tie_word_embeddings"], qkv_bias=True, o_bias=True, mlp_bias=True,
                max_positions=v["n_positions"])


# A family's layout (Family.layout) -> the spec fields its config.json gives.
READERS = {"decoder": _read_decoder, "gpt2": _read_gpt2}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def from_hf_config(cfg, name: str = "config.json", where: Optional[str] = None) -> ModelSpec:
    """A spec from the contents of a Hugging Face config.json.

    Args:
        cfg: the parsed JSON.
        name: the spec's name.
        where: how errors name the file (default: name).

    Raises:
        LorabenchError: not an object, an unsupported model_type, a mistyped or out-of-range key, or two
            spellings of one key that disagree. An absent key takes transformers' default for the family.
    """
    where = where or name
    if not isinstance(cfg, dict):
        raise LorabenchError(f"{where}: expected a JSON object, got {type(cfg).__name__ if cfg is not None else 'null'}.")
    model_type = cfg.get("model_type")
    notes: Tuple[str, ...] = ()
    if isinstance(model_type, str) and model_type in MULTIMODAL:
        # A vision-language checkpoint (Gemma 3 4B and up): its language model is text_config, which
        # transformers builds from its class's defaults when absent or null.
        multimodal = MULTIMODAL[model_type]
        text = cfg.get("text_config")
        if text is not None and not isinstance(text, dict):
            raise LorabenchError(f"{where}: 'text_config' must be an object (the language model's config) or "
                                 f"null, got {shown(text)}.")
        cfg = {**(text or {}), **{k.name: cfg.get(k.name, k.default) for k in multimodal.top},
               "model_type": multimodal.text}
        notes = (f"{model_type} is a vision-language model: the language model (text_config) is counted; the "
                 "vision tower and its projector are not, and training them is not modelled.",)
        model_type = multimodal.text
    if model_type is None:
        raise LorabenchError(f"{where}: 'model_type' is missing (supported: {', '.join(SUPPORTED_MODEL_TYPES)}).")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        message = (f"{where}: model_type {shown(model_type)} is not supported "
                   f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)}).")
        if isinstance(model_type, str) and model_type:  # transformers may build it: the tracing engine can
            raise Undescribed(message, cfg, where)
        raise LorabenchError(message)
    family = FAMILIES[model_type]
    values = _Values()
    for key in family.keys:
        written = [n for n in (key.name,) + key.aliases if n in cfg]
        if not written:
            values[key.name], values.written[key.name] = key.default, None
            continue
        first, value = written[0], check_value(key, cfg[written[0]], where, written[0])
        for other in written[1:]:
            if check_value(key, cfg[other], where, other) != value:
                raise LorabenchError(f"{where}: '{first}' {shown(value)} and '{other}' {shown(cfg[other])} "
                                     "disagree; transformers reads both as one setting.")
        values[key.name], values.written[key.name] = value, first
    return ModelSpec(name=name, family=model_type, notes=notes, **READERS[family.layout](values, where, family))


# --------------------------------------------------------------------------------------------------
# Reading the file.


def _max_depth(text: str) -> int:
    """Deepest nesting of [ and { outside strings; stops counting once past MAX_DEPTH."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_DEPTH:
                    return deepest
        elif ch in "]}":
            depth -= 1
    return deepest


def _reject_constant(token: str):
    raise ValueError(f"{token}: JSON has no NaN or Infinity")


def _finite_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise ValueError(f"{token[:20]} overflows a float")
    return value


def _unique_keys(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key '{key[:40]}' appears twice")
        out[key] = value
    return out


def parse_json(text: str, where: str):
    """Strict JSON: no NaN/Infinity, no duplicate keys, no float overflow, nesting capped.

    Raises:
        LorabenchError: anything else, in one line naming where.
    """
    if _max_depth(text) > MAX_DEPTH:
        raise LorabenchError(f"{where}: nested more than {MAX_DEPTH} levels deep; not a config.json.")
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                          object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise LorabenchError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}).") from None
    except ValueError as exc:  # ours above, and int() past Python's digit limit
        msg = str(exc).split(";")[0].split("\n")[0][:120]
        raise LorabenchError(f"{where}: not valid JSON ({msg}).") from None


def config_json_path(path: str) -> str:
    """The file a --config names: path itself, or the config.json in it when it is a folder."""
    return os.path.join(path, "config.json") if os.path.isdir(path) else path


def read_config_text(path: str) -> Tuple[str, str]:
    """(text, file) of a config.json given as a file or a folder holding one, size-capped.

    Raises:
        LorabenchError: empty path, missing, not a regular file, unreadable, too large or not UTF-8.
    """
    if not path or not path.strip():
        raise LorabenchError(f"{option('config')} is empty; give a config.json or a folder holding one.")
    try:
        path.encode(sys.getfilesystemencoding(), "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate no file name decodes to: os.stat raises ValueError on it
        raise LorabenchError(f"no config.json at '{printable_path(path)}' (no file can have that name).") from None
    file = config_json_path(path)
    try:
        st = os.stat(file)
    except FileNotFoundError:
        raise LorabenchError(f"no config.json at '{printable_path(path)}'.") from None
    except OSError as exc:
        raise LorabenchError(f"cannot read '{printable_path(file)}': {exc.strerror}.") from None
    # FIFOs are allowed (--config <(...)); devices (/dev/zero) and sockets are not.
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
        raise LorabenchError(f"'{printable_path(file)}' is not a regular file.")
    if st.st_size > MAX_CONFIG_BYTES:
        raise LorabenchError(f"'{printable_path(file)}' is {st.st_size:,} bytes; a config.json is at most "
                             f"{MAX_CONFIG_BYTES:,} (they are a few KB).")
    try:
        with open(file, "rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise LorabenchError(f"cannot read '{printable_path(file)}': {exc.strerror}.") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise LorabenchError(f"'{printable_path(file)}' is larger than {MAX_CONFIG_BYTES:,} bytes; a config.json "
                             "is a few KB.")
    try:
        return data.decode("utf-8-sig"), file
    except UnicodeDecodeError as exc:
        raise LorabenchError(f"'{printable_path(file)}' is not UTF-8 text (byte {exc.start}).") from None


def load_config(path: str, where: Optional[str] = None, traceable: bool = False) -> Union[ModelSpec, RawModel]:
    """Read a config.json (or a folder holding one) offline; the spec is named after its folder.

    Args:
        where: how errors about its contents name it (default: the file's path).
        traceable: a model_type without a description comes back as a RawModel (for the tracing engine)
            instead of raising.

    Raises:
        LorabenchError: see read_config_text, parse_json and from_hf_config.
    """
    text, file = read_config_text(path)
    where = where or printable_path(file)
    cfg = parse_json(text, where)
    base = os.path.basename(file)
    # a folder's config.json is named after the folder (my-model/config.json: my-model), any other file
    # after itself (configs/small.json: small)
    name = os.path.basename(os.path.dirname(os.path.abspath(file))) if base == "config.json" else \
        os.path.splitext(base)[0]
    try:
        return from_hf_config(cfg, name=printable_path(name or file), where=where)
    except Undescribed as exc:
        if not traceable:
            raise
        return raw_model(exc, printable_path(name or file))


def printable_path(path: str) -> str:
    """path as text that every JSON reader and terminal takes: bytes that are not UTF-8 (a folder named
    b'bad\\xffname') are written as \\xff escapes instead of lone surrogates."""
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError:  # a lone surrogate that no filesystem name decodes to ('\ud800')
        return path.encode("utf-8", "backslashreplace").decode("ascii")
    return raw.decode("utf-8", "backslashreplace")
