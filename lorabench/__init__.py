"""lorabench: what fine-tuning a model costs (parameters, memory, FLOPs), and proof on the GPU."""

__version__ = "0.1.0"
