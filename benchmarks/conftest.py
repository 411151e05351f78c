"""Benchmark-suite plumbing: put the GPU in machine_info (the `cuda` skip is the root conftest.py's).

pytest-benchmark's machine_info (and the machine id it stores runs under) describes the CPU and Python
only; two runs on different GPUs would look alike. The hook below adds the GPU, its driver and the
torch/CUDA versions, so a saved run says where it was taken and `--benchmark-compare` warns when they
differ. Baselines must still be stored per GPU kind (docs/benchmarks.md).
"""

from lorabench.measure.envinfo import nvml_info


def gpu_machine_info() -> dict:
    """The GPU this process sees, with the software stack that drives it; null fields when unknown."""
    info = {"name": None, "count": 0, "memory_bytes": None, "capability": None,
            "driver_version": nvml_info()["driver_version"], "torch_version": None, "cuda_version": None}
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
