"""Does a step fit a GPU, and what makes it fit. Pure Python: every answer is a search over the estimator.

- `overflow`: the component that overflows; `cheapest_fix`: the cheapest change that makes a "no" fit.
- `fixes`: every change (checkpointing, a fused loss, 8-bit AdamW, an nf4 base, smaller micro-batches, more
  GPUs, CPU offload, a shorter sequence) that makes a setup fit, the ones that keep the data first.
- `limits`: the largest batch size, sequence length and rank that fit.

"Fits" counts the allocator's headroom: the caching allocator reserves more than it hands out (rounding to
its block sizes, fragmentation), and a step whose allocated peak is a few MiB under the card's memory still
fails to reserve its next block. See memory.ALLOCATOR_ALLOWANCE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Sequence, Tuple

from lorabench.errors import LorabenchError
from lorabench.estimator.rows import positions_note
from lorabench.estimator.memory import ALLOCATOR_ALLOWANCE, StepParts, need_bytes, step_parts
from lorabench.estimator.setup import QUANTIZED, TrainingSetup
from lorabench.estimator.params import count_params
from lorabench.estimator.case import Case
from lorabench.estimator.sharding import MAX_GPUS, Parallel, fewest_gpus, plan_need_bytes, plan_step
from lorabench.models.spec import ModelSpec

# The components a row reports, in the order a "why not" names them.
COMPONENTS = (("weights_bytes", "weights"), ("adapter_bytes", "adapter weights"), ("gradients_bytes", "gradients"),
              ("optimizer_bytes", "optimizer states"), ("master_bytes", "fp32 master weights"),
              ("method_state_bytes", "method state"), ("activations_bytes", "activations"),
              ("logits_bytes", "logits"), ("gather_bytes", "all-gathered parameters"), ("bucket_bytes", "DDP buckets"))


def required_bytes(case: Case) -> int:
    """What each GPU must hold: the peak over the phases plus the runtime outside the allocator."""
    return plan_need_bytes(plan_step(case), case.parallel, 0.0)


def spare_bytes(case: Case, capacity: int, fraction: float = ALLOCATOR_ALLOWANCE) -> int:
    """capacity minus what each GPU of the case needs with its allocator allowance: >= 0 means it fits."""
    return capacity - plan_need_bytes(plan_step(case), case.parallel, fraction)


def fits(case: Case, capacity: int, fraction: float = ALLOCATOR_ALLOWANCE) -> bool:
    try:
        return spare_bytes(case, capacity, fraction) >= 0
    except LorabenchError:  # not a valid setup (a rank no layer can take, full on nf4): never "fits"
        return False


# --------------------------------------------------------------------------------------------------
# Changes that make a case fit.


# A change is data: the fields it sets, in order, each a TrainingSetup or Parallel field and its value
# ((("grad_checkpointing", True),), or (("batch_size", 2), ("grad_accum", 4))). Only the CLI's layer spells
# them as options (render.flags.args).
Change = Tuple[Tuple[str, object], ...]


@dataclass(frozen=True)
class Fix:
    """A change to the setup, and what the case then needs.

    Attributes:
        kinds: what was changed, cheapest first ("checkpointing", "batch", "8-bit AdamW", "nf4", "sequence",
            "GPUs"): labels to show, never compared.
        steps: the same as keys ("checkpointing", "batch", "adamw-8bit", "nf4", "sequence", "gpus"): what
            answers compare (an alternative fix is one of other steps).
        changes: the fields set, in order (Change): (("grad_checkpointing", True), ("batch_size", 2),
            ("grad_accum", 2)); on more GPUs ("gpus", N), ("sharding", "fsdp").
        case: the changed case.
        required_bytes: its peak plus runtime (per GPU).
        spare_bytes: the capacity left after the allowance.
    """

    kinds: Tuple[str, ...]
    changes: Change
    case: Case
    required_bytes: int
    spare_bytes: int
    steps: Tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return " + ".join(self.kinds)


def _largest(lo: int, hi: int, ok: Callable[[int], bool]) -> Optional[int]:
    """The largest n in [lo, hi] with ok(n), for ok true up to some n and false after; None if ok(lo) fails."""
    if not ok(lo):
        return None
    if ok(hi):
        return hi
    while hi - lo > 1:  # ok(lo), not ok(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


@dataclass(frozen=True)
class Saver:
    """An on/off memory saver: it changes neither the data (batch, sequence) nor the GPUs.

    Attributes:
        key: its name, compared where answers tell fixes apart.
        kind: its label in answers.
        change: the setup fields it sets.
        applies: whether it applies to a setup of a subject (not on already, and possible there).
        with_more_gpus: whether the "more GPUs" fix may add it. Quantizing the base changes the weights that
            are trained on; a fix that already adds GPUs keeps them as given.
    """

    key: str
    kind: str
    change: Change
    applies: Callable[[TrainingSetup, "Subject"], bool]
    with_more_gpus: bool = True


@dataclass(frozen=True)
class Subject:
    """What the savers' rules read beyond the setup: whether the trained method may sit on a quantized base (an
    adapter on a frozen W), and whether the model soft-caps its logits (which the chunked loss cannot)."""

    quantizable_base: bool
    softcap: bool


def subject(case: Case) -> Subject:
    """A described case's Subject: its method's and its family's."""
    return Subject(case.method.allows_quantized_base, bool(case.spec.final_softcap))


