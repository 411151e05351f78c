"""Hugging Face config.json: read strictly, validate against one schema per family, build a ModelSpec.

Everything a config.json can get wrong is refused here, in one line that names the file and the key:
a file that is not a regular file or is larger than a config ever is, nesting deeper than a config
ever has, JSON's non-standard NaN/Infinity, duplicate keys, wrong types (a boolean must be a JSON
boolean, a size an integer, never 4096.5 or "4096"), and sizes outside a sane range. A family is one
row of FAMILIES: its keys, and how the spec is built from them. Pure Python: no torch import.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass, replace
from typing import Callable, Dict, Optional, Tuple

from lorabench.errors import LorabenchError
from lorabench.specs import ModelSpec

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
        name: the key.
        kind: "int" (an integer in [1, hi]), "bool" (a JSON boolean), "float" (a positive finite number),
            "ints" (a list of integers in [0, hi]) or "strs" (a list of strings).
        required: absent is an error (otherwise `default` applies).
        hi: largest accepted integer.
        nullable: null is accepted (transformers' configs write `"head_dim": null`, "no soft-capping").
        default: the value when the key is absent: transformers' config class default for the family
            (None: the builder derives it, as head_dim = hidden_size / heads).
    """

    name: str
    kind: str = "int"
    required: bool = True
    hi: int = MAX_WIDTH
    nullable: bool = False
    default: object = None


def _int(name, hi=MAX_WIDTH, required=True, nullable=False, default=None) -> Key:
    return Key(name, "int", required and default is None, hi, nullable, default)


def _bool(name, default=None) -> Key:
    return Key(name, "bool", required=False, default=default)


def _float(name, default=None) -> Key:
    return Key(name, "float", required=False, nullable=True, default=default)


def _list(name, kind, hi=MAX_LAYERS) -> Key:
    return Key(name, kind, required=False, hi=hi, nullable=True)


LLAMA_KEYS = (
    _int("hidden_size"), _int("intermediate_size", MAX_MLP), _int("num_hidden_layers", MAX_LAYERS),
    _int("num_attention_heads", MAX_HEADS), _int("num_key_value_heads", MAX_HEADS, False, True),
    _int("head_dim", required=False, nullable=True), _int("vocab_size", MAX_VOCAB),
    _bool("tie_word_embeddings"),
)
GPT2_KEYS = (
    _int("n_embd"), _int("n_head", MAX_HEADS), _int("n_layer", MAX_LAYERS), _int("n_positions", MAX_POSITIONS),
    _int("vocab_size", MAX_VOCAB), _int("n_inner", MAX_MLP, False, True), _bool("tie_word_embeddings"),
)


def _attention(v: Dict, where: str) -> Tuple[int, int, int]:
    """(heads, kv_heads, head_dim) of a llama-style config, checked for consistency."""
    d, heads = v["hidden_size"], v["num_attention_heads"]
    kv = v.get("num_key_value_heads") or heads
    if kv > heads or heads % kv:
        raise LorabenchError(f"{where}: 'num_attention_heads' {heads} is not a multiple of "
                             f"'num_key_value_heads' {kv}.")
    head_dim = v.get("head_dim")
    if head_dim is None:
        if d % heads:
            raise LorabenchError(f"{where}: 'hidden_size' {d} is not divisible by 'num_attention_heads' {heads} "
                                 f"(and no 'head_dim' is given).")
        head_dim = d // heads
    return heads, kv, head_dim


def _build_llama(v: Dict, name: str, where: str, model_type: str) -> ModelSpec:
    heads, kv, head_dim = _attention(v, where)
    # transformers: Qwen2 always has q/k/v biases and no o bias; llama's attention_bias puts one on all four
    # (so do Qwen3's and OLMo 2's); Phi-3 has none.
    attention_bias = v.get("attention_bias", False)
    return ModelSpec(name=name, hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                     num_layers=v["num_hidden_layers"], num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
                     vocab_size=v["vocab_size"], tie_embeddings=v.get("tie_word_embeddings", False),
                     qkv_bias=model_type == "qwen2" or attention_bias, o_bias=attention_bias,
                     mlp_bias=v.get("mlp_bias", False), family=model_type)


def _sliding_pattern(v: Dict, where: str, model_type: str) -> int:
    """Gemma's sliding-window layout as "every Nth layer is global": from layer_types (transformers 5) or
    sliding_window_pattern (older Gemma 3 configs); Gemma 2 alternates (N = 2)."""
    types = v.get("layer_types")
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
# layers to one global.
GEMMA_GLOBAL_EVERY = {"gemma2": 2, "gemma3_text": 6}


