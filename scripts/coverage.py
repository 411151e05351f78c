"""Which model types lorabench answers for: every model_type of transformers' causal-LM and image-text-to-text
auto mappings, each said to be described (the analytic model's families), traced (the tracing engine,
lorabench.measure.traced, steps a small config of it: LoRA r=8 on all-linear, bf16, batch 1 x 32) or refused,
with the refusal's one line. Writes docs/coverage.md and prints the counts.

    PYTHONPATH=. python3 scripts/coverage.py [--out docs/coverage.md] [--timeout 60] [--only TYPE,TYPE]

The small config is the model_type's config class defaults shrunk by one generic rule set (SHRINK): widths to
256, feed-forward 512, 4 decoder layers (2 for a vision or audio tower), 4 heads of 64 with 2 key-value heads, a
1,024-token vocabulary, 4 experts routing 2, small windows, per-layer lists made again at the new depth. Where a
class refuses that shrunk config, its own defaults cut to 2 layers are traced instead (on fake tensors the full
width costs no memory), and the notes say so. Each type runs in a forked child with a time limit, so one that
hangs or exhausts memory is recorded and the rest go on.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import re
import sys
import time
from typing import Dict, List, Optional, Tuple

LAYERS = {"text": 4, "tower": 2}  # decoder layers of the language model; of a vision or audio tower
HIDDEN, FFN, EXPERT_FFN, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 256, 512, 256, 4, 2, 64, 1024
# key -> its small value (the default where that is smaller); ints, and lists of ints element-wise
SHRINK = {
    **dict.fromkeys(("hidden_size", "n_embd", "n_embed", "d_model", "dim", "embed_dim", "word_embed_proj_dim",
                     "out_hidden_size", "text_hidden_size", "encoder_hidden_size", "hidden_size_global",
                     "attention_hidden_size", "projection_dim", "projector_hidden_size"), HIDDEN),
    **dict.fromkeys(("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "d_ff", "mlp_dim",
                     "encoder_ffn_dim", "decoder_ffn_dim", "intermediate_size_mlp", "dense_intermediate_size",
                     "shared_intermediate_size", "decoder_intermediate_size"), FFN),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size", "shared_experts_intermediate_size",
                     "moe_shared_expert_intermediate_size", "expert_intermediate_size"), EXPERT_FFN),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_heads", "attention_heads",
                     "encoder_attention_heads", "decoder_attention_heads", "swa_num_attention_heads",
                     "index_n_heads", "linear_num_heads", "linear_num_value_heads"), HEADS),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num",
                     "swa_num_key_value_heads", "linear_num_key_heads"), KV_HEADS),
    **dict.fromkeys(("head_dim", "attention_head_dim", "kv_channels", "swa_head_dim", "linear_key_head_dim",
                     "linear_value_head_dim", "linear_head_dim", "d_kv", "index_head_dim", "mamba_d_head",
                     "mamba_head_dim"), HEAD_DIM),
    **dict.fromkeys(("vocab_size", "vocab_size_per_layer_input", "unpadded_vocab_size"), VOCAB),
    **dict.fromkeys(("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_k", "moe_topk", "num_experts_per_token", "top_k"), 2),
    **dict.fromkeys(("n_group", "topk_group", "first_k_dense_replace", "num_kv_shared_layers", "attn_layer_offset"), 1),
    **dict.fromkeys(("sliding_window", "sliding_window_size", "attention_chunk_size", "index_topk", "block_size",
                     "chunk_size", "mamba_chunk_size", "state_size", "mamba_d_state", "ssm_state_size",
                     "time_step_rank", "mamba_dt_rank"), 16),
    **dict.fromkeys(("sliding_window_pattern", "attn_layer_period", "expert_layer_period", "full_attention_interval",
                     "global_attn_every_n_layers", "moe_layer_freq"), 2),
    # multi-head latent attention (DeepSeek-V2/V3 and their kin)
    "kv_lora_rank": 64, "q_lora_rank": 128, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "qk_head_dim": 48,
    "v_head_dim": 32,
}
# key -> its value where the class default is None (a default the published configs always override)
FILL = {"num_experts_per_tok": 2, "n_routed_experts": 4, "head_dim": HEAD_DIM, "num_key_value_heads": HEADS}
# model_type -> what its published config.json sets and the class defaults leave out or leave unbuildable:
# merged into the small config last, so that a refusal is the engine's and not the default's
OVERRIDES = {
    "dbrx": {"attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0}},
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv", "full_attention"], "num_dense_layers": 1},
    "reformer": {"is_decoder": True},
    "xmod": {"default_language": "en_XX"},
}
DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "depth", "layers", "encoder_layers",
              "decoder_layers", "num_decoder_layers")
TOWERS = ("vision", "audio", "vq", "image", "speech", "encoder", "sam", "qformer", "perceiver", "depth_decoder")
# (cause, a pattern of its refusals, what it means): docs/coverage.md counts the refusals by cause
CAUSES = [
    ("image-text-to-text only", r"Unrecognized configuration class",
     "Neither `AutoModelForCausalLM` nor `AutoModelForImageTextToText` builds the type from its config (Evolla: a "
     "protein-language model)."),
    ("PEFT: Mamba mixers", r"incompatible with Mamba-based models",
     "PEFT refuses LoRA on a Mamba mixer's `out_proj` and `conv1d`, which all-linear takes in. LoRA on named "
     "projections is traced: tests/test_traced_families.py steps `mamba` and `falcon_h1` so, to the byte."),
    ("PEFT: a router that is a Linear", r"'tuple' object has no attribute 'dtype'",
     "All-linear wraps a router that subclasses `nn.Linear` but returns a tuple (Llama 4, PhiMoE), and PEFT's "
     "LoRA forward fails on it; the answer says so in one line. LoRA on the attention projections is "
     "traced to the byte (tests/test_traced_families.py)."),
    ("the step reads its data", r"cannot be traced: its step reads values|DataDependent|DynamicOutputShape",
     "An op whose output's shape or value is the data's (`nonzero`, `.item()`, `.tolist()`), e.g. JetMoE's "
     "count of tokens per expert, read with `.tolist()`: fake tensors hold no data, and the real step's memory "
     "depends on the tokens. (A mixture of experts run expert by expert, DBRX, is traced with its routing given, "
     "balanced.)"),
    ("decoder layers not found", r"cannot find the model's \d+ decoder layers",
     "The engine takes the depth from the text config's `num_hidden_layers` and looks for one `ModuleList` that "
     "long (or `decoder_layers` long: an encoder-decoder's causal LM); layers kept otherwise are not found."),
    ("a library missing", r"requires the \w+ library",
     "transformers needs a library this environment lacks (timm, for Gemma 3n's vision tower)."),
    ("the class defaults", r"ValidationError|transformers refuses the config|NoneType|has no attribute|"
                           r"takes \d+ positional|KeyError|is_decoder",
     "The config class's own defaults (or the shrinker's values) do not build or run as they are; a published "
     "config.json of the type may well be traced."),
]
MAPPINGS = {"causal-lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
            "image-text-to-text": "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"}


def mapped_types() -> Dict[str, List[str]]:
    """model_type -> the mappings (MAPPINGS' short names) that list it."""
    from transformers.models.auto import modeling_auto

    out: Dict[str, List[str]] = {}
    for short, name in MAPPINGS.items():
        for model_type in getattr(modeling_auto, name):
            out.setdefault(model_type, []).append(short)
    return dict(sorted(out.items()))


def _depth(d: Dict) -> Optional[int]:
    return next((d[k] for k in DEPTH_KEYS if isinstance(d.get(k), int) and not isinstance(d.get(k), bool)), None)


def _shrunk_value(key: str, value, ids: Dict[int, int]):
    """value under SHRINK's (or FILL's) rule for key; token ids past the small vocabulary given distinct small ones
    (an embedding's padding_idx must lie inside it)."""
    if isinstance(value, bool):
        return value
    if value is None:
        return FILL.get(key)
    if str(key).endswith(("token_id", "token_index", "token_ids")):
        big = [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int) and v >= VOCAB]
        for v in big:
            ids.setdefault(v, VOCAB - 1 - len(ids))
        return [ids.get(v, v) for v in value] if isinstance(value, list) else ids.get(value, value)
    if key in SHRINK and isinstance(value, int):
        return min(value, SHRINK[key])
    if key in SHRINK and isinstance(value, list) and all(isinstance(v, int) for v in value):
        return [min(v, SHRINK[key]) for v in value]
    return value