# The savers, cheapest first.
SAVERS = (
    # recomputes each layer in backward: the same result, about a third more compute
    Saver("checkpointing", "checkpointing", (("grad_checkpointing", True),),
          lambda setup, who: not setup.grad_checkpointing),
    # Liger's fused linear cross-entropy (transformers' use_liger_kernel): the same loss, no full logits
    Saver("fused-loss", "fused loss", (("loss", "fused-linear"),),
          lambda setup, who: setup.loss == "standard" and setup.device == "cuda"),
    # without Triton (on a CPU) lorabench's chunked loss does the same; it cannot soft-cap (Gemma 2)
    Saver("chunked-loss", "chunked loss", (("loss", "chunked"),),
          lambda setup, who: setup.loss == "standard" and setup.device != "cuda" and not who.softcap),
    # Dettmers et al. 2021: 8-bit optimizer states, the same accuracy (paged ones count the same on the GPU)
    Saver("adamw-8bit", "8-bit AdamW", (("optimizer", "adamw-8bit"),), lambda setup, who: setup.optimizer == "adamw"),
    # the checkpointed layers' inputs in host memory (Unsloth's offloaded checkpointing, axolotl's hidden_states
    # offload): checkpointing with one copy of each layer's input over PCIe each way, and host memory for them
    Saver("offload", "offloaded checkpoints", (("grad_checkpointing", True), ("offload", "checkpoints")),
          lambda setup, who: setup.offload == "none" and setup.impl == "peft"),
    # QLoRA (Dettmers et al. 2023): adapter methods only; autocast needs fp32 weights, so not under it
    Saver("nf4", "nf4 base (QLoRA)", (("dtype", "nf4"),),
          lambda setup, who: who.quantizable_base and setup.dtype not in QUANTIZED and not setup.autocast,
          with_more_gpus=False),
)


@dataclass(frozen=True)
class Combo:
    """Savers turned on together: their labels (kinds) and keys (steps), their changes, the setup they give,
    and whether the "more GPUs" fix may use them."""

    kinds: Tuple[str, ...]
    changes: Change
    setup: TrainingSetup
    with_more_gpus: bool = True
    steps: Tuple[str, ...] = ()


def savers(case: Case) -> List[Combo]:
    """The savers not yet on (SAVERS), alone and together, cheapest first; the first is the setup as given."""
    who = subject(case)
    return combos(case.setup, [saver for saver in SAVERS if saver.applies(case.setup, who)])


def combos(setup: TrainingSetup, applicable: Sequence[Saver]) -> List[Combo]:
    """The savers `applicable` (in SAVERS' order) on setup, alone and together, cheapest first; the first is the
    setup as given."""
    out: List[Combo] = [Combo((), (), setup)]
    for saver in applicable:  # each saver extends every combination before it
        made = [Combo(c.kinds + (saver.kind,), c.changes + saver.change, replace(c.setup, **dict(saver.change)),
                      c.with_more_gpus and saver.with_more_gpus, c.steps + (saver.key,))
                for c in out]
        # a saver that implies another (offloaded checkpoints are checkpointed) makes no new setup with it: the
        # cheaper combination that gives the same setup is kept
        seen = {c.setup for c in out}
        for c in made:
            if c.setup not in seen:
                seen.add(c.setup)
                out.append(c)
    return out