def _build_gemma(v: Dict, name: str, where: str, model_type: str) -> ModelSpec:
    heads, kv, head_dim = _attention(v, where)
    bias = v.get("attention_bias", False)
    return ModelSpec(name=name, hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                     num_layers=v["num_hidden_layers"], num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
                     vocab_size=v["vocab_size"], tie_embeddings=v["tie_word_embeddings"], qkv_bias=bias,
                     o_bias=bias, family=model_type, attn_softcap=v.get("attn_logit_softcapping") or 0.0,
                     final_softcap=v.get("final_logit_softcapping") or 0.0,
                     sliding_window=v.get("sliding_window") or 0,
                     sliding_pattern=_sliding_pattern(v, where, model_type) if v.get("sliding_window") else 0,
                     query_pre_attn_scalar=v["query_pre_attn_scalar"])


def _moe_layers(v: Dict, where: str) -> None:
    """Refuses layouts with dense layers among the sparse ones (no published Qwen MoE has them)."""
    if v.get("decoder_sparse_step", 1) != 1 or v.get("mlp_only_layers"):
        raise LorabenchError(f"{where}: dense layers among the experts ('decoder_sparse_step' other than 1 or "
                             "a non-empty 'mlp_only_layers') are not modelled.")


def _build_moe(v: Dict, name: str, where: str, model_type: str) -> ModelSpec:
    heads, kv, head_dim = _attention(v, where)
    _moe_layers(v, where)
    experts = v.get("num_local_experts") or v["num_experts"]
    top_k = v["num_experts_per_tok"]
    if top_k > experts:
        raise LorabenchError(f"{where}: 'num_experts_per_tok' {top_k} is more than the {experts} experts.")
    shared = v.get("shared_expert_intermediate_size", 0)  # Qwen2-MoE's always-on expert
    bias = v.get("attention_bias", False)
    return ModelSpec(name=name, hidden_size=v["hidden_size"], intermediate_size=shared,
                     num_layers=v["num_hidden_layers"], num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
                     vocab_size=v["vocab_size"], tie_embeddings=v.get("tie_word_embeddings", False),
                     qkv_bias=v.get("qkv_bias", bias), o_bias=bias, family=model_type, num_experts=experts,
                     experts_per_token=top_k,
                     expert_intermediate_size=v.get("moe_intermediate_size") or v["intermediate_size"],
                     shared_expert_gate=bool(shared))


def _build_gpt2(v: Dict, name: str, where: str, model_type: str) -> ModelSpec:
    d, heads = v["n_embd"], v["n_head"]
    if d % heads:
        raise LorabenchError(f"{where}: 'n_embd' {d} is not divisible by 'n_head' {heads}.")
    return ModelSpec(name=name, hidden_size=d, intermediate_size=v.get("n_inner") or 4 * d,
                     num_layers=v["n_layer"], num_heads=heads, num_kv_heads=heads, head_dim=d // heads,
                     vocab_size=v["vocab_size"], tie_embeddings=v.get("tie_word_embeddings", True),
                     qkv_bias=True, o_bias=True, mlp_bias=True, max_positions=v["n_positions"], family="gpt2")


@dataclass(frozen=True)
class Family:
    """How one model_type's config.json becomes a spec: the keys it reads and the builder."""

    keys: Tuple[Key, ...]
    build: Callable[[Dict, str, str, str], ModelSpec]