def shrink(d: Dict, tower: bool, ids: Dict[int, int], dropped: List[Tuple[Tuple[str, ...], str, list, int]],
           path: Tuple[str, ...] = ()) -> Dict:
    """A config dict (a to_dict() of transformers' config) made small, sub-configs alike. Per-layer lists (the
    old depth long) are left out for the class to make again at the new depth, and noted in `dropped`
    (path, key, the list shrunk, the new depth) for the lists the class does not make."""
    old = _depth(d)
    new = min(old, LAYERS["tower" if tower else "text"]) if old is not None else None
    out = {}
    for key, value in d.items():
        if key == "per_layer_config" and isinstance(value, dict) and new is not None:
            out[key] = _per_layer(value, new, tower, ids, dropped, path + (key,))
        elif isinstance(value, dict) and key not in ("rope_parameters", "rope_scaling", "id2label", "label2id"):
            out[key] = shrink(value, tower or any(t in key for t in TOWERS), ids, dropped, path + (key,))
        elif key in DEPTH_KEYS and isinstance(value, int) and not isinstance(value, bool):
            out[key] = min(value, LAYERS["tower" if tower else "text"])
        elif isinstance(value, list) and old is not None and len(value) == old and old != new:
            dropped.append((path, key, _shrunk_value(key, value, ids)[:new], new))
        else:
            out[key] = _shrunk_value(key, value, ids)
    for kv, q in (("num_key_value_heads", "num_attention_heads"), ("num_kv_heads", "num_heads"),
                  ("n_kv_heads", "n_heads"), ("swa_num_key_value_heads", "swa_num_attention_heads")):
        if kv in d and q in d and d[kv] == d[q]:  # multi-head attention (MLA's too) stays multi-head
            out[kv] = out[q]
    if isinstance(out.get("qk_rope_head_dim"), int) and isinstance(out.get("head_dim"), int):
        out["head_dim"] = out["qk_rope_head_dim"]  # latent attention: the rotary part's width is its head_dim
    _mrope(out)
    heads = next((k for k in ("mamba_n_heads", "mamba_num_heads") if k in out), None)
    if heads is None and "expand" in out and "num_heads" in out:  # Mamba-2: heads x head_dim = expand x hidden
        heads = "num_heads"
    dim = next((k for k in ("mamba_d_head", "mamba_head_dim", "head_dim") if isinstance(out.get(k), int)), None)
    expand = out.get("mamba_expand", out.get("expand"))
    if heads and dim and isinstance(expand, int) and isinstance(out.get("hidden_size"), int):
        out[heads] = expand * out["hidden_size"] // out[dim]
        if isinstance(out.get("mamba_d_ssm"), int):  # Falcon-H1: the mixer's width, heads x head_dim
            out["mamba_d_ssm"] = out[heads] * out[dim]
    return out


