"""lorabench: what fine-tuning a model costs (parameters, memory, FLOPs), and proof on the GPU.

The Python API (lorabench.api) answers as the CLI's JSON does, without importing torch:

    import lorabench
    rows = lorabench.estimate(model="llama-3-8b", method="lora", rank=16, gpu="RTX-4090")
    limits = lorabench.fit(model="llama-3-8b", method="lora", gpu="RTX-4090")["limits"]
    counts = lorabench.count_params(model="llama-3-8b", method="lora", rank=8)
"""

__version__ = "0.1.0"

__all__ = ["estimate", "fit", "count_params", "LorabenchError", "LorabenchNote", "__version__"]

_API = {"estimate", "fit", "count_params", "LorabenchNote"}


def __getattr__(name):
    # imported on first use: `from lorabench import __version__` (the bench, the worker) stays cheap
    if name in _API:
        from lorabench import api

        return getattr(api, name)
    if name == "LorabenchError":
        from lorabench.errors import LorabenchError

        return LorabenchError
    raise AttributeError(f"module 'lorabench' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
