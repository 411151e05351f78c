"""The training loops `lorabench bench` runs, each one optimizer step of setup.grad_accum micro-batches.

plain: the loop of most scripts,

    for micro_batch in batches:
        out = model(input_ids=ids, labels=ids)   # the previous `out` is released only when this returns
        (out.loss / grad_accum).backward()
    optimizer.step(); optimizer.zero_grad(set_to_none=True)

so the output (its logits, and transformers' KV cache) lives through backward and the optimizer step, and
with accumulation through the next micro-batch's forward.

trainer: transformers.Trainer's own `training_step` (transformers/trainer.py), called as its inner training
loop calls it: compute_loss keeps only the loss (the outputs are dropped before backward), the loss is
scaled for accumulation, `accelerator.backward`; then `optimizer.step()` and `model.zero_grad()`.

Autocast (--autocast bf16|fp16 on an fp32 model): the plain loop runs the forward under
`torch.autocast(device, dtype)` and, for fp16, scales the loss with torch.amp.GradScaler, as torch's AMP recipe
does. Trainer gets `bf16=True` / `fp16=True` and the model and optimizer go through `accelerator.prepare`
as Trainer.train sends them: accelerate wraps the forward in autocast and converts the outputs' bf16/fp16
tensors to fp32 (convert_outputs_to_fp32), and its optimizer steps through the GradScaler under fp16.

`mark(phase)` is called with "start" before the step and with "forward", "backward" after each
micro-batch's phases and "optimizer" at the end, so a probe can read each phase's peak.
"""

from __future__ import annotations

import tempfile
from typing import Callable, Optional

import torch

from lorabench.errors import LorabenchError

Mark = Callable[[str], None]


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _finish(built, mark: Mark, step: Optional[Callable[[], None]] = None) -> None:
    """The optimizer step (`step`, else the built optimizer's), the method's after-step hooks, zero_grad."""
    (step or built.optimizer.step)()
    for hook in built.hooks:
        hook.step()
    built.optimizer.zero_grad(set_to_none=True)
    mark("optimizer")


class PlainLoop:
    """The plain loop (module docstring), with autocast and fp16's GradScaler when asked for."""

    def __init__(self, built, grad_accum: int, device: torch.device, autocast: Optional[str] = None):
        self.built, self.grad_accum, self.device = built, grad_accum, device
        self.dtype = AUTOCAST_DTYPES[autocast] if autocast else None
        self.scaler = torch.amp.GradScaler(device.type) if autocast == "fp16" else None

    def step(self, ids: torch.Tensor, mark: Mark = lambda phase: None) -> torch.Tensor:
        """One optimizer step of grad_accum micro-batches; returns the last micro-batch's loss, detached."""
        built, k = self.built, self.grad_accum
        mark("start")
        out = None
        for _ in range(k):
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
                out = built.forward(ids)
            mark("forward")
            loss = out.loss / k if k > 1 else out.loss
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            del loss
            mark("backward")
        _finish(built, mark, self._scaled_step if self.scaler else None)
        last = out.loss.detach()
        del out
        return last

    def _scaled_step(self) -> None:
        self.scaler.step(self.built.optimizer)
        self.scaler.update()

    def close(self) -> None:
        pass


class _OwnLoss(torch.nn.Module):
    """The built model behind a forward that computes the loss itself (--loss chunked or fused-linear), for
    Trainer, which calls model(**inputs) and reads the loss from what it returns."""

    def __init__(self, built):
        super().__init__()
        self.inner = built.model
        self._forward = built.forward

    def forward(self, input_ids, labels=None, **kwargs):
        return {"loss": self._forward(input_ids).loss}


class TrainerLoop:
    """transformers.Trainer around a built model, stepping through Trainer.training_step.

    The Trainer gets the model and the optimizer bench built (its own optimizer and scheduler are not made;
    with own_loss, the model behind the built forward, which computes a memory-saving loss itself),
    writes nothing (no logging, no saving, no reporting) and keeps its output folder in a temporary directory.
    """

    def __init__(self, built, batch_size: int, grad_accum: int, device: torch.device, own_loss: bool = False,
                 autocast: Optional[str] = None):
        try:
            import transformers
        except ImportError:
            raise LorabenchError("--loop trainer needs transformers: pip install transformers.") from None
        self.built = built
        self.grad_accum = grad_accum
        self._dir = tempfile.TemporaryDirectory(prefix="lorabench-trainer-")
        args = transformers.TrainingArguments(
            output_dir=self._dir.name, per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=grad_accum, report_to="none", save_strategy="no",
            logging_strategy="no", disable_tqdm=True, use_cpu=device.type == "cpu",
            bf16=autocast == "bf16", fp16=autocast == "fp16")
        self.model = _OwnLoss(built) if own_loss else built.model
        self.trainer = transformers.Trainer(model=self.model, args=args, optimizers=(built.optimizer, None))
        self.optimizer = built.optimizer
        if autocast:
            accelerator = self.trainer.accelerator
            if not accelerator.native_amp:
                raise LorabenchError(f"Trainer's {autocast}=True runs no autocast on {device.type} (accelerate "
                                     "turns native AMP off there); measure it with --loop plain.")
            # as Trainer.train prepares them: the forward under autocast, the optimizer through the scaler
            self.model = accelerator.prepare_model(self.model)
            self.optimizer = accelerator.prepare_optimizer(built.optimizer)
        # set by Trainer's inner loop before it calls training_step
        self.trainer.current_gradient_accumulation_steps = grad_accum
        self._mark: Optional[Mark] = None
        compute_loss = self.trainer.compute_loss

        def marked_compute_loss(*args, **kwargs):  # the forward ends when compute_loss returns the loss
            loss = compute_loss(*args, **kwargs)
            if self._mark is not None:
                self._mark("forward")
            return loss

        self.trainer.compute_loss = marked_compute_loss

    def step(self, ids: torch.Tensor, mark: Mark = lambda phase: None) -> torch.Tensor:
        """One optimizer step: grad_accum calls of Trainer.training_step, then the optimizer step; returns the
        last call's loss (detached, as training_step returns it)."""
        mark("start")
        self._mark = mark
        # Trainer counts the labels of the whole accumulated batch (labels != -100) and passes the count to
        # the model's loss, which then sums and divides by it
        items = torch.tensor(ids.numel() * self.grad_accum, device=ids.device)
        try:
            for _ in range(self.grad_accum):
                loss = self.trainer.training_step(self.model, {"input_ids": ids, "labels": ids, **self.built.inputs},
                                                  items)
                mark("backward")
        finally:
            self._mark = None
        _finish(self.built, mark, self.optimizer.step)
        return loss

    def close(self) -> None:
        self._dir.cleanup()


__all__ = ["AUTOCAST_DTYPES", "PlainLoop", "TrainerLoop"]
