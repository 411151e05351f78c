"""The verdict of each memory row, as data: on a GPU, the largest component and the cheapest change that fits
(and another of other steps); without a GPU, the smallest catalog GPU that holds the step. A change is a
field and a value (fit.Change): render.flags spells it as options."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from lorabench.estimator.fit import Case, Fix, fixes, overflow, smallest_gpu
from lorabench.estimator.setup import TrainingSetup
from lorabench.estimator.sharding import Parallel, plan_need_bytes, plan_step
from lorabench.gpus import GPU
from lorabench.methods import Method
from lorabench.models.spec import ModelSpec


def fix_dict(fix: Optional[Fix]) -> Optional[Dict]:
    """A fix as a row field: its kinds, its changes ([field, value] pairs), and what the case then needs."""
    return None if fix is None else {"kinds": list(fix.kinds), "changes": [list(c) for c in fix.changes],
                                     "required_bytes": fix.required_bytes, "spare_bytes": fix.spare_bytes}


def alternative(found: Sequence[Fix]) -> Optional[Fix]:
    """Another way than the cheapest, of other steps: the first that takes none of the cheapest's steps, else
    the first that does not merely add steps to it."""
    if len(found) < 2:
        return None
    first = set(found[0].steps)
    return next((f for f in found[1:] if not set(f.steps) & first), None) or next(
        (f for f in found[1:] if not first <= set(f.steps)), None)


def add_verdicts(spec: ModelSpec, rows: List[Dict], methods: Sequence[Method], targets, setup: TrainingSetup,
                 chosen: Optional[GPU], allowance: float, parallel: Parallel = Parallel()) -> None:
    """Adds the verdict fields to each memory row (estimator.rows.memory_rows) in place: on a GPU,
    largest_component(_bytes), fix and fix_alternative (fix_dict, or None); without one, smallest_gpu (that
    holds one GPU's share, on several)."""
    by_name = {m.name: m for m in methods}
    for row in rows:
        case = Case(spec, by_name[row["method"]], row["rank"], targets, setup, parallel)
        if chosen is None:
            plan = plan_step(case)
            row["smallest_gpu"] = smallest_gpu(plan.parts, allowance, plan_need_bytes(plan, parallel, allowance),
                                               bf16=setup.uses_bf16)
            continue
        name, big, _ = overflow(row, chosen.memory_bytes)
        row.update({"largest_component": name, "largest_component_bytes": big})
        found = [] if row["fits"] else fixes(case, chosen.memory_bytes, allowance)
        row["fix"] = fix_dict(found[0] if found else None)
        row["fix_alternative"] = fix_dict(alternative(found))
