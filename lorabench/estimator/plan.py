"""A Plan: one step's memory parts and the model's tensors, what sharding and fsdp_memory share out over GPUs."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Optional

from lorabench.estimator.case import Case
from lorabench.estimator.layout import Layout, model_layout
from lorabench.estimator.memory import StepParts, step_parts
from lorabench.estimator.setup import TrainingSetup
from lorabench.methods import Method
from lorabench.models.spec import ModelSpec


@dataclass(frozen=True)
class Plan:
    """One step and the model's tensors: what rank_memory shares out."""

    case: Case
    parts: StepParts

    @property
    def spec(self) -> ModelSpec:
        return self.case.spec

    @property
    def method(self) -> Method:
        return self.case.method

    @property
    def rank(self) -> Optional[int]:
        return self.case.rank

    @property
    def targets(self) -> object:
        return self.case.targets

    @property
    def setup(self) -> TrainingSetup:
        return self.case.setup

    @cached_property
    def layout(self) -> Layout:
        return model_layout(self.case)


def plan_step(case: Case) -> Plan:
    """The Plan of one step (see step_parts for what it raises)."""
    return Plan(case, step_parts(case))
