"""lorabench's Python API: the answers of `lorabench params`, `memory` and `fit` as the rows their `-f json`
prints, for a notebook or a script. It imports no torch.

    import lorabench

    rows = lorabench.estimate(model="llama-3-8b", method="lora", rank=16, gpu="RTX-4090")
    rows[0]["fits"], rows[0]["peak_bytes"], rows[0]["fix"]       # the CLI's JSON fields, in bytes
    lorabench.fit(model="llama-3-8b", method="lora", gpu="RTX-4090")["limits"][0]["max_seq_len"]
    lorabench.count_params(model="llama-3-8b", method="lora", rank=8)[0]["trainable_params"]

Every keyword is the CLI's option with '_' for '-' (batch_size for --batch-size); a list or a comma-separated
string where the CLI repeats an option (method="lora,full", rank=[8, 64], model=[...]). What the CLI prints as
a note on stderr comes as a LorabenchNote warning. Bad input raises LorabenchError with the CLI's message.

The CLI's commands call the same functions (param_answer, memory_answer, fit_answer), so both give the same
numbers by construction.
"""

from __future__ import annotations

import functools
import sys
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from lorabench.bounds import DEFAULT_MODEL, MAX_RANK, check_int
from lorabench.errors import LorabenchError
from lorabench.spelling import api_spelling, option
from lorabench.estimator.cost import CostSetup
from lorabench.estimator.fit import fit_rows, search_cases
from lorabench.estimator.images import ImageInputs, image_inputs
from lorabench.estimator.memory import ALLOCATOR_ALLOWANCE
from lorabench.estimator.setup import QUANTIZED, TrainingSetup, setup_from
from lorabench.estimator.rows import memory_rows, param_rows, usable_methods
from lorabench.estimator.sharding import Parallel
from lorabench.estimator.verdict import add_verdicts
from lorabench.gpus import GPU, get_gpu, gpu_note
from lorabench.measure.answer import ENGINES, is_traced, traced_param_rows, traced_rows
from lorabench.methods import Method, resolve_methods
from lorabench.models.hub import resolve_model, resolve_specs
from lorabench.models.spec import ModelSpec, from_dimension
from lorabench.render.flags import spelled, with_args
from lorabench.render.formats import finite

Note = Callable[[str], None]
Names = Union[str, Iterable[str], None]


class LorabenchNote(UserWarning):
    """A note that comes with an answer (the CLI prints it on stderr): a method left out, a GPU name taken as
    one of several, targets that do not apply."""


def warn(text: str) -> None:
    """text as a LorabenchNote, attributed to the first caller outside lorabench."""
    if text:
        level, frame = 2, sys._getframe(1)
        while frame is not None and frame.f_globals.get("__name__", "").startswith("lorabench"):
            level, frame = level + 1, frame.f_back
        warnings.warn(text, LorabenchNote, stacklevel=level)


# --------------------------------------------------------------------------------------------------
# The answers, shared with the CLI: specs, methods and setup already resolved; notes told to `note`.


def methods_from_all(names: Iterable[str]) -> bool:
    """Whether the methods were asked for as 'all' (then a method a model cannot take is left out, noted)."""
    return any(part.strip().lower() == "all" for n in names for part in n.split(","))


def quantized_methods(methods: Sequence[Method], from_all: bool, setup: TrainingSetup, note: Note):
    """'all' on a quantized base means every method that can run on one; a note names the ones left out."""
    if setup.dtype not in QUANTIZED or not from_all:
        return tuple(methods)
    dropped = [m.name for m in methods if not m.allows_quantized_base]
    if dropped:
        note(f"{', '.join(dropped)} left out: they write the base weights, which a {setup.dtype} base cannot hold.")
    return tuple(m for m in methods if m.allows_quantized_base)


