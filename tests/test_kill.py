"""scripts/kill_harness.py at a few fixed moments, so that CI keeps it (issue 21, "Prove it"): SIGINT or SIGTERM
to `report`, `bench -o` and `bench --nproc 2 -o`, each checked as the harness checks a run (exit code, the output
whole or the old one untouched, no lock, temporary file or process left). Where in the run a moment lands
depends on the machine; every outcome is checked all the same.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parent.parent / "scripts" / "kill_harness.py"


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("kill_harness", HARNESS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def old_report(harness, tmp_path_factory):
    return harness.make_old_report(tmp_path_factory.mktemp("old"))


def _check(harness, old_report, tmp_path, kind, sig, at_s, prior, fmt="json"):
    run = harness.one_run(0, kind, sig, at_s, prior, fmt, old_report, sys.executable, parent=str(tmp_path))
    assert run["problems"] == [], run


@pytest.mark.parametrize("sig, at_s, prior", [("SIGINT", 0.3, True), ("SIGTERM", 1.0, True),
                                              ("SIGINT", 1.6, False)])
def test_report(harness, old_report, tmp_path, sig, at_s, prior):
    _check(harness, old_report, tmp_path, "report", sig, at_s, prior)


@pytest.mark.slow
@pytest.mark.parametrize("sig, at_s, prior, fmt", [("SIGTERM", 1.5, True, "json"), ("SIGINT", 7.0, False, "csv")])
def test_bench(harness, old_report, tmp_path, sig, at_s, prior, fmt):
    pytest.importorskip("torch")
    _check(harness, old_report, tmp_path, "bench", sig, at_s, prior, fmt)


@pytest.mark.slow
def test_bench_nproc_2(harness, old_report, tmp_path):
    pytest.importorskip("torch")
    _check(harness, old_report, tmp_path, "nproc", "SIGTERM", 9.0, True)