ATTENTION_BIAS = (_bool("attention_bias"),)
# Gemma's configs leave many keys to the config class: these defaults are transformers' Gemma2Config and
# Gemma3TextConfig (checked against them in tests/test_families.py).
GEMMA_SHARED = (
    _int("num_attention_heads", MAX_HEADS, default=8), _int("num_key_value_heads", MAX_HEADS, False, True, 4),
    _int("head_dim", nullable=True, default=256), _int("query_pre_attn_scalar", default=256),
    _bool("tie_word_embeddings", True), _bool("attention_bias"), _list("layer_types", "strs"),
)
GEMMA2_KEYS = GEMMA_SHARED + (
    _int("hidden_size", default=2304), _int("intermediate_size", MAX_MLP, default=9216),
    _int("num_hidden_layers", MAX_LAYERS, default=26), _int("vocab_size", MAX_VOCAB, default=256000),
    _float("attn_logit_softcapping", 50.0), _float("final_logit_softcapping", 30.0),
    _int("sliding_window", MAX_POSITIONS, nullable=True, default=4096),
)
GEMMA3_KEYS = GEMMA_SHARED + (
    _int("hidden_size", default=2304), _int("intermediate_size", MAX_MLP, default=9216),
    _int("num_hidden_layers", MAX_LAYERS, default=26), _int("vocab_size", MAX_VOCAB, default=262208),
    _float("attn_logit_softcapping"), _float("final_logit_softcapping"),
    _int("sliding_window", MAX_POSITIONS, nullable=True, default=4096),
    _int("sliding_window_pattern", MAX_LAYERS, required=False),
)
MOE_KEYS = (
    _int("hidden_size"), _int("num_hidden_layers", MAX_LAYERS), _int("num_attention_heads", MAX_HEADS),
    _int("num_key_value_heads", MAX_HEADS, False, True), _int("head_dim", required=False, nullable=True),
    _int("vocab_size", MAX_VOCAB), _bool("tie_word_embeddings"), _int("num_experts_per_tok", MAX_HEADS),
)
QWEN_MOE_KEYS = MOE_KEYS + (
    _int("num_experts", MAX_HEADS), _int("moe_intermediate_size", MAX_MLP),
    _int("intermediate_size", MAX_MLP, required=False), _int("decoder_sparse_step", MAX_LAYERS, required=False),
    _list("mlp_only_layers", "ints"),
)

# model_type -> family. Defaults for absent keys follow transformers' config classes.
FAMILIES: Dict[str, Family] = {
    "llama": Family(LLAMA_KEYS + ATTENTION_BIAS + (_bool("mlp_bias"),), _build_llama),
    "mistral": Family(LLAMA_KEYS, _build_llama),
    "qwen2": Family(LLAMA_KEYS, _build_llama),
    "qwen3": Family(LLAMA_KEYS + ATTENTION_BIAS, _build_llama),
    "gemma2": Family(GEMMA2_KEYS, _build_gemma),
    "gemma3_text": Family(GEMMA3_KEYS, _build_gemma),
    "phi3": Family(LLAMA_KEYS, _build_llama),
    "olmo2": Family(LLAMA_KEYS + ATTENTION_BIAS, _build_llama),
    "mixtral": Family(MOE_KEYS + (_int("num_local_experts", MAX_HEADS), _int("intermediate_size", MAX_MLP)),
                      _build_moe),
    "qwen2_moe": Family(QWEN_MOE_KEYS + (_int("shared_expert_intermediate_size", MAX_MLP),
                                         _bool("qkv_bias", True)), _build_moe),
    "qwen3_moe": Family(QWEN_MOE_KEYS + ATTENTION_BIAS, _build_moe),
    "gpt2": Family(GPT2_KEYS, _build_gpt2),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
# Vision-language checkpoints whose language model lorabench reads from text_config.
MULTIMODAL = {"gemma3": "gemma3_text"}


def _shown(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check(key: Key, value, where: str):
    """value if it is what key allows; raises LorabenchError naming the file and the key."""
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
        LorabenchError: not an object, an unsupported model_type, or a missing, mistyped or
            out-of-range key.
    """
    where = where or name
    if not isinstance(cfg, dict):
        raise LorabenchError(f"{where}: expected a JSON object, got {type(cfg).__name__ if cfg is not None else 'null'}.")
    model_type = cfg.get("model_type")
    notes: Tuple[str, ...] = ()
    if isinstance(model_type, str) and model_type in MULTIMODAL:
        # A vision-language checkpoint (Gemma 3 4B and up): its language model is text_config.
        text = cfg.get("text_config")
        if not isinstance(text, dict):
            raise LorabenchError(f"{where}: a {model_type} config.json needs a 'text_config' object (the "
                                 "language model).")
        cfg = {"model_type": MULTIMODAL[model_type], **text}
        notes = (f"{model_type} is a vision-language model: the language model (text_config) is counted; the "
                 "vision tower and its projector are not, and training them is not modelled.",)
        model_type = cfg["model_type"]
    if model_type is None:
        raise LorabenchError(f"{where}: 'model_type' is missing (supported: {', '.join(SUPPORTED_MODEL_TYPES)}).")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise LorabenchError(f"{where}: model_type {_shown(model_type)} is not supported "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)}).")
    family = FAMILIES[model_type]
    values: Dict = {}
    for key in family.keys:
        if key.name not in cfg:
            if key.required:
                raise LorabenchError(f"{where}: '{key.name}' is missing; a {model_type} config.json has it.")
            if key.default is not None:
                values[key.name] = key.default
            continue
        values[key.name] = _check(key, cfg[key.name], where)
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
