"""A training step traced at full size without its memory: the bench's own build (transformers + PEFT, or
lorabench.nn) made on the meta device, its parameters and buffers then given back as fake CPU tensors
(torch's FakeTensorMode: shapes, dtypes and storages, no data), and the bench's own loop run for a warm-up
step and a measured one under the live-tensor tracker. Every op runs its CPU kernel's shape logic, so the bytes
alive at each op are the real CPU step's, to the byte on the cases tests/test_trace.py compares.

trace_case traces a described case as the bench builds it (float bases, the CPU's kernels, unpadded and unpacked
rows: _stated_inputs); trace_built steps any built model, which the tracing engine (measure.traced) uses for any
config, quantized bases included (measure.tracequant).
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from unittest import mock
from typing import Dict, List, Optional

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from lorabench.errors import LorabenchError
from lorabench.estimator.case import Case
from lorabench.estimator.params import count_params
from lorabench.estimator.setup import DEFAULT_IMPL, QUANTIZED
from lorabench.measure.builders import BUILDERS
from lorabench.measure.batches import batch_tensors
from lorabench.measure.images import ImagePlan, held, held_tensor, holding
from lorabench.measure.offload import host_memory
from lorabench.measure.oplog import OpLog, as_list
from lorabench.measure.probes import MemoryProbe
from lorabench.measure.routing import balanced, experts
from lorabench.measure.segments import SegmentTracker, StepSegments
from lorabench.measure.steps import forward_with_loss, stepper


def fake_tensors(mode: FakeTensorMode):
    """A builder's wrap: every parameter and buffer of the (meta) model replaced by a fake CPU tensor of its shape,
    dtype and requires_grad, made under `mode`. (Module.to would swap tensors, which fake ones refuse.)"""
    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        made = {}  # id of the meta tensor -> its fake one: a tensor two modules share (tied embeddings) stays one

        def fake(t: torch.Tensor, parameter: bool) -> torch.Tensor:
            if isinstance(t, FakeTensor):  # made fake already (a quantized base's storage, measure.tracequant)
                return t
            if id(t) not in made:
                with mode:
                    new = torch.zeros(t.shape, dtype=t.dtype, device="cpu")
                made[id(t)] = torch.nn.Parameter(new, requires_grad=t.requires_grad) if parameter else new
            return made[id(t)]

        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None:
                    module._parameters[name] = fake(p, True)
            for name, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[name] = fake(b, False)
        return model
    return wrap


def _stepper_on_fake(built, setup, device):
    """measure.steps.stepper for fake tensors: Trainer's move of the model to the CPU (where it is) is skipped, and
    accelerate's (under autocast) too, because Module.to swaps fake parameters, which they refuse."""
    if setup.loop != "trainer":
        return stepper(built, setup, device)
    import accelerate
    import transformers

    prepare = accelerate.Accelerator.prepare_model

    def in_place(self, model, device_placement=None, evaluation_mode=False):  # autocast: the model stays put
        return prepare(self, model, device_placement=False, evaluation_mode=evaluation_mode)

    with mock.patch.object(transformers.Trainer, "_move_model_to_device", lambda self, model, device: None), \
            mock.patch.object(accelerate.Accelerator, "prepare_model", in_place):
        return stepper(built, setup, device)


def _holds_batch(setup) -> bool:
    """The batch's values are held (and read by transformers) in the trace: _stated_inputs."""
    return setup.batched and not (setup.padding_free and setup.device == "cuda")


@contextlib.contextmanager
def _stated_inputs(setup, mode: Optional[FakeTensorMode]):
    """The trace's rule for what depends on the data, which fake tensors do not hold. Rows of one unpadded
    sequence each (the bench's inputs, unbatched): transformers reads its inputs to skip the attention mask when no
    row packs several sequences (masking_utils.find_packed_sequence_indices); on fake tensors it cannot, and would
    build the full mask that the real step never makes. Here it is told the answer: none packed. A padded, packed
    or padding-free batch (measure.batches) is given as fake tensors that hold their values (images.holding), which
    transformers reads as it reads real ones; but a padding-free row on CUDA runs FlashAttention's variable-length
    kernel, which needs no mask: it is told none packed too."""
    if _holds_batch(setup) and mode is not None:
        with holding(mode):
            yield
        return
    try:
        from transformers import masking_utils
    except ImportError:  # lorabench's own layers read nothing
        yield
        return
    with mock.patch.object(masking_utils, "find_packed_sequence_indices", lambda *args, **kwargs: None):
        yield


# torch.rand's largest value (float32 just under 1): "rand() > p" holds for any p < 1
RAND_MAX = 1 - 2 ** -24


@contextlib.contextmanager
def _modules_kept():
    """The trace's rule for module dropout, a coin tossed per step (PEFT's LoHa and LoKr skip the adapter when
    torch.rand(1) <= module_dropout, whose value fake tensors do not hold): the adapter is applied, what it always
    is at module_dropout 0 (PEFT's default), and the step that keeps more otherwise. torch.rand(1) gives rand's
    largest value, as a constant that the fake tensors hold; every other draw is left as it is."""
    rand = torch.rand

    def kept(*size, **kwargs):
        if size in ((1,), ((1,),)) and not kwargs:
            return torch.tensor([RAND_MAX])
        return rand(*size, **kwargs)

    with mock.patch.object(torch, "rand", kept):
        yield


