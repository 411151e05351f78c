"""pytest-benchmark suite for the estimation core (CPU). Run: pytest benchmarks --benchmark-enable."""

import pytest

from lorabench.estimator.rows import memory_rows, param_rows
from lorabench.gpus import get_gpu
from lorabench.estimator.setup import TrainingSetup
from lorabench.methods import METHODS
from lorabench.models.presets import from_name


@pytest.mark.benchmark(group="estimate")
def test_memory_all_methods_llama_3_70b(benchmark):
    spec, methods = from_name("llama-3-70b"), tuple(METHODS.values())
    rows = benchmark(memory_rows, spec, methods, (8, 64), None, TrainingSetup(), get_gpu("H100-80GB"))
    assert len(rows) == 1 + 2 * (len(methods) - 1)
    benchmark.extra_info["rows"] = len(rows)


@pytest.mark.benchmark(group="estimate")
def test_params_rank_sweep_all_linear(benchmark):
    spec, methods = from_name("llama-3.1-405b"), tuple(METHODS.values())
    rows = benchmark(param_rows, spec, methods, (1, 2, 4, 8, 16, 32, 64, 128, 256), "all-linear")
    assert rows[0]["trainable_params"] == 405_853_388_800
