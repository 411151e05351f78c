"""Hugging Face config.json: read strictly, validate against one schema per family, build a ModelSpec.

Everything a config.json can get wrong is refused here, in one line that names the file and the key:
a file that is not a regular file or is larger than a config ever is, nesting deeper than a config
ever has, JSON's non-standard NaN/Infinity, duplicate keys, wrong types (a boolean must be a JSON
boolean, a size an integer, never 4096.5 or "4096"), sizes outside a sane range, and two spellings of one
key that disagree. Otherwise a config.json reads as transformers reads it: every spelling its config class
accepts, and its defaults for absent keys. A family is one row of FAMILIES: its keys, and how the spec is
built from them. Pure Python: no torch import.
"""

from __future__ import annotations

import json
import math
import os
import stat
import sys
from dataclasses import dataclass, replace
from typing import Callable, Dict, Optional, Tuple

from lorabench.errors import LorabenchError
from lorabench.models.spec import ModelSpec

# A real config.json is a few KB (Llama-3-8B: 0.7 KB; the largest multimodal ones ~10 KB).
MAX_CONFIG_BYTES = 1 << 20
# Real configs nest 3-4 levels (text_config.rope_scaling...); 64 also keeps json clear of recursion limits.
MAX_DEPTH = 64

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


def _int(name, default=None, hi=MAX_WIDTH, nullable=False, aliases=()) -> Key:
    return Key(name, "int", default, hi, nullable, aliases)


def _bool(name, default=None) -> Key:
    return Key(name, "bool", default)


def _float(name, default=None) -> Key:
    return Key(name, "float", default, nullable=True)


def _list(name, kind, hi=MAX_LAYERS) -> Key:
    return Key(name, kind, hi=hi, nullable=True)


def _decoder(vocab, d, mlp, layers, heads, kv, head_dim=None, tied=False) -> Tuple[Key, ...]:
    """The keys every llama-style family reads, with its config class's defaults (None: derived)."""
    return (_int("hidden_size", d), _int("intermediate_size", mlp, MAX_MLP),
            _int("num_hidden_layers", layers, MAX_LAYERS), _int("num_attention_heads", heads, MAX_HEADS),
            _int("num_key_value_heads", kv, MAX_HEADS, nullable=True), _int("head_dim", head_dim, nullable=True),
            _int("vocab_size", vocab, MAX_VOCAB), _bool("tie_word_embeddings", tied))


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


def _build_llama(v: _Values, name: str, where: str, model_type: str) -> ModelSpec:
    heads, kv, head_dim = _attention(v, where)
    # transformers: Qwen2 always has q/k/v biases and no o bias; llama's attention_bias puts one on all four
    # (so do Qwen3's and OLMo 2's); Phi-3 has none.
    attention_bias = v.get("attention_bias", False)
    return ModelSpec(name=name, hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                     num_layers=v["num_hidden_layers"], num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
                     vocab_size=v["vocab_size"], tie_embeddings=v["tie_word_embeddings"],
                     qkv_bias=model_type == "qwen2" or attention_bias, o_bias=attention_bias,
                     mlp_bias=v.get("mlp_bias", False), family=model_type)


# transformers 5 reads a legacy layer type under its new name (configuration_utils._LEGACY_LAYER_TYPE_REMAP).
LEGACY_LAYER_TYPES = {"attention": "full_attention"}


def _sliding_pattern(v: _Values, where: str, model_type: str) -> int:
    """Gemma's sliding-window layout as "every Nth layer is global": from layer_types (transformers 5) or
    sliding_window_pattern (older Gemma 3 configs); Gemma 2 alternates (N = 2)."""
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
    return v.get("sliding_window_pattern") or GEMMA_GLOBAL_EVERY[model_type]


# transformers' default layer_types: Gemma 2 alternates sliding and global layers, Gemma 3 has five sliding
# layers to one global (Gemma3TextConfig reads the older sliding_window_pattern, default 6, to make them).
GEMMA_GLOBAL_EVERY = {"gemma2": 2, "gemma3_text": 6}


def _build_gemma(v: _Values, name: str, where: str, model_type: str) -> ModelSpec:
    heads, kv, head_dim = _attention(v, where)
    bias = v["attention_bias"]
    return ModelSpec(name=name, hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                     num_layers=v["num_hidden_layers"], num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
                     vocab_size=v["vocab_size"], tie_embeddings=v["tie_word_embeddings"], qkv_bias=bias,
                     o_bias=bias, family=model_type, attn_softcap=v.get("attn_logit_softcapping") or 0.0,
                     final_softcap=v.get("final_logit_softcapping") or 0.0,
                     sliding_window=v.get("sliding_window") or 0,
                     sliding_pattern=_sliding_pattern(v, where, model_type) if v.get("sliding_window") else 0,
                     query_pre_attn_scalar=v["query_pre_attn_scalar"])