def _per_layer(layers: Dict, depth: int, tower: bool, ids, dropped, path) -> Dict:
    """A per_layer_config ({layer index: overrides}, Gemma 4's global layers) at the new depth: the indices past
    it dropped, but the first kept (moved to the last layer) so that its kind stays."""
    keys = sorted(layers, key=int)
    kept = [k for k in keys if int(k) < depth] or keys[:1]
    return {(k if int(k) < depth else str(depth - 1)): shrink(layers[k], tower, ids, dropped, path + (str(k),))
            for k in kept}


def _mrope(d: Dict) -> None:
    """Multimodal RoPE's (time, height, width) sections scaled to the new rotary width: they must sum to half
    of it."""
    rope = d.get("rope_parameters") or d.get("rope_scaling")
    sections = rope.get("mrope_section") if isinstance(rope, dict) else None
    dim = d.get("qk_rope_head_dim") or d.get("head_dim")
    if not (isinstance(sections, list) and isinstance(dim, int) and sum(sections) != dim // 2):
        return
    scaled = [s * (dim // 2) // sum(sections) for s in sections]
    scaled[0] += dim // 2 - sum(scaled)
    rope["mrope_section"] = scaled


def small_config(model_type: str) -> Dict:
    """The config dict (as a config.json holds it) of model_type's class defaults, shrunk.

    Raises:
        Exception: whatever the config class refuses.
    """
    import transformers

    defaults = transformers.AutoConfig.for_model(model_type).to_dict()
    ids: Dict[int, int] = {}
    dropped: List = []
    cfg = shrink(defaults, False, ids, dropped)
    cfg.pop("model_type", None)
    for key, value in OVERRIDES.get(model_type, {}).items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    made = transformers.AutoConfig.for_model(model_type, **cfg).to_dict()
    for path, key, cut, depth in dropped:  # lists the class did not make again: the shrunk default, cut
        where = made
        for p in path:
            where = where[p]
        if not (isinstance(where.get(key), list) and len(where[key]) == depth):
            where[key] = cut
    made["model_type"] = model_type
    transformers.AutoConfig.for_model(**made)  # what the engine's hf_config will do: refused here, not later
    return made


def depth_only(model_type: str) -> Dict:
    """The class defaults at 2 decoder layers, full width: the second try."""
    import transformers

    cfg = transformers.AutoConfig.for_model(model_type).to_dict()
    text = cfg["text_config"] if isinstance(cfg.get("text_config"), dict) else cfg
    key = next((k for k in DEPTH_KEYS if isinstance(text.get(k), int)), None)
    if key is not None:
        old, text[key] = text[key], 2
        for k, v in list(text.items()):
            if isinstance(v, list) and len(v) == old:
                text[k] = v[:2]
    cfg["model_type"] = model_type
    return cfg


def one_line(exc: BaseException, limit: int = 180) -> str:
    """An exception as the table's reason: its first line, shortened; the type named unless it is
    lorabench's own (whose messages are sentences for the user)."""
    from lorabench.errors import LorabenchError

    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [""]
    text = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]  # "validation error for X:" says why next
    text = text if isinstance(exc, LorabenchError) else f"{type(exc).__name__}: {text}".rstrip(": ")
    text = text.replace("|", "/")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def trace_small(model_type: str) -> Tuple[str, str]:
    """("traced" or "refused", notes or the reason): the small config traced, else the defaults at depth 2."""
    from lorabench.estimator.setup import TrainingSetup
    from lorabench.estimator.tuner import method_tuner
    from lorabench.measure.hfbuild import expected_library_warnings
    from lorabench.measure.traced import trace_model
    from lorabench.methods import METHODS
    from lorabench.models.raw import RawModel, canonical

    setup = TrainingSetup(batch_size=1, seq_len=32, device="cpu", impl="peft", dtype="bf16")
    tuner = method_tuner(METHODS["lora"], 8, model_type, "all-linear", setup)
    reasons, configured = [], []
    for how, make in (("small config", small_config), ("class defaults at 2 layers", depth_only)):
        try:
            raw = RawModel(model_type, canonical(make(model_type)))
            configured.append(how)
            with expected_library_warnings():
                out = trace_model(raw, tuner, setup)
        except Exception as exc:  # every refusal, the library's own included, is what the table records
            reasons.append(one_line(exc))
            continue
        notes = f"{how}: {out['depth']} layers, {out['layer_kinds']} kind(s), {out['total_params']:,} params, " \
                f"{len(out['targets'] or [])} targets, {out['trace_seconds']} s"
        if reasons:
            notes += f" (the small config: {reasons[0]})"
        return "traced", notes
    # the small config's refusal; the defaults' too where the class refused the small config itself
    why = reasons[0]
    if "small config" not in configured and reasons[1] != reasons[0]:
        why += f" (class defaults at 2 layers: {reasons[1]})"
    if reasons[0].startswith("PEFT cannot apply"):  # all-linear refused: does PEFT's own default take it?
        try:
            tuner = method_tuner(METHODS["lora"], 8, model_type, None, setup)
            with expected_library_warnings():
                out = trace_model(RawModel(model_type, canonical(small_config(model_type))), tuner, setup)
            why += f"; LoRA on PEFT's default targets ({', '.join(out['targets'] or [])}) is traced"
        except Exception as exc:
            text = one_line(exc, 120)
            why += "; PEFT has no default targets for it" if "specify `target_modules`" in text else \
                f"; PEFT's default targets: {text}"
    return "refused", why


def _child(model_type: str, conn) -> None:
    import logging
    import warnings
    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)
    try:
        conn.send(trace_small(model_type))
    except BaseException as exc:  # the child's last word, whatever ended it
        conn.send(("refused", one_line(exc)))
    conn.close()


def answer(model_type: str, timeout: float) -> Tuple[str, str, float]:
    """(answer, reason or notes, seconds) for one model_type, traced in a forked child under `timeout`."""
    started = time.perf_counter()
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(model_type, child))
    proc.start()
    child.close()
    got = parent.recv() if parent.poll(timeout) else None
    proc.join(5 if got is not None else 0)
    if proc.is_alive():
        proc.kill()  # the child this call started, by its own handle
        proc.join()
    seconds = time.perf_counter() - started
    if got is None:
        why = f"over the {timeout:.0f} s limit" if seconds >= timeout else f"the child died (exit {proc.exitcode})"
        return "refused", f"not answered: {why}", seconds
    return got[0], got[1], seconds