def each_model(specs: Sequence[ModelSpec], methods: Sequence[Method], from_all: bool, ranks: Sequence[int],
               targets, note: Note):
    """(spec, the methods it can take) for each model, in order. With 'all' or several models, a method a
    model cannot take is left out for it with a note (estimator.rows.usable_methods); a method asked for by
    name for one model is refused in one line instead."""
    for spec in specs:
        if not (from_all or len(specs) > 1):
            yield spec, tuple(methods)
            continue
        kept, refused = usable_methods(spec, methods, ranks, targets)
        for m, exc in refused:
            note(f"{spec.name}: {m.name} left out: {exc}")
        yield spec, tuple(kept)


def targets_note(methods: Sequence[Method], targets) -> str:
    """A note when targets were given but no chosen method has targets (full fine-tuning only)."""
    if targets is not None and not any(m.uses_rank for m in methods):
        return f"{option('targets')} does not apply to full fine-tuning, which trains every weight; it is ignored."
    return ""


def param_answer(specs, methods, from_all, ranks, targets, note: Note, engine: str = "auto",
                 peft_config: Optional[str] = None) -> List[Tuple[ModelSpec, List[Dict]]]:
    """`params`: per model, its rows (estimator.rows.param_rows; a traced model's from transformers and PEFT,
    measure.answer.traced_param_rows)."""
    several = from_all or len(specs) > 1
    out = []
    for spec in specs:
        if is_traced(spec, engine, peft_config):
            out.append((spec, traced_param_rows(spec, methods, several, ranks, targets, peft_config, note)))
            continue
        out += [(s, param_rows(s, used, ranks, targets)) for s, used in each_model([spec], methods, several, ranks,
                                                                                targets, note)]
    note(targets_note(methods, targets))  # after the rows: an error above it stays the only line
    return out


def memory_answer(specs, methods, from_all, ranks, targets, setup: TrainingSetup, parallel: Parallel,
                  gpu: Optional[GPU], mfu: Optional[float], allowance: float, cost: Optional[CostSetup],
                  note: Note, engine: str = "auto", peft_config: Optional[str] = None,
                  progress: Note = lambda s: None,
                  images: ImageInputs = ImageInputs()) -> List[Tuple[ModelSpec, List[Dict]]]:
    """`memory`: per model, its rows with their verdicts (fits, the cheapest fix as options, ...): the analytic
    model's for a described model, the tracing engine's (lorabench.measure.answer) for any other, or for every
    model with engine "trace", a PEFT config (peft_config, an adapter_config.json) or images (a vision-language
    model's step with images.count images in each sequence)."""
    methods = quantized_methods(methods, from_all, setup, note)
    several = from_all or len(specs) > 1  # then a method a model cannot take is left out with a note
    out = []
    for spec in specs:
        if is_traced(spec, engine, peft_config, images):
            out.append((spec, spelled(traced_rows(spec, methods, several, ranks, targets, setup, peft_config, gpu,
                                                  mfu, allowance, note, progress, parallel, images, cost))))
            continue
        for spec_, used in each_model([spec], methods, several, ranks, targets, note):
            rows = memory_rows(spec_, used, ranks, targets, setup, gpu, mfu, allowance=allowance, cost=cost,
                               parallel=parallel)
            add_verdicts(spec_, rows, used, targets, setup, gpu, allowance, parallel)
            out.append((spec_, spelled(rows)))
    note(targets_note(methods, targets))
    return out


