"""Benchmark-suite plumbing: skip `cuda` benchmarks without a GPU, and put the GPU in machine_info.

pytest-benchmark's machine_info (and the machine id it stores runs under) describes the CPU and Python
only; two runs on different GPUs would look alike. The hook below adds the GPU, its driver and the
torch/CUDA versions, so a saved run says where it was taken and `--benchmark-compare` warns when they
differ. Baselines must still be stored per GPU kind (docs/benchmarks.md).
"""

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    # tests/conftest.py does the same for tests/; it is not loaded by `pytest benchmarks` alone.
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") and HERE in item.path.resolve().parents:
            item.add_marker(skip)


def _nvml_driver_version():
    """The NVIDIA driver version from NVML, or None (no nvidia-ml-py, no driver, no permission)."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - any NVML failure means: unknown
        return None
    return version.decode() if isinstance(version, bytes) else version


def gpu_machine_info() -> dict:
    """The GPU this process sees, with the software stack that drives it; null fields when unknown."""
    info = {"name": None, "count": 0, "memory_bytes": None, "capability": None,
            "driver_version": _nvml_driver_version(), "torch_version": None, "cuda_version": None}
    try:
        import torch
    except ImportError:
        return info
    info["torch_version"] = torch.__version__
    info["cuda_version"] = torch.version.cuda
    if not torch.cuda.is_available():
        return info
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    info.update(name=props.name, count=torch.cuda.device_count(), memory_bytes=props.total_memory,
                capability=f"{props.major}.{props.minor}")
    return info


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["gpu"] = gpu_machine_info()
