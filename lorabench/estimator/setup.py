"""How a training step is run (TrainingSetup) and the choices each of its settings takes. Pure Python: no torch
import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Collection, Dict, Optional, Tuple

from lorabench.errors import LorabenchError
from lorabench.spelling import option
from lorabench.estimator.batches import PADDING, Lengths
from lorabench.estimator.optimizer import OPTIMIZER_NAMES
from lorabench.models.spec import ModelSpec

# Bytes per element of the dtypes a base, an adapter or an activation can have.
FLOAT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
QUANTIZED = ("int8", "nf4")
DTYPES = tuple(FLOAT_BYTES) + QUANTIZED

# "auto": the attention transformers runs for the family (Arch.attention).
ATTENTION = ("auto", "sdpa", "eager")
DEVICES = ("cuda", "cpu")
# Whose layers run the step: "peft" (Hugging Face transformers + PEFT, what users run) or "lorabench"
# (lorabench.nn's own modules). They differ in what autograd keeps; see lorabench.estimator.layer_saves.
IMPLS = ("peft", "lorabench")
# What estimates and bench measure unless told otherwise: what users run.
DEFAULT_IMPL = "peft"
# The phases of one step, which memory peaks and step time are split by.
PHASES = ("forward", "backward", "optimizer")
# Activations kept in host memory: "checkpoints" keeps each checkpointed layer's input there (Unsloth's offloaded
# gradient checkpointing, axolotl's activation_offloading: hidden_states); estimated in estimator.activations,
# measured through measure.offload.
OFFLOAD = ("none", "checkpoints")
# The training loop: "plain" keeps the model's output (its logits) alive through backward and the optimizer
# step; "trainer" is transformers.Trainer.training_step: only the loss is kept, the outputs are freed before
# backward.
LOOPS = ("plain", "trainer")
# Autocast mixed precision over an fp32 model (Trainer's bf16=True / fp16=True).
AUTOCAST = ("bf16", "fp16")
# The causal-LM loss: transformers' (full tokens x vocab logits), a chunked cross-entropy that recomputes each
# chunk's logits in backward (lorabench.nn.loss), or Liger's fused linear cross-entropy.
LOSSES = ("standard", "chunked", "fused-linear")
# The chunked loss's bound on tokens per chunk: one chunk's logits, (a + 4) x chunk x V bytes, stay below
# the full logits of any step this size covers (65,536 tokens x 256k vocab x 6 bytes is 100 GB).
MAX_LOSS_CHUNK = 65536
MAX_GRAD_ACCUM = 65536


@dataclass(frozen=True)
class TrainingSetup:
    """How the step is run.

    Attributes:
        batch_size: sequences per step (per GPU).
        seq_len: tokens per sequence.
        dtype: storage dtype of the base weights: fp32, bf16, fp16, or int8/nf4 (a quantized frozen base
            computing in bf16).
        adapter_dtype: storage dtype of adapter parameters (fp32, as PEFT keeps them).
        optimizer: adamw, adamw-8bit, paged-adamw-8bit, paged-adamw (bitsandbytes; paged states live in CUDA
            unified memory and count as device memory until evicted), sgd or sgd-momentum.
        grad_checkpointing: keep only each decoder layer's input; recompute the layer in backward.
        attention: "sdpa" (flash / memory-efficient kernels: no s x s tensor), "eager" (softmax kept) or
            "auto": what transformers runs for the family (eager for Gemma 2, sdpa otherwise).
        dropout: LoRA dropout on the adapter input (0 means the layer is skipped).
        master_weights: keep an fp32 copy of trainable weights and fp32 optimizer states (mixed precision
            as in Micikevicius et al. 2018, DeepSpeed and Megatron), beside the low-precision weights.
        device: "cuda" (foreach AdamW, runtime overhead) or "cpu" (per-tensor AdamW, no overhead).
        alpha: LoRA alpha (scale alpha/r); it changes no memory, only the numbers the model computes.
        impl: "peft" (transformers + PEFT: each adapted layer casts its input to the adapter dtype and
            keeps that copy; the model's output keeps a KV cache) or "lorabench" (lorabench.nn: adapters
            share the layer's input in the activation dtype; no cache).
        loop: "plain" or "trainer" (LOOPS).
        autocast: None, or "bf16"/"fp16": autocast mixed precision over fp32 weights (dtype must be fp32).
        grad_accum: micro-batches per optimizer step (batch_size each); gradients stay alive between them.
        loss: "standard", "chunked" or "fused-linear" (LOSSES).
        loss_chunk: tokens per chunk of the chunked loss.
        kbit_prepare: peft.prepare_model_for_kbit_training on a quantized base (fp32 upcasts of the
            non-quantized parameters, gradient checkpointing as setup.grad_checkpointing says).
        padding: "none" (every row seq_len tokens of one example, no mask), "longest" (rows padded to the
            batch's longest example) or "max" (to seq_len); see lorabench.estimator.batches.
        packing: rows of seq_len filled with whole examples, kept apart by position_ids.
        padding_free: the batch's examples in one row, kept apart by position_ids (FlashAttention's
            variable-length kernel on CUDA).
        lengths: the examples' token lengths (batches.Lengths), capped at seq_len; None: every example
            seq_len long.
        offload: "none", or "checkpoints": each checkpointed layer's input in host memory (OFFLOAD).
    """

    batch_size: int = 1
    seq_len: int = 2048
    dtype: str = "bf16"
    adapter_dtype: str = "fp32"
    optimizer: str = "adamw"
    grad_checkpointing: bool = False
    attention: str = "auto"
    dropout: float = 0.0
    master_weights: bool = False
    device: str = "cuda"
    alpha: float = 16.0
    impl: str = DEFAULT_IMPL
    loop: str = "trainer"
    autocast: Optional[str] = None
    grad_accum: int = 1
    loss: str = "standard"
    loss_chunk: int = 1024
    kbit_prepare: bool = False
    padding: str = "none"
    packing: bool = False
    padding_free: bool = False
    lengths: Optional[Lengths] = None
    offload: str = "none"

    def validate(self) -> None:
        """Raises LorabenchError for any value out of range."""
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise LorabenchError(f"batch size must be a positive integer, got {self.batch_size!r}.")
        if not isinstance(self.seq_len, int) or self.seq_len <= 0:
            raise LorabenchError(f"sequence length must be a positive integer, got {self.seq_len!r}.")
        _choice("dtype", self.dtype, DTYPES)
        _choice("adapter dtype", self.adapter_dtype, tuple(FLOAT_BYTES))
        _choice("optimizer", self.optimizer, OPTIMIZER_NAMES)
        _choice("attention", self.attention, ATTENTION)
        _choice("device", self.device, DEVICES)
        _choice("implementation", self.impl, IMPLS)
        _choice("loop", self.loop, LOOPS)
        _choice("loss", self.loss, LOSSES)
        if self.autocast is not None:
            _choice("autocast dtype", self.autocast, AUTOCAST)
            if self.dtype != "fp32":
                raise LorabenchError(f"autocast runs an fp32 model in {self.autocast}; give {option('dtype', 'fp32')} "
                                     f"(got {self.dtype}).")
        if not isinstance(self.grad_accum, int) or not 1 <= self.grad_accum <= MAX_GRAD_ACCUM:
            raise LorabenchError(f"gradient accumulation must be an integer from 1 to {MAX_GRAD_ACCUM}, "
                                 f"got {self.grad_accum!r}.")
        check_loss_chunk(self.loss_chunk)
        if self.kbit_prepare and self.dtype not in QUANTIZED:
            raise LorabenchError(f"{option('kbit_prepare')} prepares a quantized base; give {option('dtype', 'nf4')} "
                                 "or int8.")
        if not 0.0 <= self.dropout < 1.0:  # (NaN fails this too)
            raise LorabenchError(f"dropout must be in [0, 1), got {self.dropout!r}.")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise LorabenchError(f"alpha must be a positive finite number, got {self.alpha!r}.")
        self._validate_batches()
        _choice("offload", self.offload, OFFLOAD)
        if self.offload == "checkpoints" and not self.grad_checkpointing:
            raise LorabenchError(f"{option('offload', 'checkpoints')} keeps the checkpointed layers' inputs in host "
                                 f"memory; add {option('grad_checkpointing')}.")
        if self.offload != "none" and self.impl == "lorabench":
            raise LorabenchError(f"{option('offload')} runs transformers' checkpointed layers; give "
                                 f"{option('impl', 'peft')}.")

    def _validate_batches(self) -> None:
        _choice("padding", self.padding, PADDING)
        if self.padding != "none" and (self.packing or self.padding_free):
            what = option("packing") if self.packing else option("padding_free")
            raise LorabenchError(f"{what} leaves no padding; drop {option('padding', self.padding)}.")
        if self.lengths is not None:
            if not isinstance(self.lengths, Lengths):
                raise LorabenchError(f"lengths must be token lengths (lorabench's Lengths), got {self.lengths!r}.")
            if self.padding == "none" and not (self.packing or self.padding_free):
                raise LorabenchError(f"examples' lengths shape padded, packed or padding-free batches; give "
                                     f"{option('padding', 'longest')}, {option('packing')} or "
                                     f"{option('padding_free')}.")
        if self.impl == "lorabench" and self.batched:
            raise LorabenchError(f"lorabench's own layers take no attention mask or position_ids; give "
                                 f"{option('impl', 'peft')} for padded, packed or padding-free batches.")

    @property
    def batched(self) -> bool:
        """Rows are padded, packed or padding-free (anything but one example of seq_len tokens per row)."""
        return self.padding != "none" or self.packing or self.padding_free

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    def for_spec(self, spec: ModelSpec) -> "TrainingSetup":
        """This setup with "auto" attention resolved to the family's."""
        if self.attention != "auto":
            return self
        return replace(self, attention="sdpa" if spec.single_matrix else spec.arch.attention)

    @property
    def uses_bf16(self) -> bool:
        """The step computes in bf16 somewhere: bf16 weights or adapters, bf16 autocast, or a quantized base
        (bitsandbytes computes in bf16 here), so it needs a GPU with bf16 (gpus.GPU.has_bf16)."""
        return "bf16" in (self.dtype, self.adapter_dtype, self.autocast) or self.dtype in QUANTIZED

    @property
    def act_bytes(self) -> int:
        """Bytes of one activation element out of a matrix product: quantized bases compute in bf16 (bnb's
        compute dtype), unless peft.prepare_model_for_kbit_training cast the embeddings, norms and head to
        fp32: then the residual stream, attention and logits are fp32 (4-bit layers cast x to bf16 and their
        output back). Under autocast, the autocast dtype."""
        if self.autocast:
            return FLOAT_BYTES[self.autocast]
        return 4 if self.kbit_prepare else FLOAT_BYTES.get(self.dtype, 2)

    @property
    def stream_bytes(self) -> int:
        """Bytes of one element of the residual stream and the norms. Under autocast it stays in the weights'
        fp32: the embedding is not autocast, and adding a bf16 product to the fp32 residual promotes to fp32
        (torch's autocast runs only its listed ops, linear and SDPA among them, in the lower precision)."""
        return FLOAT_BYTES[self.dtype] if self.autocast else self.act_bytes

    @property
    def base_keeps_input(self) -> bool:
        """Whether a frozen quantized base layer keeps its input for backward. bitsandbytes' MatMul4Bit
        keeps only the packed weight (its input gradient needs no x). LLM.int8() keeps its input A whenever
        the graph records it, as an attribute of its autograd context, not a saved tensor, so it lives as
        long as the graph, checkpointing or not (layer_saves): on the CPU MatMul8bitFp (dequantize, then
        F.linear) sets ctx.A; on CUDA MatMul8bitLt sets ctx.tensors = (CAt, subA, A) once A needs a gradient
        (bitsandbytes 0.50 autograd/_functions.py), subA being the fp16 outlier columns (|x| > threshold),
        which depend on the data and are not counted."""
        return self.dtype == "int8"


# The settings whose names are typed in any case (the CLI's case-insensitive choices).
ANY_CASE = ("dtype", "adapter_dtype", "optimizer", "attention")


def setup_from(fields: Dict[str, object], given: Collection[str]) -> TrainingSetup:
    """The TrainingSetup that the user's settings (fields: TrainingSetup's, by name; given: the ones the user
    set, the rest being defaults) mean, for the CLI's options and the API's keywords alike: autocast alone
    means fp32 weights; a loss chunk applies to the chunked loss only.

    Raises:
        LorabenchError: a loss chunk given for another loss.
    """
    fields = {k: (v.lower() if k in ANY_CASE and isinstance(v, str) else v) for k, v in fields.items()}
    _lengths_from(fields, given)
    if fields.get("autocast") and "dtype" not in given:
        fields["dtype"] = "fp32"  # autocast runs over fp32 weights: autocast alone means that
    loss = fields.get("loss", "standard")
    if "loss_chunk" in given and loss != "chunked":
        raise LorabenchError(f"{option('loss_chunk')} applies to {option('loss', 'chunked')} only (got "
                             f"{option('loss', loss)}).")
    return TrainingSetup(**fields)


def _lengths_from(fields: Dict[str, object], given: Collection[str]) -> None:
    """fields' lengths (a lengths file's path, a list of lengths, or Lengths) and mean_len (a summary whose longest
    is seq_len) as one Lengths; a file's longest is seq_len when seq_len is not given."""
    import os

    from lorabench.estimator.batches import read_lengths

    lengths, mean = fields.get("lengths"), fields.pop("mean_len", None)
    if lengths is not None and mean is not None:
        raise LorabenchError(f"give {option('lengths')} or {option('mean_len')}, not both.")
    if isinstance(lengths, (str, os.PathLike)):
        lengths = read_lengths(os.fspath(lengths))
    elif isinstance(lengths, (list, tuple)):
        lengths = Lengths.of(lengths)
    if isinstance(lengths, Lengths) and lengths.counts and "seq_len" not in given:
        fields["seq_len"] = lengths.longest
    if mean is not None:
        if isinstance(mean, bool) or not isinstance(mean, (int, float)) or not math.isfinite(mean) or mean <= 0:
            raise LorabenchError(f"the mean length must be a positive number of tokens, got {mean!r}.")
        longest = fields.get("seq_len", TrainingSetup.seq_len)
        if isinstance(longest, int) and mean > longest:
            raise LorabenchError(f"the mean length must be at most the longest, {option('seq_len')} ({longest:,}), "
                                 f"got {mean:g}.")
        lengths = Lengths.summary(mean, longest)
    if lengths is not None:
        fields["lengths"] = lengths


def check_loss_chunk(chunk: int) -> int:
    """chunk, or LorabenchError when it is not an integer in [1, MAX_LOSS_CHUNK] (TrainingSetup and
    lorabench.nn.loss both check it)."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or not 1 <= chunk <= MAX_LOSS_CHUNK:
        raise LorabenchError(f"loss chunk must be an integer from 1 to {MAX_LOSS_CHUNK} tokens, got {chunk!r}.")
    return chunk


def _choice(what: str, value: str, allowed: Tuple[str, ...]) -> None:
    if value not in allowed:
        raise LorabenchError(f"unknown {what} '{value}'; choose from {', '.join(allowed)}.")