def trace_built(built, setup, mode: Optional[FakeTensorMode], warmup: int = 1,
                layers: Optional[List[torch.nn.Module]] = None, images: Optional[ImagePlan] = None,
                routed: int = 0) -> Dict:
    """built (its tensors fake ones of `mode`, or real CPU tensors with mode None) stepped `warmup` times, then
    once more with the memory read at the phase boundaries (the bench's _memory_step) and its ops counted by
    phase (measure.oplog: matrix products and attention with their FLOPs, memory-bound ops with their bytes). Adds
    ops (oplog.as_list), flops (the products' and attention's, forward and backward), logits_bytes (the output
    head's last output, as it is made; 0 where the loss takes the hidden states) and, given the decoder `layers`,
    segments: each segment's peak (measure.segments), which extrapolate in depth where the phases' peaks may not.
    images: a vision-language step's images (measure.images), their tokens in the ids and their inputs beside them,
    their values held under measure.images.held. routed: a mixture of experts' count whose routing is given,
    balanced (measure.routing)."""
    from lorabench.measure.bench import _memory_step

    device = torch.device("cpu")
    head = _output_head(built.model)
    logits = {"bytes": 0}
    hook = head.register_forward_hook(
        lambda module, args, out: logits.update(bytes=out.untyped_storage().nbytes())) if head is not None else None
    tracker = SegmentTracker("cpu")
    segments = StepSegments(tracker, setup.grad_accum)
    step, close = _stepper_on_fake(built, setup, device)
    handles: list = []
    given = images.batch(setup.batch_size, setup.seq_len) if images is not None else {}
    if images is None and setup.batched:  # made as real tensors, then held by the fake ones inside the step
        given = batch_tensors(setup, 1, torch.Generator())
    try:
        with mode or contextlib.nullcontext(), held(images, mode), balanced(routed, mode), tracker, \
                _stated_inputs(setup, mode if images is None else None), \
                _modules_kept() if mode is not None else contextlib.nullcontext():
            probe = MemoryProbe(device, tracker)  # before the weights: they count, as in the bench
            tracker.track(built.base_tensors + built.adapter_tensors)
            if given:
                hold = images is not None or _holds_batch(setup) or mode is None
                built.inputs.update({k: held_tensor(t, mode) if hold else mode.from_tensor(t).clone()
                                     for k, t in given.items()})
                ids = built.inputs.pop("input_ids")
            else:
                ids = torch.zeros((setup.batch_size, setup.seq_len), dtype=torch.long)
            for _ in range(warmup):
                step(ids, lambda phase: None)
            handles = segments.hooks(layers or [])
            log = OpLog(experts(built.model))  # holds no tensor: the step's bytes are as without it

            def logged(ids, mark):
                return step(ids, lambda phase: (log.mark(phase), mark(phase)))

            with log, host_memory(tracker.as_host):  # offloaded copies (measure.offload) count as host memory
                rec = _memory_step(built, logged, ids, probe, settle=segments.settle)
            rec["measured_host_bytes"] = tracker.host_peak_bytes
    finally:
        close()
        for h in handles + ([hook] if hook is not None else []):
            h.remove()
    rec["flops"] = log.flops
    rec["ops"] = as_list(log.ops)
    rec["logits_bytes"] = logits["bytes"]
    if layers:
        rec["segments"] = dict(tracker.segment_peaks)
    return rec


def _output_head(model):
    """The module that makes the logits (transformers' get_output_embeddings, through PEFT's wrapper), or None."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    return head if isinstance(head, torch.nn.Module) else None


def trace_case(case: Case, impl: str = DEFAULT_IMPL, seed: int = 0, warmup: int = 1) -> Dict[str, int]:
    """The bytes of one steady-state step of `case` on the CPU, traced: the bench's measured_* memory fields
    (per-phase peaks, weights, adapters, gradients, optimizer states), with nothing allocated.

    Raises:
        LorabenchError: a quantized base, or what the bench's builder refuses.
    """
    spec, setup = case.spec, case.setup.for_spec(case.spec)
    if setup.dtype in QUANTIZED:
        raise LorabenchError(f"a {setup.dtype} base is not traced yet (its storage layout without the kernels).")
    if setup.device != "cpu":
        raise LorabenchError("only the CPU's kernels are traced yet: give device='cpu'.")
    if warmup < 1:
        raise LorabenchError("warmup must be at least 1: the first step creates the optimizer states.")
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    targets = count_params(spec, case.method, case.rank, case.targets).targets
    built = BUILDERS[impl](replace(case, targets=targets, setup=setup), torch.device("meta"), seed, fake_tensors(mode))
    built = forward_with_loss(built, spec, setup, torch.device("cpu"), impl)
    rec = trace_built(built, setup, mode, warmup)
    return {k: v for k, v in rec.items() if k.startswith("measured_")}