def _moe_layers(v: _Values, where: str) -> None:
    """Refuses layouts with dense layers among the sparse ones (no published Qwen MoE has them)."""
    if v.get("decoder_sparse_step", 1) != 1 or v.get("mlp_only_layers"):
        raise LorabenchError(f"{where}: dense layers among the experts ('decoder_sparse_step' other than 1 or "
                             "a non-empty 'mlp_only_layers') are not modelled.")


def _build_moe(v: _Values, name: str, where: str, model_type: str) -> ModelSpec:
    heads, kv, head_dim = _attention(v, where)
    _moe_layers(v, where)
    experts, top_k = v["num_experts"], v["num_experts_per_tok"]
    if top_k > experts:
        raise LorabenchError(f"{where}: {v.said('num_experts_per_tok', top_k)} is more than "
                             f"{v.said('num_experts', experts)} (the experts per layer).")
    shared = v.get("shared_expert_intermediate_size", 0)  # Qwen2-MoE's always-on expert
    bias = v.get("attention_bias", False)
    return ModelSpec(name=name, hidden_size=v["hidden_size"], intermediate_size=shared,
                     num_layers=v["num_hidden_layers"], num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
                     vocab_size=v["vocab_size"], tie_embeddings=v["tie_word_embeddings"],
                     qkv_bias=v.get("qkv_bias", bias), o_bias=bias, family=model_type, num_experts=experts,
                     experts_per_token=top_k,
                     # Mixtral's experts are intermediate_size wide; the Qwen MoEs' moe_intermediate_size
                     expert_intermediate_size=v.get("moe_intermediate_size") or v["intermediate_size"],
                     shared_expert_gate=bool(shared))


def _build_gpt2(v: _Values, name: str, where: str, model_type: str) -> ModelSpec:
    d, heads = v["n_embd"], v["n_head"]
    if d % heads:
        raise LorabenchError(f"{where}: {v.said('n_embd', d)} is not divisible by {v.said('n_head', heads)}.")
    return ModelSpec(name=name, hidden_size=d, intermediate_size=v["n_inner"] or 4 * d,
                     num_layers=v["n_layer"], num_heads=heads, num_kv_heads=heads, head_dim=d // heads,
                     vocab_size=v["vocab_size"], tie_embeddings=v["tie_word_embeddings"],
                     qkv_bias=True, o_bias=True, mlp_bias=True, max_positions=v["n_positions"], family="gpt2")


@dataclass(frozen=True)
class Family:
    """How one model_type's config.json becomes a spec: the keys it reads and the builder."""

    keys: Tuple[Key, ...]
    build: Callable[[_Values, str, str, str], ModelSpec]


# The keys each family reads, every one with the default of transformers 5.25's config class for the family
# (configuration_<family>.py) and every spelling its attribute_map gives it: a config.json is read as
# transformers reads it, and save_pretrained's output (which writes attribute_map's spelling, and may leave a
# key out) reads back. tests/test_hfconfig_roundtrip.py holds this table to transformers' classes.
ATTENTION_BIAS = (_bool("attention_bias", False),)
GEMMA = (_int("query_pre_attn_scalar", 256), _bool("attention_bias", False), _list("layer_types", "strs"),
         _int("sliding_window", 4096, MAX_POSITIONS, nullable=True))


def _experts(number, top_k, aliases=()) -> Tuple[Key, ...]:
    """Experts per layer and per token, with the class's defaults. Mixtral's class keeps the count as
    num_local_experts and Qwen3-MoE's as num_experts, and each maps the other spelling onto its own;
    Qwen2-MoE's reads only num_experts."""
    return (_int("num_experts", number, MAX_HEADS, aliases=aliases), _int("num_experts_per_tok", top_k, MAX_HEADS))


def _qwen_moe(number, top_k, width, aliases=()) -> Tuple[Key, ...]:
    return _experts(number, top_k, aliases) + (_int("moe_intermediate_size", width, MAX_MLP),
                                                _int("decoder_sparse_step", 1, MAX_LAYERS),
                                                _list("mlp_only_layers", "ints"))


