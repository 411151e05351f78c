"""One training step for any method: what the benchmark harness times and measures.

The step is what a plain user loop does: `out = model(ids, labels=labels); out.loss.backward();
opt.step(); hooks; opt.zero_grad(set_to_none=True)`. `out` (and so the logits) stays referenced until
the step returns, as in such a loop, so the measured peak includes the logits during backward.
"""

from __future__ import annotations

from typing import List, Optional, Union

import torch
from torch import nn

from lorabench.methods import Method, get_method
from lorabench.nn.adapters import apply_method, param_groups, step_hooks
from lorabench.nn.model import Transformer, build_model
from lorabench.nn.optim import make_optimizer
from lorabench.models.spec import ModelSpec



class Trainer:
    """A model with its method applied, its optimizer and its after-step hooks.

    Attributes:
        model: the Transformer with adapters in place.
        optimizer: over the trainable parameters (LoRA+ param groups where the method has them).
        method: the Method.
        hooks: objects whose .step() runs after optimizer.step() (Delta-LoRA's W update).
        adapters: the adapter modules in layer order (empty for full fine-tuning).
    """

    def __init__(self, model: Transformer, optimizer: torch.optim.Optimizer, method: Method,
                 hooks: list, adapters: List[nn.Module]):
        self.model, self.optimizer, self.method = model, optimizer, method
        self.hooks, self.adapters = hooks, adapters

    def step(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Forward, loss, backward, optimizer step, hooks, zero_grad(set_to_none=True).

        Args:
            input_ids: [B, S] token ids.
            labels: [B, S] targets (HF convention: shifted inside the loss; None uses input_ids).

        Returns:
            The loss, detached.
        """
        out = self.model(input_ids, labels=input_ids if labels is None else labels)
        out.loss.backward()
        self.optimizer.step()
        for hook in self.hooks:
            hook.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out.loss.detach()


def build_training(spec: ModelSpec, method: Union[str, Method], rank: Optional[int] = 8,
                   alpha: Optional[float] = None, targets=None, optimizer: str = "adamw", lr: float = 1e-4,
                   dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu",
                   layers: Optional[int] = None, seed: int = 0, dropout: float = 0.0,
                   adapter_dtype: torch.dtype = torch.float32, weight_decay: float = 0.0,
                   delta_lambda: float = 0.5, delta_start_step: int = 0,
                   quantization: Optional[str] = None, grad_checkpointing: bool = False) -> Trainer:
    """Build a model for spec on device, apply method, and return a Trainer ready to .step().

    Args:
        spec: model shape.
        method: a METHODS name or Method.
        rank, alpha, targets, dropout, adapter_dtype, quantization: see apply_method.
        optimizer: a name in lorabench.estimator.optimizer.OPTIMIZERS.
        lr: learning rate (of A under LoRA+; B gets lr x b_lr_ratio).
        dtype: base model dtype.
        layers: cut the model to this many blocks (None: spec.num_layers).
        seed: seeds the base weights and the adapters.
        delta_lambda, delta_start_step: Delta-LoRA's lambda and first updating step.
        grad_checkpointing: recompute each block in backward (keeps only block inputs).

    Raises:
        LorabenchError: a bad method, rank, targets, optimizer or quantization.
    """
    method = method if isinstance(method, Method) else get_method(method)
    model = build_model(spec, device=device, dtype=dtype, layers=layers, seed=seed)
    model.grad_checkpointing = grad_checkpointing
    adapters = apply_method(model, method, rank, alpha, targets, dropout=dropout, seed=seed,
                            adapter_dtype=adapter_dtype, quantization=quantization)
    opt = make_optimizer(optimizer, param_groups(model, method, lr), lr, weight_decay, device)
    hooks = step_hooks(model, method, delta_lambda, delta_start_step)
    return Trainer(model, opt, method, hooks, adapters)


__all__ = ["Trainer", "build_training"]
