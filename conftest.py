"""Shared by tests/ and benchmarks/: `cuda`-marked tests are skipped where no CUDA GPU is available, and
the hypothesis profiles of tests/test_properties.py are chosen here (LORABENCH_HYPOTHESIS=ci|thorough)."""

import os

import pytest

# No test reaches the network: a Hub id (ORG/NAME), typed by a test or drawn by hypothesis, is read from
# the local cache only; tests of the download path replace it.
os.environ["HF_HUB_OFFLINE"] = "1"

try:
    from hypothesis import settings
except ImportError:  # a test extra: without it tests/test_properties.py skips itself
    settings = None

if settings is not None:
    # ci: a few hundred examples per fast property, no example database, so runs do not depend on the last.
    settings.register_profile("ci", max_examples=300, deadline=None, database=None, print_blob=True)
    # thorough: a few thousand; the database in .hypothesis/ replays past failures first.
    settings.register_profile("thorough", max_examples=3000, deadline=None, print_blob=True)
    settings.load_profile(os.environ.get("LORABENCH_HYPOTHESIS", "ci"))


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