def render(rows: List[Tuple[str, List[str], str, str]], header: Dict[str, str]) -> str:
    """docs/coverage.md: how it was made, the counts, the table."""
    lines = ["# Model-type coverage", "",
             f"Generated by `{header['command']}` on {header['date']} with transformers {header['transformers']}, "
             f"peft {header['peft']}, torch {header['torch']} (CPU). Do not edit by hand: run it again.", "",
             "Every `model_type` of transformers' `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` and "
             "`MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES`, and what lorabench answers for it:", "",
             "- **described**: the analytic model has the family (`lorabench.models.families`); the notes say "
             "whether the tracing engine steps it too.",
             "- **traced**: no description, but the tracing engine (`lorabench.measure.traced`) steps a small "
             "config of it: the class defaults shrunk (256 wide, 4 layers, 4 heads of 64, 2 key-value heads, "
             "vocabulary 1,024, 4 experts routing 2), LoRA r=8 on all-linear, bf16, batch 1 x 32. Where the class "
             "refuses the shrunk config its defaults cut to 2 layers are traced, and the notes say so.",
             "- **refused**: neither; the reason is the error's first line (lorabench's own sentence, or the "
             "library's exception named by its type). The engine builds with `AutoModelForCausalLM`, or with "
             "`AutoModelForImageTextToText` where the causal-LM mapping does not list the type (traced on text "
             "alone, the vision tower held).", "",
             f"**{header['summary']}**.", "",
             "Each type is traced in a forked child with a time limit (60 s unless `--timeout` says otherwise). "
             "tests/test_traced_families.py holds 41 of the traced types (hand-written small configs) to "
             "transformers' parameter count, PEFT's trainable count and the real CPU step's per-phase peaks, "
             "all to the byte.", "",
             "## Refusals by cause", "", "| cause | types | what it means |", "|---|---|---|"]
    by_cause: Dict[str, List[str]] = {}
    for t, _, a, n in rows:
        if a == "refused":
            cause = next((c for c, pattern, _ in CAUSES if re.search(pattern, n)), "other")
            by_cause.setdefault(cause, []).append(t)
    lines += [f"| {cause} | {len(by_cause[cause])}: {', '.join(f'`{t}`' for t in by_cause[cause])} | {means} |"
              for cause, _, means in CAUSES + [("other", "", "The reason in the table.")] if cause in by_cause]
    lines += ["", "## Every model type", "", "| model_type | mapping(s) | answer | reason / notes |",
              "|---|---|---|---|"]
    lines += [f"| `{t}` | {', '.join(m)} | {a} | {n} |" for t, m, a, n in rows]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/coverage.md")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per model_type")
    parser.add_argument("--only", help="comma-separated model types (the table is printed, not written)")
    args = parser.parse_args(argv)

    import peft
    import torch
    import transformers
    from lorabench.models.families import FAMILIES, MULTIMODAL

    types = mapped_types()
    if args.only:
        types = {t: types.get(t, ["(not mapped)"]) for t in args.only.split(",")}
    rows, counts = [], {"described": 0, "traced": 0, "refused": 0}
    for model_type, mappings in types.items():
        got, notes, seconds = answer(model_type, args.timeout)
        if model_type in FAMILIES or model_type in MULTIMODAL:
            notes = f"also traced ({notes})" if got == "traced" else f"the trace is refused: {notes}"
            got = "described"
        counts[got] += 1
        rows.append((model_type, mappings, got, notes))
        print(f"{model_type:32s} {got:9s} {seconds:5.1f} s  {notes}", flush=True)
    header = {"command": "PYTHONPATH=. python3 scripts/coverage.py" + (
                  f" --timeout {args.timeout:g}" if args.timeout != 60 else ""),
              "date": datetime.date.today().isoformat(), "transformers": transformers.__version__,
              "peft": peft.__version__, "torch": torch.__version__,
              "summary": f"{counts['described']} described, {counts['traced']} traced, {counts['refused']} "
                         f"refused ({sum(counts.values())} model types)"}
    text = render(rows, header)
    if not args.only:
        with open(args.out, "w") as f:
            f.write(text)
    print(text if args.only else header["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
