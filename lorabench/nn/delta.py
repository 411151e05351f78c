"""Delta-LoRA's update of the frozen base weight after each optimizer step.

Zi et al. 2023, arXiv:2309.02411, eq. 7-8: W_{t+1} = W_t + lambda * (alpha / r) * (B_{t+1} A_{t+1} - B_t A_t),
in PEFT's orientation (delta W = B @ A, [out, in]). W gets no gradient and no optimizer state; the only
extra state is a copy of the previous A and B per layer (adapter-sized).
"""

from __future__ import annotations

from typing import List

import torch

from lorabench.nn.lora import LoRALinear


class DeltaLoRAUpdate:
    """Moves each adapted layer's W by the change of its low-rank product; call after optimizer.step().

    The change B1 A1 - B0 A0 is one in-place addmm of [B1, B0] ([out, 2r]) by [A1; -A0] ([2r, in]), so no
    out x in temporary is made.

    Args:
        layers: the LoRALinear modules whose W moves (built without dropout: the paper drops it on the
            low-rank path so that the delta is the product of the parameters alone).
        lam: lambda, the update ratio (0.5 in the paper).
        start_step: optimizer steps (0-based) before this one leave W alone but keep the snapshot
            current (the paper waits K=500 steps).

    Raises:
        ValueError: no layers, or a negative start_step.
    """

    def __init__(self, layers: List[LoRALinear], lam: float = 0.5, start_step: int = 0):
        if not layers:
            raise ValueError("Delta-LoRA needs at least one LoRA layer.")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}.")
        self.layers, self.lam, self.start_step = list(layers), lam, start_step
        self.steps_done = 0
        self.prev_a = [layer.lora_a.detach().clone() for layer in self.layers]
        self.prev_b = [layer.lora_b.detach().clone() for layer in self.layers]

    @torch.no_grad()
    def step(self) -> None:
        """Apply the update for the optimizer step just taken, then snapshot the new A and B."""
        apply = self.steps_done >= self.start_step
        for layer, a0, b0 in zip(self.layers, self.prev_a, self.prev_b):
            a1, b1 = layer.lora_a, layer.lora_b
            if apply:
                w = layer.base.weight
                w.addmm_(torch.cat([b1, b0], 1).to(w.dtype), torch.cat([a1, -a0], 0).to(w.dtype),
                         alpha=self.lam * layer.scale)
            a0.copy_(a1)
            b0.copy_(b1)
        self.steps_done += 1

    def state_tensors(self) -> List[torch.Tensor]:
        """The snapshot tensors (for memory measurement)."""
        return self.prev_a + self.prev_b

    def state_numel(self) -> int:
        """Elements of the snapshot kept between steps."""
        return sum(a.numel() + b.numel() for a, b in zip(self.prev_a, self.prev_b))


__all__ = ["DeltaLoRAUpdate"]
