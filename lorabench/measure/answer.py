"""The tracing engine's answers (lorabench.api calls them): when a model is traced rather than described, what
PEFT applies to it, and its `memory` rows, from the cache (measure.tracecache) when it holds them. This module
imports no torch: a cached answer needs none, and a trace imports it (lorabench.measure.traced) only then.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Union

from lorabench.errors import LorabenchError
from lorabench.estimator.images import ImageInputs
from lorabench.estimator.cost import CostSetup
from lorabench.estimator.optimizer import OPTIMIZERS
from lorabench.estimator.parallel import Parallel
from lorabench.estimator.setup import QUANTIZED, TrainingSetup
from lorabench.estimator.traced_rows import gpu_fields, targets_text, traced_row
from lorabench.estimator.tuner import Tuner, file_tuner, method_tuner
from lorabench.extras import require
from lorabench.gpus import GPU
from lorabench.measure import tracecache
from lorabench.methods import Method
from lorabench.models.hfwrite import hf_config_dict
from lorabench.models.raw import RawModel, canonical
from lorabench.models.spec import ModelSpec
from lorabench.spelling import option

ENGINES = ("auto", "analytic", "trace")
TRACED_SHARDINGS = ("zero2", "fsdp")  # rank 0 traced in a fake process group (measure.fakerank)
Note = Callable[[str], None]


def is_traced(model: Union[ModelSpec, RawModel], engine: str, peft_config: Optional[str],
              images: ImageInputs = ImageInputs()) -> bool:
    """Whether the tracing engine answers for model: it has no description, or the trace was asked for
    (engine "trace"), or a PEFT config or images were given. engine "analytic" with any of those is refused."""
    traced = isinstance(model, RawModel) or engine == "trace" or peft_config is not None or images.count > 0
    if traced and engine == "analytic":
        if isinstance(model, RawModel):
            raise LorabenchError(model.refusal)
        if images.count:
            raise LorabenchError(f"{option('images')} is traced: give {option('engine', 'auto')} or "
                                 f"{option('engine', 'trace')}.")
        raise LorabenchError(f"{option('peft_config')} is traced: give {option('engine', 'auto')} or "
                             f"{option('engine', 'trace')}.")
    if traced and not isinstance(model, RawModel) and model.single_matrix:
        raise LorabenchError(f"{model.name} is a weight matrix, not a model transformers builds: it is not traced.")
    return traced


def as_raw(model: Union[ModelSpec, RawModel]) -> RawModel:
    """A described model as the config.json transformers builds it from (models.hfwrite)."""
    if isinstance(model, RawModel):
        return model
    return RawModel(model.name, canonical(hf_config_dict(model)), notes=tuple(model.notes))


def tuners(raw: RawModel, methods: Sequence[Method], from_all: bool, ranks: Sequence[int], targets,
           setup: TrainingSetup, peft_config: Optional[str], note: Note) -> List[Tuner]:
    """What PEFT applies, per row: the adapter_config.json's tuner, or each method at each rank (a method PEFT
    has not, left out with a note when the methods came from 'all')."""
    if peft_config is not None:
        return [file_tuner(peft_config)]
    out = []
    for method in methods:
        for rank in (ranks if method.uses_rank else (None,)):
            try:
                out.append(method_tuner(method, rank, raw.model_type, targets, setup))
            except LorabenchError as exc:
                if not from_all:
                    raise
                note(f"{raw.name}: {method.name} left out: {exc}")
                break
    return out


def not_traced(sharding: str) -> str:
    """Why `sharding` is not traced, in one line (measure.fakerank says more)."""
    why = " (DDP's C++ Reducer allocates its gradient buckets outside the fake tensors)" if sharding == "ddp" else ""
    return f"{option('sharding', sharding)} is not traced{why}; traced: {', '.join(TRACED_SHARDINGS)}."


def check_parallel(parallel: Parallel, setup: TrainingSetup) -> None:
    """Refuse, in one line each, the data-parallel steps the tracing engine does not trace.

    Raises:
        LorabenchError: DDP, --cpu-offload, or a loss computed outside the model's forward.
    """
    if parallel.single:
        return
    if parallel.cpu_offload:
        raise LorabenchError(f"{option('cpu_offload')} is not traced: FSDP2's CPUOffloadPolicy moves tensors "
                             "between devices, which one CPU trace cannot tell apart.")
    if parallel.sharding not in TRACED_SHARDINGS:
        raise LorabenchError(not_traced(parallel.sharding))
    if setup.loss != "standard":
        raise LorabenchError(f"{option('loss', setup.loss)} computes the loss outside the model's forward, which "
                             "fully_shard wraps: a sharded step is traced with the standard loss.")
    if setup.dtype in QUANTIZED:
        raise LorabenchError(f"a quantized base ({setup.dtype}) is not traced under "
                             f"{option('sharding', parallel.sharding)} yet (its packed storage is quantized on one "
                             "process); the analytic model answers for the described families.")
    if OPTIMIZERS[setup.optimizer].bnb_class:
        raise LorabenchError(f"{option('optimizer', setup.optimizer)} is not traced under "
                             f"{option('sharding', parallel.sharding)}: bitsandbytes' step takes plain tensors, "
                             "not fully_shard's DTensors.")


def _cached(key: str, job: str, compute: Callable[[], Dict]) -> Dict:
    """What compute() gives, from the cache under key (marked "cached"), else computed now and kept; a miss needs
    the trace extra (torch, transformers, PEFT), named in one line where it is missing."""
    found = tracecache.load(key)
    if found is not None:
        found["cached"] = True
        return found
    require("trace", job)
    result = compute()
    tracecache.store(key, result)
    return result


def trace_result(raw: RawModel, tuner: Tuner, setup: TrainingSetup, progress: Note,
                 parallel: Parallel = Parallel(), images: ImageInputs = ImageInputs()) -> Dict:
    """The trace of one step (rank 0's under parallel; with images, a vision-language model's with that many
    images in each sequence): from the cache, else traced now (and kept)."""
    def trace() -> Dict:
        from lorabench.measure.traced import trace_model

        return trace_model(raw, tuner, setup, progress, sharding=parallel.sharding, gpus=parallel.gpus,
                           images=images)
    return _cached(tracecache.trace_key(raw, tuner, setup, parallel=parallel, images=images), f"tracing {raw.name}",
                   trace)


def check_images(raw: RawModel, images: ImageInputs, parallel: Parallel) -> None:
    """Refuse, in one line, images the tracing engine cannot give raw (before anything is built).

    Raises:
        LorabenchError: images on a model without a vision_config, or under a sharded step.
    """
    if not images.count:
        return
    if not isinstance(raw.config.get("vision_config"), dict):
        raise LorabenchError(f"{option('images')}: {raw.name} is a text-only model (its config has no "
                             "vision_config).")
    if not parallel.single:
        raise LorabenchError(f"{option('images')} is traced on one GPU's step; a sharded step with images is not "
                             "traced yet.")


def count_result(raw: RawModel, tuner: Tuner, setup: TrainingSetup) -> Dict:
    """The counts of tuner on raw: from the cache, else built on the meta device now (and kept)."""
    def count() -> Dict:
        from lorabench.measure.traced import count_model

        return count_model(raw, tuner, setup)
    return _cached(tracecache.trace_key(raw, tuner, setup, kind="counts"), f"counting {raw.name}'s parameters", count)


def traced_param_rows(model: Union[ModelSpec, RawModel], methods: Sequence[Method], from_all: bool,
                      ranks: Sequence[int], targets, peft_config: Optional[str], note: Note) -> List[Dict]:
    """`params` rows of a traced model: transformers' and PEFT's own counts, one row per tuner."""
    raw, setup = as_raw(model), TrainingSetup()
    notes = list(raw.notes) + ([f"{raw.model_type} has no description in lorabench: counted by transformers and "
                                "PEFT."] if isinstance(model, RawModel) else [])
    rows = []
    for tuner in tuners(raw, methods, from_all, ranks, targets, setup, peft_config, note):
        c = count_result(raw, tuner, setup)
        base, trainable, total = c["base_params"], c["trainable_params"], c["total_params"]
        rows.append({
            "model": raw.name, "engine": "trace", "method": tuner.name, "rank": tuner.rank,
            "targets": targets_text(c.get("targets")),
            "trainable_params": trainable, "total_params": total,
            "trainable_pct": 100.0 * trainable / total if total else 0.0, "base_params": base,
            "adapter_params": total - base, "pct_of_full": 100.0 * trainable / base if base else 0.0,
            "reduction": base / trainable if trainable else None, "shared_buffer_numel": c["shared_buffer_numel"],
            "updates_base_weights": tuner.updates_base, "active_params": None, "family": raw.model_type,
            "notes": list(dict.fromkeys(notes + list(c.get("notes", ())))),
        })
    return rows


def traced_rows(model: Union[ModelSpec, RawModel], methods: Sequence[Method], from_all: bool, ranks: Sequence[int],
                targets, setup: TrainingSetup, peft_config: Optional[str], gpu: Optional[GPU],
                mfu: Optional[float], allowance: float, note: Note, progress: Note = lambda s: None,
                parallel: Parallel = Parallel(), images: ImageInputs = ImageInputs(),
                cost: Optional[CostSetup] = None) -> List[Dict]:
    """`memory` rows of a traced model, one per tuner, with the GPU's verdict and step time (with cost, the
    training run's time and dollars); under parallel, rank 0's; with images, a vision-language model's step with
    that many images in each sequence."""
    check_parallel(parallel, setup)
    raw = as_raw(model)
    check_images(raw, images, parallel)
    notes = list(raw.notes)
    if isinstance(model, RawModel):
        notes.append(f"{raw.model_type} has no description in lorabench: traced.")
    rows = []
    for tuner in tuners(raw, methods, from_all, ranks, targets, setup, peft_config, note):
        result = trace_result(raw, tuner, setup, progress, parallel, images)
        row = traced_row(raw.name, tuner, result, setup, notes, parallel)
        gpu_fields(row, result, gpu, allowance, mfu, setup, cost, parallel)
        if gpu is not None:
            from lorabench.measure.tracefit import traced_verdict

            traced_verdict(row, result, raw, tuner, setup, parallel, gpu.memory_bytes, allowance, progress, images)
        rows.append(row)
    return rows


__all__ = ["ENGINES", "TRACED_SHARDINGS", "not_traced", "check_parallel", "check_images", "is_traced", "as_raw",
           "tuners", "trace_result", "count_result", "traced_param_rows", "traced_rows"]
