"""The peak of each segment of a traced step, so that a step traced at a cut depth extrapolates to the full depth.

A phase's peak is the largest of many moments, and each moment's bytes are affine in the number of layers, but
not with one slope: at the start of backward every layer's saved activations are alive (slope: a layer's weights
and saves), at its end every layer's gradients (slope: a layer's weights and gradients). Which moment is the peak
can change with depth (Qwen2.5-0.5B fully fine-tuned under checkpointing: the loss's backward at 2 layers, the
tied embedding's gradient sum at 24), so the peak itself is not affine; each segment's is. The segments:

- forward: the whole forward (every moment grows with the layers before it at one slope);
- backward:top: backward from the loss through the top decoder layer;
- backward:middle: the layers between;
- backward:bottom: the first decoder layer's backward and what follows it (the embedding's);
- optimizer.

A layer's backward starts when the gradient of its output is computed: a hook on that output, put there by the
layer's forward hook. Between the top and the bottom layer, the bytes move one way, so top and bottom bound the
middle.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from lorabench.measure.probes import LiveTensorTracker

SEGMENTS = ("forward", "backward:top", "backward:middle", "backward:bottom", "optimizer")
PHASE_SEGMENTS = {"forward": ("forward",), "backward": ("backward:top", "backward:middle", "backward:bottom"),
                  "optimizer": ("optimizer",)}


class SegmentTracker(LiveTensorTracker):
    """The live-tensor tracker, also keeping the peak of the segment the step is in (`segment`)."""

    def __init__(self, device_type: Optional[str] = None):
        super().__init__(device_type)
        self.segment: Optional[str] = None
        self.segment_peaks: Dict[str, int] = {}

    def enter(self, segment: Optional[str]) -> None:
        self.segment = segment
        self._count()

    def _add(self, nbytes: int) -> None:
        super()._add(nbytes)
        self._count()

    def _count(self) -> None:
        if self.segment is not None:
            self.segment_peaks[self.segment] = max(self.segment_peaks.get(self.segment, 0), self.current_bytes)


class StepSegments:
    """Moves a SegmentTracker through the segments of one step of `grad_accum` micro-batches: `settle` is the
    bench's phase-boundary callback (_memory_step's settle), `hooks(layers)` marks each decoder layer's backward."""

    def __init__(self, tracker: SegmentTracker, grad_accum: int):
        self.tracker, self.accum, self.marks = tracker, grad_accum, 0
        self.layers = 0

    def settle(self, probe) -> None:
        """Called at start, after each forward and backward, and after the optimizer step."""
        count, self.marks = self.marks, self.marks + 1
        if count == 0 or (count % 2 == 0 and count < 2 * self.accum):
            self.tracker.enter("forward")
        elif count % 2 == 1 and count < 2 * self.accum:
            self.tracker.enter("backward:top")
        elif count == 2 * self.accum:
            self.tracker.enter("optimizer")
        else:
            self.tracker.enter(None)

    def hooks(self, layers: List[torch.nn.Module]) -> list:
        """Forward hooks on the decoder layers that hook each one's output gradient; their handles."""
        self.layers = len(layers)

        def on_grad(i: int) -> None:
            if self.tracker.segment is None or not self.tracker.segment.startswith("backward"):
                return
            if i == 0:
                self.tracker.enter("backward:bottom")
            elif i < self.layers - 1 and self.tracker.segment != "backward:bottom":
                self.tracker.enter("backward:middle")

        def forward_hook(i: int):
            def hook(module, args, out):
                hidden = out[0] if isinstance(out, (tuple, list)) else out
                if (isinstance(hidden, torch.Tensor) and hidden.requires_grad and self.tracker.segment == "forward"):
                    hidden.register_hook(lambda grad: on_grad(i))
            return hook

        return [layer.register_forward_hook(forward_hook(i)) for i, layer in enumerate(layers)]


def phase_peaks(segments: Dict[str, int]) -> Dict[str, int]:
    """Each phase's peak: the largest of its segments."""
    return {phase: max(segments.get(s, 0) for s in names) for phase, names in PHASE_SEGMENTS.items()}


__all__ = ["SEGMENTS", "PHASE_SEGMENTS", "SegmentTracker", "StepSegments", "phase_peaks"]
