"""Offloaded gradient checkpointing (setup.offload "checkpoints"): each checkpointed decoder layer keeps its input in
host memory instead of on the device, and brings it back to recompute the layer in backward. This is what Unsloth's
offloaded gradient checkpointing (use_gradient_checkpointing="unsloth": Unsloth_Offloaded_Gradient_Checkpointer)
and axolotl's activation_offloading: hidden_states do; here as an autograd Function that transformers' checkpointed
layers call in place of torch's checkpoint (GradientCheckpointingLayer._gradient_checkpointing_func).

On CUDA the input goes to pinned host memory (non_blocking copies on the current stream). Without a GPU the "host"
copy is a CPU tensor that the live-tensor tracker counts as host memory (LiveTensorTracker.as_host), so the device
figures are what a GPU would hold and the host bytes are reported apart.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
from torch.utils._python_dispatch import _disable_current_modes

# Counts a CPU copy as host memory (the tracker's as_host) while a measured step runs on a machine without a GPU.
_host_marker: Optional[Callable[[torch.Tensor], None]] = None


@contextlib.contextmanager
def host_memory(marker: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """Copies made by to_host are handed to marker (LiveTensorTracker.as_host) while inside."""
    global _host_marker
    previous, _host_marker = _host_marker, marker
    try:
        yield
    finally:
        _host_marker = previous


def to_host(t: torch.Tensor) -> torch.Tensor:
    """t copied to (pinned) host memory."""
    if t.device.type == "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return host.copy_(t, non_blocking=True)
    with _disable_current_modes():  # not made on the device: the copy never counts there
        host = t.detach().clone()
    if _host_marker is not None:
        _host_marker(host)
    return host


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A device copy of a host tensor (to_host's)."""
    if device.type == "cuda":
        return host.to(device, non_blocking=True)
    return host.clone()


class OffloadedCheckpoint(torch.autograd.Function):
    """run(hidden, *args) without a graph; hidden kept in host memory; recomputed from it in backward."""

    @staticmethod
    def forward(ctx, run, hidden, *args):
        ctx.run, ctx.args, ctx.device = run, args, hidden.device
        ctx.host = to_host(hidden)
        with torch.no_grad():
            return run(hidden, *args)

    @staticmethod
    def backward(ctx, *grads):
        hidden = to_device(ctx.host, ctx.device).detach().requires_grad_(True)
        ctx.host = None  # the host copy is freed once it is back
        with torch.enable_grad():
            out = ctx.run(hidden, *ctx.args)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if isinstance(o, torch.Tensor) and o.requires_grad
                 and g is not None]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, hidden.grad) + (None,) * len(ctx.args)


def offloaded_checkpoint(run, hidden, *args):
    return OffloadedCheckpoint.apply(run, hidden, *args)


def offload_checkpoints(model: torch.nn.Module) -> int:
    """Every checkpointed transformers layer of model runs through OffloadedCheckpoint; returns how many."""
    n = 0
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func"):
            m._gradient_checkpointing_func = offloaded_checkpoint
            n += 1
    return n


__all__ = ["host_memory", "to_host", "to_device", "OffloadedCheckpoint", "offloaded_checkpoint",
           "offload_checkpoints"]
