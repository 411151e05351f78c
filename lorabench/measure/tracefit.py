"""`lorabench fit` for a traced model: the largest batch, sequence and rank that fit a GPU, and which savers make
the setup fit, each answered by traces of the step (measure.answer.trace_result, cached per setup) instead of the
analytic model. The rows are estimator.fit.fit_rows' rows, with "engine": "trace". No torch at import.

How few traces. A step's peak is nearly affine in the batch, the sequence and the rank (the largest of its ops'
sizes, each affine in them, or quadratic in the sequence for eager attention's scores), so
estimator.fit.largest_within finds each limit from the traces either side of the GPU's memory, and checks it: the
answer fits and one more does not, by trace. Each trace sums the depth per layer kind (measure.traced).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from lorabench.errors import LorabenchError
from lorabench.estimator.images import ImageInputs
from lorabench.estimator.fit import SAVERS, Fix, Saver, Subject, _divisors_below, combos, round_down
from lorabench.estimator.search import largest_within
from lorabench.estimator.verdict import fix_dict
from lorabench.estimator.parallel import Parallel
from lorabench.estimator.setup import TrainingSetup
from lorabench.estimator.traced_rows import assumed, depth_note, needed_bytes, rank_note, targets_text
from lorabench.estimator.tuner import Tuner, method_tuner
from lorabench.measure.answer import as_raw, check_images, check_parallel, count_result, trace_result, tuners
from lorabench.methods import METHODS, Method
from lorabench.models.raw import RawModel
from lorabench.models.spec import ModelSpec

Note = Callable[[str], None]
MAX_BATCH = 1 << 20  # the analytic fit's search bounds (estimator.fit.limits)
MAX_SEQ = 1 << 24
# Savers the trace does not run, and why
NOT_TRACED = {"fused-loss": "Liger's fused linear cross-entropy runs Triton kernels, which a trace on the CPU does "
                            "not run"}
# ... and under a sharded step (measure.answer.check_parallel refuses them as given)
NOT_SHARDED = {"adamw-8bit": "bitsandbytes' 8-bit step takes plain tensors, not fully_shard's DTensors",
               "nf4": "a quantized base is not traced under sharding"}


def _savers(tuner: Tuner, setup: TrainingSetup, softcap: bool, parallel: Parallel) -> List[Saver]:
    """The savers (estimator.fit.SAVERS, by their own rules) that apply to a traced step and that a trace runs:
    not those NOT_TRACED, nor NOT_SHARDED under a sharded step; an nf4 base only under an adapter the trace puts on
    one (not DoRA, whose magnitude PEFT computes from dequantized weights: measure.traced)."""
    who = Subject(quantizable_base=not tuner.updates_base and not tuner.config.get("use_dora"), softcap=softcap)
    left_out = set(NOT_TRACED) | (set(NOT_SHARDED) if not parallel.single else set())
    return [x for x in SAVERS if x.key not in left_out and x.applies(setup, who)]


def _softcap(raw: RawModel) -> bool:
    config = raw.config.get("text_config") if isinstance(raw.config.get("text_config"), dict) else raw.config
    return bool(config.get("final_logit_softcapping"))


class _Oracle:
    """What one (model, tuner) needs per GPU under each setup: a trace (cached), read as the memory row reads it."""

    def __init__(self, raw: RawModel, parallel: Parallel, allowance: float, progress: Note,
                 images: ImageInputs = ImageInputs(), known: Optional[Dict] = None):
        self.raw, self.parallel, self.allowance, self.progress = raw, parallel, allowance, progress
        self.images = images
        self.known: Dict[Tuple[Tuner, TrainingSetup], Dict] = dict(known or {})  # traces already made

    def result(self, tuner: Tuner, setup: TrainingSetup) -> Dict:
        if (tuner, setup) not in self.known:
            self.known[tuner, setup] = trace_result(self.raw, tuner, setup, self.progress, self.parallel,
                                                    self.images)
        return self.known[tuner, setup]

    def required(self, tuner: Tuner, setup: TrainingSetup) -> Tuple[int, int]:
        """(the peak plus the runtime, that plus the allocator allowance on the peak)."""
        return needed_bytes(self.result(tuner, setup), setup, self.allowance)

    def need(self, tuner: Tuner, setup: TrainingSetup) -> int:
        return self.required(tuner, setup)[1]

    def fits(self, tuner: Tuner, setup: TrainingSetup, capacity: int) -> bool:
        """Whether the step fits; one the trace refuses (a saver that cannot apply here) never does."""
        try:
            return self.need(tuner, setup) <= capacity
        except LorabenchError:
            return False


def _narrowest(raw: RawModel, tuner: Tuner, setup: TrainingSetup) -> int:
    """The largest rank worth searching: the narrowest side of the projections PEFT adapts (estimator.fit.max_rank)."""
    return max(1, count_result(raw, tuner, setup)["narrowest"])


def _rank_tuner(tuner: Tuner, method: Optional[Method], model_type: str, targets, setup: TrainingSetup):
    """tuner at another rank (a lorabench method's), or None where the rank is not one to vary (full, a PEFT
    config from a file)."""
    if method is None or tuner.rank is None:
        return None
    return lambda r: method_tuner(method, r, model_type, targets, setup)


def traced_fit_rows(model: Union[ModelSpec, RawModel], methods: Sequence[Method], from_all: bool,
                    ranks: Sequence[int], targets, setup: TrainingSetup, parallel: Parallel, label: str,
                    capacity: int, allowance: float, peft_config: Optional[str], note: Note,
                    progress: Note = lambda s: None,
                    images: ImageInputs = ImageInputs()) -> Tuple[List[Dict], List[Dict]]:
    """`lorabench fit`'s limit and saver rows for a traced model (estimator.fit.fit_rows' fields and meaning);
    with images, a vision-language model's, each sequence carrying them (its image tokens and one more at least).

    Raises:
        LorabenchError: what the tracing engine does not trace (measure.answer.check_parallel), or cannot.
    """
    check_parallel(parallel, setup)
    raw = as_raw(model)
    check_images(raw, images, parallel)
    limit_rows: List[Dict] = []
    knob_rows: List[Dict] = []
    oracle = _Oracle(raw, parallel, allowance, progress, images)
    softcap = _softcap(raw)
    skipped = ([f"the fused loss is not among the savers: {NOT_TRACED['fused-loss']}."]
               if setup.loss == "standard" and setup.device == "cuda" else [])
    if not parallel.single:
        skipped += [f"8-bit AdamW and an nf4 base are not among the savers under {parallel.sharding}: "
                    f"{NOT_SHARDED['adamw-8bit']}; {NOT_SHARDED['nf4']}."]
    for tuner in tuners(raw, methods, from_all, ranks, targets, setup, peft_config, note):
        method = METHODS.get(tuner.name) if peft_config is None else None
        first = oracle.result(tuner, setup)
        required, need = oracle.required(tuner, setup)

        def varying(key: str) -> Callable[[int], int]:
            return lambda n: oracle.need(tuner, replace(setup, **{key: n}))

        progress(f"{tuner.name}: the largest batch that fits")
        batch = largest_within(varying("batch_size"), capacity, 1, MAX_BATCH, start=setup.batch_size)
        progress(f"{tuner.name}: the longest sequence that fits")
        shortest = first.get("image_tokens", 0) + 1  # a sequence holds its images' tokens
        seq = largest_within(varying("seq_len"), capacity, shortest, MAX_SEQ, start=setup.seq_len)
        rank = None
        at_rank = _rank_tuner(tuner, method, raw.model_type, targets, setup)
        if at_rank is not None:
            progress(f"{tuner.name}: the largest rank that fits")
            rank = largest_within(lambda r: oracle.need(at_rank(r), setup), capacity, 1,
                                  _narrowest(raw, tuner, setup), start=tuner.rank)
        base = {"model": raw.name, "engine": "trace", "method": tuner.name, "rank": tuner.rank,
                "targets": targets_text(first.get("targets")), "gpu": label, "gpu_memory_bytes": capacity,
                "allowance_fraction": allowance, "batch_size": setup.batch_size, "seq_len": setup.seq_len,
                "gpus": parallel.gpus, "sharding": parallel.sharding, "cpu_offload": parallel.cpu_offload,
                "padding": setup.padding, "packing": setup.packing, "padding_free": setup.padding_free}
        if images.count:
            base.update({k: first[k] for k in ("images", "image_size", "image_tokens")})
        notes = list(raw.notes) + list(first.get("notes", ())) + [depth_note(first), rank_note(parallel)] + [
            "each limit found by traces and checked by them: it fits, and one more does not" +
            ("; a PEFT config from a file keeps its own size: no rank is searched (max_rank null)"
             if peft_config is not None else "") + ".", assumed(setup)] + skipped
        limit_rows.append({**base, "fits": need <= capacity, "required_bytes": required,
                           "spare_bytes": capacity - need, "max_batch_size": batch, "max_seq_len": seq,
                           "max_rank": rank, "max_positions": None,
                           "notes": [n for n in dict.fromkeys(notes) if n]})
        for c in combos(setup, _savers(tuner, setup, softcap, parallel)):
            progress(f"{tuner.name}: {' + '.join(c.kinds) or 'as given'}")
            try:
                got, left = oracle.required(tuner, c.setup)
            except LorabenchError as exc:  # a combination the trace refuses: said, not guessed
                note(f"{raw.name}: {tuner.name} with {' + '.join(c.kinds)} left out: {exc}")
                continue
            knob_rows.append({**base, "change": " + ".join(c.kinds) or "as given", "changes": c.changes,
                              "fits": left <= capacity, "required_bytes": got, "spare_bytes": capacity - left,
                              "max_seq_len": None})  # (not searched: a few traces for each combination)
    return limit_rows, knob_rows


def _fixes(oracle: _Oracle, tuner: Tuner, setup: TrainingSetup, capacity: int, softcap: bool,
           shortest: int = 1) -> Iterator[Fix]:
    """The changes that make a traced step fit, cheapest first (estimator.fit.fixes' order), each traced when it
    is reached: the savers alone and together; a smaller micro-batch with accumulation that keeps the sequences
    of a step; a shorter sequence at batch 1, of at least `shortest` tokens (where it keeps half the sequence,
    or nothing else fits). More GPUs and CPU offload are not searched. Savers only take bytes away, so a
    combination inside one that does not fit is not traced."""
    kept = 0

    def fix(kinds, steps, changes, changed: TrainingSetup) -> Fix:
        required, need = oracle.required(tuner, changed)
        return Fix(tuple(kinds), tuple(changes), None, required, capacity - need, tuple(steps))

    found = combos(setup, _savers(tuner, setup, softcap, oracle.parallel))
    missing: List[set] = []  # the savers of combinations that do not fit
    for c in found[1:]:
        if any(set(c.steps) <= m for m in missing):
            continue
        if oracle.fits(tuner, c.setup, capacity):
            kept += 1
            yield fix(c.kinds, c.steps, c.changes, c.setup)
        else:
            missing.append(set(c.steps))
    sequences = setup.batch_size * setup.grad_accum
    for c in found:  # the fewest savers that, with smaller micro-batches, fit
        smaller = [replace(c.setup, batch_size=b, grad_accum=sequences // b)
                   for b in _divisors_below(sequences, setup.batch_size)]
        fitting = next((x for x in smaller if oracle.fits(tuner, x, capacity)), None)
        if fitting is not None:
            kept += 1
            yield fix(c.kinds + ("batch",), c.steps + ("batch",), c.changes + (
                ("batch_size", fitting.batch_size), ("grad_accum", fitting.grad_accum)), fitting)
            break
    for c in (found[0], found[-1]) if len(found) > 1 else found:  # as given, and with every saver
        one = replace(c.setup, batch_size=1)
        if setup.seq_len <= shortest or oracle.fits(tuner, one, capacity):
            continue
        n = largest_within(lambda k: oracle.need(tuner, replace(one, seq_len=k)), capacity, shortest,
                           setup.seq_len - 1)
        if n is not None and (2 * round_down(n) >= setup.seq_len or not kept):
            n = max(round_down(n), shortest)
            batch = (("batch_size", 1),) if setup.batch_size > 1 else ()
            yield fix(c.kinds + ("sequence",), c.steps + ("sequence",), c.changes + batch + (("seq_len", n),),
                      replace(one, seq_len=n))
            break


def _first_two(found: Iterator[Fix]) -> Tuple[Optional[Fix], Optional[Fix]]:
    """The cheapest fix and estimator.verdict.alternative's, reading (tracing) no further than they need: the
    first of other steps ends the search; the first that does not merely add steps waits for it."""
    first = next(found, None)
    if first is None:
        return None, None
    steps, fallback = set(first.steps), None
    for f in found:
        if not set(f.steps) & steps:
            return first, f
        if fallback is None and not steps <= set(f.steps):
            fallback = f
    return first, fallback


FIX_NOTE = ("a 'no' is fixed by traces: the savers (checkpointing, 8-bit AdamW, an nf4 base, the chunked loss on a "
            "CPU) alone and together, smaller micro-batches, a shorter sequence; more GPUs and CPU offload are not "
            "searched for a traced model.")


def traced_verdict(row: Dict, result: Dict, raw: RawModel, tuner: Tuner, setup: TrainingSetup,
                   parallel: Parallel, capacity: int, allowance: float, progress: Note = lambda s: None,
                   images: ImageInputs = ImageInputs()) -> None:
    """A traced memory row (of the trace `result`) that does not fit gets its fix and fix_alternative
    (estimator.verdict's fields), found by traces (with images: a sequence keeps its image tokens and one more);
    in place."""
    if row["fits"]:
        return
    progress(f"{tuner.name}: what makes it fit")
    oracle = _Oracle(raw, parallel, allowance, progress, images, known={(tuner, setup): result})
    first, other = _first_two(_fixes(oracle, tuner, setup, capacity, _softcap(raw),
                                     shortest=row.get("image_tokens", 0) + 1))
    row["fix"], row["fix_alternative"] = fix_dict(first), fix_dict(other)
    row["notes"].append(FIX_NOTE)


__all__ = ["NOT_TRACED", "traced_fit_rows", "traced_verdict"]