def fit_answer(specs, methods, from_all, ranks, targets, setup: TrainingSetup, parallel: Parallel, label: str,
               capacity: int, allowance: float, note: Note, engine: str = "auto", peft_config: Optional[str] = None,
               progress: Note = lambda s: None, images: ImageInputs = ImageInputs()) -> Tuple[List[Dict], List[Dict]]:
    """`fit`: the limit rows and the saver ("knob") rows of every model: the analytic model's search for a
    described model, traces (lorabench.measure.tracefit) for any other, or with engine "trace" or a PEFT config."""
    methods = quantized_methods(methods, from_all, setup, note)
    limit_rows: List[Dict] = []
    knob_rows: List[Dict] = []
    several = from_all or len(specs) > 1  # then a method a model cannot take is left out with a note
    for spec in specs:
        if is_traced(spec, engine, peft_config, images):
            from lorabench.measure.tracefit import traced_fit_rows

            limits_, knobs = traced_fit_rows(spec, methods, several, ranks, targets, setup, parallel, label,
                                             capacity, allowance, peft_config, note, progress, images)
            limit_rows += limits_
            knob_rows += [with_args(k) for k in knobs]
            continue
        for spec_, used in each_model([spec], methods, several, ranks, targets, note):
            limits_, knobs = fit_rows(search_cases(spec_, used, ranks, targets, setup, parallel), label, capacity,
                                      allowance)
            limit_rows += limits_
            knob_rows += [with_args(k) for k in knobs]
    note(targets_note(methods, targets))
    return limit_rows, knob_rows


# --------------------------------------------------------------------------------------------------
# The public keyword API.


def _names(value: Names) -> Tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(str(v) for v in value)


def _models(model: Names, config: Names, d: Optional[int], layers: Optional[int],
            traceable: bool = False) -> Tuple[ModelSpec, ...]:
    """The models as the CLI's --model/--config/--d/--layers name them (traceable: a model_type without a
    description as a RawModel, for the tracing engine)."""
    models, configs = _names(model), _names(config)
    if d is not None:
        if models or configs:
            raise LorabenchError("give d or model/config, not both.")
        return (from_dimension(check_int("d", d, 1), check_int("layers", layers or 1, 1)),)
    specs = tuple(resolve_specs(models, configs, traceable=traceable)) or (resolve_model(DEFAULT_MODEL),)
    if layers is not None:
        check_int("layers", layers, 1)
        shallow = [s for s in specs if s.num_layers is not None and layers > s.num_layers]
        if shallow:
            raise LorabenchError(f"{shallow[0].name} has {shallow[0].num_layers} layers; layers cuts a model to "
                                 f"fewer, got {layers}.")
        specs = tuple(s.with_layers(layers) for s in specs)
    return specs


def _methods(method: Names, rank) -> Tuple[Tuple[Method, ...], bool, Tuple[int, ...]]:
    names = _names(method) or ("all",)
    ranks = tuple(rank) if isinstance(rank, (list, tuple)) else (rank,)
    if not ranks:
        raise LorabenchError("no rank given.")
    ranks = tuple(dict.fromkeys(check_int("rank", r, 1, MAX_RANK) for r in ranks))
    return resolve_methods(names), methods_from_all(names), ranks


def _setup(fields: Dict) -> TrainingSetup:
    """A TrainingSetup from the CLI's setup options as keywords; autocast alone implies fp32 weights."""
    known = set(TrainingSetup.__dataclass_fields__) | {"mean_len"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise LorabenchError(f"unknown keyword(s) {', '.join(unknown)}; the setup's are {', '.join(sorted(known))}.")
    setup = setup_from(fields, fields)
    setup.validate()
    return setup


def _parallel(gpus: int, sharding: str, cpu_offload: bool) -> Parallel:
    parallel = Parallel(gpus, sharding, cpu_offload)
    parallel.validate()
    return parallel


def _engine(engine: str, peft_config: Optional[str], from_all: bool) -> None:
    if engine not in ENGINES:
        raise LorabenchError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}.")
    if peft_config is not None and not from_all:
        raise LorabenchError("give method or peft_config, not both: the adapter_config.json names its tuner.")


def _gpu(name: Optional[str]) -> Optional[GPU]:
    if name is None:
        return None
    warn(gpu_note(name))
    return get_gpu(name)



def _keywords(fn):
    """The public functions: their messages and notes name settings as keywords (spelling.api_spelling)."""
    @functools.wraps(fn)
    def wrapper(*args, **kw):
        with api_spelling():
            return fn(*args, **kw)
    return wrapper