# model_type -> family.
FAMILIES: Dict[str, Family] = {
    "llama": Family(_decoder(32000, 4096, 11008, 32, 32, None) + ATTENTION_BIAS + (_bool("mlp_bias", False),),
                    _build_llama),
    "mistral": Family(_decoder(32000, 4096, 14336, 32, 32, 8), _build_llama),
    "qwen2": Family(_decoder(151936, 4096, 22016, 32, 32, 32), _build_llama),
    "qwen3": Family(_decoder(151936, 4096, 22016, 32, 32, 32, head_dim=128) + ATTENTION_BIAS, _build_llama),
    "gemma2": Family(_decoder(256000, 2304, 9216, 26, 8, 4, 256, tied=True) + GEMMA + (
        _float("attn_logit_softcapping", 50.0), _float("final_logit_softcapping", 30.0)), _build_gemma),
    "gemma3_text": Family(_decoder(262208, 2304, 9216, 26, 8, 4, 256, tied=True) + GEMMA + (
        _float("attn_logit_softcapping"), _float("final_logit_softcapping"),
        _int("sliding_window_pattern", hi=MAX_LAYERS)), _build_gemma),
    "phi3": Family(_decoder(32064, 3072, 8192, 32, 32, None), _build_llama),
    "olmo2": Family(_decoder(50304, 4096, 11008, 32, 32, None) + ATTENTION_BIAS, _build_llama),
    "mixtral": Family(_decoder(32000, 4096, 14336, 32, 32, 8) + _experts(8, 2, ("num_local_experts",)),
                      _build_moe),
    "qwen2_moe": Family(_decoder(151936, 2048, 5632, 24, 16, 16) + _qwen_moe(60, 4, 1408) + (
        _int("shared_expert_intermediate_size", 5632, MAX_MLP), _bool("qkv_bias", True)), _build_moe),
    "qwen3_moe": Family(_decoder(151936, 2048, 6144, 24, 32, 4) + ATTENTION_BIAS + _qwen_moe(
        128, 8, 768, ("num_local_experts",)), _build_moe),
    "gpt2": Family((_int("n_embd", 768, aliases=("hidden_size",)),
                    _int("n_head", 12, MAX_HEADS, aliases=("num_attention_heads",)),
                    _int("n_layer", 12, MAX_LAYERS, aliases=("num_hidden_layers",)),
                    _int("n_positions", 1024, MAX_POSITIONS, aliases=("max_position_embeddings",)),
                    _int("vocab_size", 50257, MAX_VOCAB), _int("n_inner", None, MAX_MLP, nullable=True),
                    _bool("tie_word_embeddings", True)), _build_gpt2),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


@dataclass(frozen=True)
class Multimodal:
    """A vision-language model_type whose language model lorabench reads from text_config.

    Attributes:
        text: the text_config's family.
        top: keys transformers reads at the top level for the language model, overriding text_config's.
    """

    text: str
    top: Tuple[Key, ...] = ()


# Gemma3ForConditionalGeneration ties its output head by Gemma3Config's tie_word_embeddings (default true),
# not text_config's.
MULTIMODAL = {"gemma3": Multimodal("gemma3_text", (_bool("tie_word_embeddings", True),))}


def _shown(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check(key: Key, value, where: str, name: Optional[str] = None):
    """value if it is what key allows; raises LorabenchError naming the file and the key (name: the spelling
    the file used, default key.name)."""
    key = replace(key, name=name) if name and name != key.name else key
    if value is None and key.nullable:
        return None
    if key.kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise LorabenchError(f"{where}: '{key.name}' must be a positive number or null, got {_shown(value)}.")
        return float(value)
    if key.kind in ("ints", "strs"):
        item = (lambda x: isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= key.hi) \
            if key.kind == "ints" else (lambda x: isinstance(x, str))
        if not isinstance(value, list) or not all(item(x) for x in value):
            what = f"integers from 0 to {key.hi:,}" if key.kind == "ints" else "strings"
            raise LorabenchError(f"{where}: '{key.name}' must be a list of {what}, got {_shown(value)}.")
        return value
    if key.kind == "bool":
        if not isinstance(value, bool):
            raise LorabenchError(f"{where}: '{key.name}' must be true or false (a JSON boolean), "
                                 f"got {_shown(value)}.")
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        kind = ("not an integer" if not isinstance(value, float) else "a fraction" if not value.is_integer()
                else f"a float; write {int(value)}" if abs(value) < 1e15 else "a float")
        raise LorabenchError(f"{where}: '{key.name}' must be a positive integer, got {_shown(value)} ({kind}).")
    if not 1 <= value <= key.hi:
        raise LorabenchError(f"{where}: '{key.name}' must be an integer from 1 to {key.hi:,}, got {_shown(value)}.")
    return value


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
                                 f"null, got {_shown(text)}.")
        cfg = {**(text or {}), **{k.name: cfg.get(k.name, k.default) for k in multimodal.top},
               "model_type": multimodal.text}
        notes = (f"{model_type} is a vision-language model: the language model (text_config) is counted; the "
                 "vision tower and its projector are not, and training them is not modelled.",)
        model_type = multimodal.text
    if model_type is None:
        raise LorabenchError(f"{where}: 'model_type' is missing (supported: {', '.join(SUPPORTED_MODEL_TYPES)}).")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise LorabenchError(f"{where}: model_type {_shown(model_type)} is not supported "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)}).")
    family = FAMILIES[model_type]
    values = _Values()
    for key in family.keys:
        written = [n for n in (key.name,) + key.aliases if n in cfg]
        if not written:
            values[key.name], values.written[key.name] = key.default, None
            continue
        first, value = written[0], _check(key, cfg[written[0]], where, written[0])
        for other in written[1:]:
            if _check(key, cfg[other], where, other) != value:
                raise LorabenchError(f"{where}: '{first}' {_shown(value)} and '{other}' {_shown(cfg[other])} "
                                     "disagree; transformers reads both as one setting.")
        values[key.name], values.written[key.name] = value, first
    spec = family.build(values, name, where, model_type)
    return replace(spec, notes=spec.notes + notes) if notes else spec


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
        raise LorabenchError("--config is empty; give a config.json or a folder holding one.")
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