def _divisors_below(n: int, below: int) -> List[int]:
    """The divisors of n smaller than `below`, largest first."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({x for d in small for x in (d, n // d) if x < below}, reverse=True)


def fixes(case: Case, capacity: int, fraction: float = ALLOCATOR_ALLOWANCE, max_gpus: int = MAX_GPUS) -> List[Fix]:
    """Every change that makes case fit `capacity` bytes per GPU, cheapest first; empty if it already fits.

    The changes that keep the user's data come first: the savers alone and together (SAVERS); then with a
    smaller micro-batch and gradient accumulation that keep the sequences of an optimizer step; then CPU
    offload (on sharded GPUs: the same GPUs, slower); then the fewest fully sharded GPUs. Cutting the data comes
    last: a shorter sequence at batch 1, offered only where it keeps at least half the sequence, or where
    nothing else fits (a suggestion of 66 tokens for a 4,096-token run is not one anybody takes)."""
    if fits(case, capacity, fraction):
        return []
    out: List[Fix] = []

    def add(c: Combo, step: Optional[str], label: Optional[str], changes: Change, changed: Case):
        kinds, steps = (c.kinds, c.steps) if step is None else (c.kinds + (label,), c.steps + (step,))
        out.append(Fix(kinds, c.changes + changes, changed, required_bytes(changed),
                       spare_bytes(changed, capacity, fraction), steps))

    combos = savers(case)
    s = case.setup
    for c in combos[1:]:  # the savers alone and together
        if fits(replace(case, setup=c.setup), capacity, fraction):
            add(c, None, None, (), replace(case, setup=c.setup))
    sequences = s.batch_size * s.grad_accum  # sequences per optimizer step, kept
    for c in combos:  # where a whole batch is too much: smaller micro-batches, accumulated
        if s.batch_size == 1 or fits(replace(case, setup=c.setup), capacity, fraction):
            continue
        for b in _divisors_below(sequences, s.batch_size):
            smaller = replace(case, setup=replace(c.setup, batch_size=b, grad_accum=sequences // b))
            if fits(smaller, capacity, fraction):
                add(c, "batch", "batch", (("batch_size", b), ("grad_accum", sequences // b)), smaller)
                break
    offload = case.parallel.cpu_offload
    if case.parallel.strategy.offloads_params and not offload:
        for c in combos:  # shards and optimizer in host memory, with the fewest savers
            moved = replace(case, setup=c.setup, parallel=replace(case.parallel, cpu_offload=True))
            if fits(moved, capacity, fraction):
                add(c, "cpu-offload", "CPU offload", (("cpu_offload", True),), moved)
                break
    sharded = [c for c in combos if c.with_more_gpus]
    # more GPUs, fully sharded: the fewest, with the fewest savers. Savers only take bytes away: where all of
    # them together leave no count that fits, none does, and the counts need not be searched once per saver
    everything = plan_step(replace(case, setup=sharded[-1].setup))
    if fewest_gpus(everything, "fsdp", capacity, fraction, offload, max_gpus) is None:
        sharded = []
    for c in sharded:
        g = fewest_gpus(plan_step(replace(case, setup=c.setup)), "fsdp", capacity, fraction, offload, max_gpus)
        if g is not None and g > 1 and (g, "fsdp") != (case.parallel.gpus, case.parallel.sharding):
            # (on one GPU, these savers are a fix of their own, listed above)
            add(c, "gpus", f"{g} GPUs (FSDP)", (("gpus", g), ("sharding", "fsdp")),
                replace(case, setup=c.setup, parallel=Parallel(g, "fsdp", offload)))
            break
    kept = len(out)
    for c in combos:  # where even one sequence is too long: a shorter one
        one = replace(c.setup, batch_size=1)
        if fits(replace(case, setup=one), capacity, fraction):
            continue
        n = longest_seq(replace(case, setup=one), capacity, fraction, s.seq_len - 1)
        if n is not None and (2 * round_down(n) >= s.seq_len or not kept):
            n = round_down(n)
            batch = (("batch_size", 1),) if s.batch_size > 1 else ()
            add(c, "sequence", "sequence", batch + (("seq_len", n),),
                replace(case, setup=replace(one, seq_len=n)))
    return out


def round_down(seq_len: int) -> int:
    """A suggested sequence length: down to a multiple of 64 from 128 tokens up (what data pipelines pack
    to), so the suggestion still fits."""
    return seq_len - seq_len % 64 if seq_len >= 128 else seq_len


def cheapest_fix(case: Case, capacity: int, fraction: float = ALLOCATOR_ALLOWANCE) -> Optional[Fix]:
    """The first of `fixes`: what changes least and fits."""
    found = fixes(case, capacity, fraction)
    return found[0] if found else None


# --------------------------------------------------------------------------------------------------
# The verdict for one row.


def overflow(row: dict, capacity: int) -> Tuple[str, int, bool]:
    """The largest component of an estimate row: (name, bytes, whether it alone exceeds capacity)."""
    key, name = max(COMPONENTS, key=lambda kv: row.get(kv[0]) or 0)
    size = row.get(key) or 0
    return name, size, size > capacity


# --------------------------------------------------------------------------------------------------
# Limits: the largest batch, sequence and rank that fit.


@dataclass(frozen=True)
class Limits:
    """The largest values that fit, each with the other settings as given (None: not even the smallest).

    Attributes:
        max_batch_size: at the given sequence length (searched up to max_batch).
        max_seq_len: at the given batch size.
        max_rank: at the given batch and sequence length, up to the model's width (None for full).
    """

    max_batch_size: Optional[int]
    max_seq_len: Optional[int]
    max_rank: Optional[int]


def limits(case: Case, capacity: int, fraction: float = ALLOCATOR_ALLOWANCE, max_batch: int = 1 << 20,
           max_seq: int = 1 << 24) -> Limits:
    batch = _largest(1, max_batch, lambda n: fits(replace(case, setup=replace(case.setup, batch_size=n)), capacity,
                                                  fraction))
    seq = longest_seq(case, capacity, fraction, max_seq)
    rank = None
    if case.method.uses_rank:
        rank = _largest(1, max_rank(case), lambda r: fits(replace(case, rank=r), capacity, fraction))
    return Limits(batch, seq, rank)


def longest_seq(case: Case, capacity: int, fraction: float = ALLOCATOR_ALLOWANCE, max_seq: int = 1 << 24
                ) -> Optional[int]:
    """The longest sequence that fits at the case's batch size (None: not even 1 token)."""
    return _largest(1, max_seq, lambda n: fits(replace(case, setup=replace(case.setup, seq_len=n)), capacity, fraction))


