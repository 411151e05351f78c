"""What is estimated, as one frozen value: a method at a rank on a model's targets, run as a setup, on GPUs
shared as a Parallel says. Every estimate of one step takes a Case (step_parts, estimate_memory,
estimate_step_time, estimate_flops, plan_step, ...) rather than the five fields one by one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lorabench.estimator.parallel import Parallel
from lorabench.estimator.setup import TrainingSetup
from lorabench.methods import Method
from lorabench.models.spec import ModelSpec


@dataclass(frozen=True)
class Case:
    """One question: method at rank on spec's targets (None: the family's default), run as setup, on
    parallel.gpus GPUs shared as parallel.sharding says (one-GPU estimates read all but parallel)."""

    spec: ModelSpec
    method: Method
    rank: Optional[int] = None
    targets: object = None
    setup: TrainingSetup = TrainingSetup()
    parallel: Parallel = Parallel()