@_keywords
def count_params(model: Names = None, *, method: Names = "all", rank=8, targets: Optional[str] = None,
                 config: Names = None, d: Optional[int] = None, layers: Optional[int] = None, engine: str = "auto",
                 peft_config: Optional[str] = None) -> List[Dict]:
    """Exact trainable and total parameter counts: the rows of `lorabench params -f json`.

    Example:
        >>> row = count_params(model="llama-3-8b", method="lora", rank=8)[0]
        >>> row["trainable_params"], row["total_params"]
        (3407872, 8033669120)
    """
    methods, from_all, ranks = _methods(method, rank)
    _engine(engine, peft_config, from_all)
    answer = param_answer(_models(model, config, d, layers, traceable=engine != "analytic"), methods, from_all, ranks,
                          targets, warn, engine=engine, peft_config=peft_config)
    return finite([r for _, rows in answer for r in rows])


@_keywords
def estimate(model: Names = None, *, method: Names = "all", rank=8, targets: Optional[str] = None,
             gpu: Optional[str] = None, gpus: int = 1, sharding: str = "none", cpu_offload: bool = False,
             headroom: float = round(100 * ALLOCATOR_ALLOWANCE, 1), mfu: Optional[float] = None,
             tokens: Optional[int] = None, dataset_tokens: Optional[int] = None, epochs: Optional[float] = None,
             price: Optional[float] = None, config: Names = None, d: Optional[int] = None,
             layers: Optional[int] = None, engine: str = "auto", peft_config: Optional[str] = None,
             images: Optional[int] = None, image_size=None, **setup) -> List[Dict]:
    """GPU memory, step time and (with tokens) cost of one training step: the rows of `lorabench memory -f json`,
    verdict included (fits, spare_bytes, largest_component, fix and fix_alternative as the options to add).

    setup: the CLI's setup options as keywords (batch_size, seq_len, dtype, optimizer, grad_checkpointing,
    loop, loss, autocast, impl, ...; padding "longest"/"max", packing, padding_free, and the examples' lengths as
    lengths: a file of them, or a list, or as mean_len: their mean, seq_len being the longest). engine: "auto" (the analytic model for a described family, else a trace of
    transformers + PEFT), "analytic" or "trace"; peft_config: a PEFT adapter_config.json, traced. images: images
    in each sequence of a vision-language model (traced; their tokens are part of seq_len), image_size: their
    size as "HxW" or (h, w) (default: the size the family's processor gives, from the config).

    Example:
        >>> row = estimate(model="llama-3-8b", method="lora", rank=16, gpu="RTX-4090", seq_len=4096)[0]
        >>> row["fits"], row["fix"]["args"]
        (False, ['--grad-checkpointing', '--loss', 'fused-linear'])
    """
    methods, from_all, ranks = _methods(method, rank)
    chosen = _gpu(gpu)
    cost = None
    if tokens is not None or dataset_tokens is not None:
        if chosen is None:
            raise LorabenchError("tokens/dataset_tokens need a gpu: time and cost are for a GPU.")
        if tokens is not None and dataset_tokens is not None:
            raise LorabenchError("give tokens (all tokens trained) or dataset_tokens with epochs, not both.")
        cost = CostSetup(tokens=tokens, dataset_tokens=dataset_tokens, epochs=1.0 if epochs is None else epochs,
                         price_per_gpu_hour=price)
    elif epochs is not None or price is not None:
        raise LorabenchError("epochs and price need tokens or dataset_tokens.")
    _engine(engine, peft_config, from_all)
    pictures = image_inputs(images, image_size)
    answer = memory_answer(_models(model, config, d, layers, traceable=engine != "analytic"), methods, from_all,
                           ranks, targets, _setup(setup), _parallel(gpus, sharding, cpu_offload), chosen, mfu,
                           _headroom(headroom), cost, warn, engine=engine, peft_config=peft_config, images=pictures)
    return finite([r for _, rows in answer for r in rows])


