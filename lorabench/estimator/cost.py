"""What a training run costs: steps, hours, GPU-hours and dollars at an estimated step time. Pure Python."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from lorabench.errors import LorabenchError
from lorabench.spelling import option
from lorabench.estimator.compute import StepTime
from lorabench.gpus import GPU, PRICES


@dataclass(frozen=True)
class CostSetup:
    """How much to train and at what price.

    Attributes:
        tokens: tokens to train on in all (epochs included); or None to give dataset_tokens and epochs.
        dataset_tokens: tokens in the dataset, trained over `epochs` times.
        epochs: passes over the dataset (fractions allowed).
        price_per_gpu_hour: US dollars per GPU-hour; None takes the catalog's default for the GPU.
    """

    tokens: Optional[int] = None
    dataset_tokens: Optional[int] = None
    epochs: float = 1.0
    price_per_gpu_hour: Optional[float] = None

    @property
    def train_tokens(self) -> Optional[int]:
        if self.tokens is not None:
            return self.tokens
        if self.dataset_tokens is not None:
            return math.ceil(self.dataset_tokens * self.epochs)
        return None

    def validate(self) -> None:
        """Raises LorabenchError for a combination or value that cannot be priced."""
        if self.tokens is not None and self.dataset_tokens is not None:
            raise LorabenchError(f"give {option('tokens')} (all tokens trained) or {option('dataset_tokens')} with "
                                 f"{option('epochs')}, not both.")
        for name, value in (("tokens", self.tokens), ("dataset tokens", self.dataset_tokens)):
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise LorabenchError(f"{name} must be a positive integer, got {value!r}.")
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            raise LorabenchError(f"epochs must be a positive number, got {self.epochs!r}.")
        if self.price_per_gpu_hour is not None and not (math.isfinite(self.price_per_gpu_hour)
                                                        and self.price_per_gpu_hour >= 0):
            raise LorabenchError(f"price must be a non-negative number, got {self.price_per_gpu_hour!r}.")


@dataclass(frozen=True)
class TrainingCost:
    """A training run: steps, wall-clock hours, GPU-hours and dollars.

    Attributes:
        train_tokens: tokens trained on in all.
        gpus: GPUs working together (data-parallel replicas, or the fewest that hold the step sharded).
        tokens_per_step: tokens one optimizer step takes over all GPUs.
        train_steps: optimizer steps (the last one partial, counted whole).
        train_hours: wall-clock hours at the estimated step time.
        gpu_hours: train_hours x gpus.
        price_per_gpu_hour: dollars per GPU-hour used (given, or the catalog's), None when unknown.
        price_source: where the price comes from.
        cost_usd: gpu_hours x price, None without a price.
    """

    train_tokens: int
    gpus: int
    tokens_per_step: int
    train_steps: int
    train_hours: float
    gpu_hours: float
    price_per_gpu_hour: Optional[float]
    price_source: Optional[str]
    cost_usd: Optional[float]


def estimate_training_cost(step: StepTime, tokens_per_gpu_step: int, gpus: int, cost: CostSetup,
                           gpu: Optional[GPU] = None) -> Optional[TrainingCost]:
    """Steps, hours, GPU-hours and dollars to train cost.train_tokens at step's time per step, each of `gpus`
    GPUs taking tokens_per_gpu_step tokens per step (data parallel; time spent communicating is not added).
    The price is cost.price_per_gpu_hour, else the catalog's default for gpu (lorabench.gpus.PRICES).
    None when no tokens were given."""
    cost.validate()
    tokens = cost.train_tokens
    if tokens is None:
        return None
    per_step = tokens_per_gpu_step * gpus
    steps = -(-tokens // per_step)
    hours = steps * step.step_ms / 3.6e6
    price, source = cost.price_per_gpu_hour, option("price")
    if price is None and gpu is not None and gpu.name in PRICES:
        price, source = PRICES[gpu.name].usd_per_gpu_hour, PRICES[gpu.name].source
    if price is None:
        source = None
    return TrainingCost(tokens, gpus, per_step, steps, hours, hours * gpus, price, source,
                        None if price is None else hours * gpus * price)