def max_rank(case: Case) -> int:
    """The largest rank worth searching: the narrowest side of the adapted projections (a wider rank adds
    parameters and no expressiveness)."""
    counts = count_params(case.spec, case.method, 1, case.targets)
    shapes = case.spec.linear_shapes()
    sides = [min(shapes[t][0], shapes[t][1]) for t in counts.targets if t in shapes]
    return max(1, min(sides) if sides else case.spec.hidden_size)


def smallest_gpu(parts: StepParts, fraction: float = ALLOCATOR_ALLOWANCE, need: Optional[int] = None,
                 bf16: bool = False) -> Optional[str]:
    """The catalog GPU with the least memory that holds the step alone, or `need` bytes (one GPU's share of a
    step spread over several) (ties: the first listed); bf16: only GPUs that compute in bf16 (a V100 or T4
    does not run a bf16 step, whatever its memory)."""
    return smallest_gpu_holding(need_bytes(parts, fraction) if need is None else need, bf16)


def smallest_gpu_holding(need: int, bf16: bool = False) -> Optional[str]:
    """The catalog GPU with the least memory that has `need` bytes (ties: the first listed); bf16: only GPUs that
    compute in bf16."""
    from lorabench.gpus import GPUS

    fitting = [g for g in GPUS.values() if g.memory_bytes >= need and (g.has_bf16 or not bf16)]
    return min(fitting, key=lambda g: g.memory_bytes).name if fitting else None


def search_cases(spec: ModelSpec, methods, ranks, targets, setup: TrainingSetup,
                 parallel: Parallel = Parallel()) -> List[Case]:
    """One Case per (method, rank); methods without a rank (full) appear once."""
    return [Case(spec, m, r, targets, setup, parallel) for m in methods for r in (ranks if m.uses_rank else (None,))]


def fit_rows(cases: List[Case], gpu: str, capacity: int,
             fraction: float = ALLOCATOR_ALLOWANCE) -> Tuple[List[dict], List[dict]]:
    """`lorabench fit`'s JSON rows (see README): per case its limits, and per (case, saver combination)
    whether the setup then fits."""
    limit_rows, knob_rows = [], []
    for case in cases:
        parts = step_parts(case)
        lim = limits(case, capacity, fraction)
        spare = spare_bytes(case, capacity, fraction)
        s = case.setup
        p = case.parallel
        base = {"model": case.spec.name, "engine": "analytic", "method": case.method.name, "rank": case.rank,
                "targets": ",".join(parts.counts.targets), "gpu": gpu, "gpu_memory_bytes": capacity,
                "allowance_fraction": fraction, "batch_size": s.batch_size, "seq_len": s.seq_len,
                "gpus": p.gpus, "sharding": p.sharding, "cpu_offload": p.cpu_offload, "padding": s.padding,
                "packing": s.packing, "padding_free": s.padding_free}
        limit_rows.append({**base, "fits": spare >= 0, "required_bytes": required_bytes(case), "spare_bytes": spare,
                           "max_batch_size": lim.max_batch_size, "max_seq_len": lim.max_seq_len,
                           "max_rank": lim.max_rank, "max_positions": case.spec.max_positions or None,
                           "notes": [n for n in (positions_note(case.spec, s.seq_len),) if n]})
        for c in savers(case):
            alt = replace(case, setup=c.setup)
            left = spare_bytes(alt, capacity, fraction)
            knob_rows.append({**base, "change": " + ".join(c.kinds) or "as given", "changes": c.changes,
                              "fits": left >= 0, "required_bytes": required_bytes(alt), "spare_bytes": left,
                              # with these savers on: "the longest context that fits"
                              "max_seq_len": longest_seq(alt, capacity, fraction)})
    return limit_rows, knob_rows