def load_config(path: str, where: Optional[str] = None) -> ModelSpec:
    """Read a config.json (or a folder holding one) offline; the spec is named after its folder.

    Args:
        where: how errors about its contents name it (default: the file's path).

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
    return from_hf_config(cfg, name=printable_path(name or file), where=where)


def printable_path(path: str) -> str:
    """path as text that every JSON reader and terminal takes: bytes that are not UTF-8 (a folder named
    b'bad\\xffname') are written as \\xff escapes instead of lone surrogates."""
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError:  # a lone surrogate that no filesystem name decodes to ('\ud800')
        return path.encode("utf-8", "backslashreplace").decode("ascii")
    return raw.decode("utf-8", "backslashreplace")


def hf_config_dict(spec: ModelSpec) -> Dict:
    """The config.json keys transformers needs to build spec's model (the inverse of from_hf_config), for
    `lorabench bench --impl peft`. Dropout off; special-token ids inside any vocabulary.

    Raises:
        LorabenchError: a --d matrix, which is no model.
    """
    if spec.single_matrix:
        raise LorabenchError(f"'{spec.name}' is a single d x d matrix, not a model to build.")
    s, f = spec, spec.family
    if f == "gpt2":
        return {"model_type": f, "n_embd": s.hidden_size, "n_head": s.num_heads, "n_layer": s.num_layers,
                "n_positions": s.max_positions, "n_inner": s.intermediate_size, "vocab_size": s.vocab_size,
                "tie_word_embeddings": s.tie_embeddings, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    cfg = {"model_type": f, "hidden_size": s.hidden_size, "num_hidden_layers": s.num_layers,
           "num_attention_heads": s.num_heads, "num_key_value_heads": s.num_kv_heads, "head_dim": s.head_dim,
           "vocab_size": s.vocab_size, "tie_word_embeddings": s.tie_embeddings, "attention_dropout": 0.0,
           "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0}
    if s.intermediate_size:
        cfg["intermediate_size"] = s.intermediate_size
    if f == "llama":
        cfg.update(attention_bias=s.o_bias, mlp_bias=s.mlp_bias)
        if s.qkv_bias and not s.o_bias:
            raise LorabenchError(f"transformers' Llama has no q/k/v-only biases ('{spec.name}'); use qwen2.")
    elif f in ("qwen3", "olmo2", "qwen3_moe", "gemma2", "gemma3_text"):
        cfg["attention_bias"] = s.o_bias
    elif f == "phi3":
        cfg.update(resid_pdrop=0.0, embd_pdrop=0.0)
    if f in ("gemma2", "gemma3_text"):
        cfg.update(query_pre_attn_scalar=s.query_pre_attn_scalar or s.head_dim,
                   attn_logit_softcapping=s.attn_softcap or None, final_logit_softcapping=s.final_softcap or None,
                   sliding_window=s.sliding_window or None,
                   layer_types=["sliding_attention" if s.sliding_pattern and (
                       s.sliding_pattern == 1 or (i + 1) % s.sliding_pattern) else "full_attention"
                                for i in range(s.num_layers)] if s.sliding_window else None)
    if s.moe:
        cfg.update(num_experts_per_tok=s.experts_per_token, router_jitter_noise=0.0, output_router_logits=False)
        if f == "mixtral":
            cfg.update(num_local_experts=s.num_experts, intermediate_size=s.expert_intermediate_size)
        else:
            cfg.update(num_experts=s.num_experts, moe_intermediate_size=s.expert_intermediate_size,
                       decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=s.arch.routing.renormalize)
        if f == "qwen2_moe":
            cfg.update(shared_expert_intermediate_size=s.intermediate_size, qkv_bias=s.qkv_bias)
    return cfg