@_keywords
def fit(model: Names = None, *, gpu: Optional[str] = None, gpu_memory: Optional[float] = None,
        method: Names = "all", rank=8, targets: Optional[str] = None, gpus: int = 1, sharding: str = "none",
        cpu_offload: bool = False, headroom: float = round(100 * ALLOCATOR_ALLOWANCE, 1), config: Names = None,
        d: Optional[int] = None, layers: Optional[int] = None, engine: str = "auto",
        peft_config: Optional[str] = None, images: Optional[int] = None, image_size=None,
        **setup) -> Dict[str, List[Dict]]:
    """What fits a GPU: {"limits": [...], "knobs": [...]}, as `lorabench fit -f json` prints it (the largest
    batch, sequence and rank per case; each saver combination and whether the setup then fits). engine and
    peft_config, images and image_size as in estimate: a traced model's limits are found by traces (seconds
    each, then cached).

    Example:
        >>> limits = fit(model="llama-3-8b", method="lora", gpu="RTX-4090")["limits"][0]
        >>> limits["fits"], limits["max_seq_len"]
        (False, 1013)
    """
    if (gpu is None) == (gpu_memory is None):
        raise LorabenchError("give gpu=NAME or gpu_memory=GIB (one of them).")
    if gpu is not None:
        chosen = _gpu(gpu)
        label, capacity = chosen.name, chosen.memory_bytes
    else:
        if not (isinstance(gpu_memory, (int, float)) and 0 < gpu_memory <= 1e6):
            raise LorabenchError(f"gpu_memory must be a size in GiB in (0, 1e6], got {gpu_memory!r}.")
        label, capacity = f"{gpu_memory:g} GiB GPU", int(gpu_memory * 2 ** 30)
    methods, from_all, ranks = _methods(method, rank)
    _engine(engine, peft_config, from_all)
    pictures = image_inputs(images, image_size)
    limits, knobs = fit_answer(_models(model, config, d, layers, traceable=engine != "analytic"), methods, from_all,
                               ranks, targets, _setup(setup), _parallel(gpus, sharding, cpu_offload), label,
                               capacity, _headroom(headroom), warn, engine=engine, peft_config=peft_config,
                               images=pictures)
    return finite({"limits": limits, "knobs": knobs})


def _headroom(percent: float) -> float:
    if not (isinstance(percent, (int, float)) and 0 <= percent <= 90):
        raise LorabenchError(f"headroom must be a percentage in [0, 90], got {percent!r}.")
    return percent / 100


def model_rows() -> List[Dict]:
    """The presets with their exact parameter counts and shapes: `lorabench models -f json`."""
    from lorabench.estimator.params import count_base_params
    from lorabench.models.presets import PRESETS

    return [{"model": s.name, "params": count_base_params(s), "hidden_size": s.hidden_size,
             "intermediate_size": s.intermediate_size, "layers": s.num_layers, "heads": s.num_heads,
             "kv_heads": s.num_kv_heads, "vocab_size": s.vocab_size, "tied_embeddings": s.tie_embeddings,
             "num_experts": s.num_experts or None, "experts_per_token": s.experts_per_token or None,
             "expert_intermediate_size": s.expert_intermediate_size or None}
            for s in PRESETS.values()]


def gpu_rows() -> List[Dict]:
    """The GPU catalog with its servers, networks and dated prices, each with its source: `lorabench gpus
    -f json`."""
    from lorabench.gpus import GPUS, PRICES, node_of

    rows = []
    for g in GPUS.values():
        price, node = PRICES.get(g.name), node_of(g)
        rows.append({"gpu": g.name, "memory_bytes": g.memory_bytes, "bf16_flops": g.bf16_flops,
                     "fp32_flops": g.fp32_flops, "bandwidth_bytes_s": g.bandwidth_bytes_s,
                     "interconnect": g.interconnect, "interconnect_bytes_s": g.interconnect_bytes_s,
                     "gpus_per_node": node.gpus, "network": node.network or None,
                     "network_bytes_s": node.network_bytes_s or None, "node_source": node.source,
                     "usd_per_gpu_hour": price.usd_per_gpu_hour if price else None,
                     "price_source": price.source if price else None, "source": g.source})
    return rows
