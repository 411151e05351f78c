"""The step a bench case runs: its forward, computing the loss without the full logits when setup.loss asks
(lorabench.nn.loss's chunked cross-entropy, or Liger's fused linear cross-entropy), and its training loop
(lorabench.measure.loops: the plain loop or transformers' Trainer.training_step)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from lorabench.errors import LorabenchError
from lorabench.estimator.setup import TrainingSetup
from lorabench.measure.builders import Built
from lorabench.measure.loops import PlainLoop, TrainerLoop
from lorabench.models.spec import ModelSpec


@dataclass
class LossOutput:
    """What forward returns under --loss chunked or fused-linear: the loss, and transformers' KV cache, which a
    plain loop keeps as it keeps the whole model output."""

    loss: torch.Tensor
    cache: object = None


def head_loss(spec: ModelSpec, setup: TrainingSetup,
              device: torch.device) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """(hidden [B, S, D], head weight [V, D], labels [B, S]) -> transformers' causal-LM loss, as setup.loss
    computes it without the full logits: lorabench.nn.loss's chunked cross-entropy, or Liger's
    LigerFusedLinearCrossEntropyLoss (Triton: CUDA only) on the same shifted labels.

    Raises:
        LorabenchError: fused-linear off CUDA or without liger-kernel installed.
    """
    from lorabench.nn.loss import IGNORE_INDEX, chunked_causal_lm_loss
    from lorabench.nn.model import shift_labels

    if setup.loss == "chunked":
        return lambda h, w, y: chunked_causal_lm_loss(h, w, y, setup.loss_chunk)
    if device.type != "cuda":
        raise LorabenchError("--loss fused-linear runs Liger's Triton kernels, which need a CUDA GPU: it is "
                             "estimated on any machine, measured only on CUDA.")
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        raise LorabenchError("--loss fused-linear needs Liger's kernels: pip install liger-kernel.") from None
    fused = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, softcap=spec.final_softcap or None)

    def loss(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return fused(w, h.reshape(-1, h.shape[-1]), shift_labels(y).view(-1))
    return loss


def forward_with_loss(built: Built, spec: ModelSpec, setup: TrainingSetup, device: torch.device,
                       impl: str) -> Built:
    """built with its forward computing setup.loss from the final hidden states (no full logits) when the
    loss is not transformers' own."""
    if setup.loss == "standard":
        return built
    loss = head_loss(spec, setup, device)
    model = built.model
    if impl == "lorabench":
        def forward(ids):
            return LossOutput(loss(model.hidden_states(ids), model.head.weight, ids))
    else:
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        body, head = hf.base_model, hf.get_output_embeddings()  # the decoder (final norm included), lm_head
        extra = built.inputs  # filled when the step's inputs are made

        def forward(ids):
            out = body(input_ids=ids, **extra)
            return LossOutput(loss(out.last_hidden_state, head.weight, ids), out.past_key_values)
    return replace(built, forward=forward)



Step = Callable[[torch.Tensor, Callable[[str], None]], torch.Tensor]


def stepper(built: Built, setup: TrainingSetup, device: torch.device):
    """(step, close): step(ids, mark) runs one optimizer step of setup.loop over setup.grad_accum
    micro-batches (lorabench.measure.loops); close() releases what the loop holds."""
    if setup.loop == "trainer":
        loop = TrainerLoop(built, setup.batch_size, setup.grad_accum, device, own_loss=setup.loss != "standard",
                           autocast=setup.autocast)
    else:
        loop = PlainLoop(built, setup.grad_accum, device, setup.autocast)
    return loop.step, loop.close
