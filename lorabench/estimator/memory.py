"""GPU memory of one training step, component by component, and its peak over the phases of a step.

Pure Python: no torch import. The activation model counts the tensors autograd saves for backward in
a Hugging Face Llama/GPT-2 decoder layer (and in lorabench.nn, which runs the same ops), op by op:
which are kept depends on which weights are trainable, which is what makes LoRA-FA and VeRA cheaper.
Every formula names its source; "autograd" means PyTorch's derivatives.yaml (what each op's backward
saves), checked by measurement in `lorabench bench`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Tuple

from lorabench.errors import LorabenchError
from lorabench.gpus import MiB
from lorabench.methods import Method
from lorabench.estimator.params import ParamCount, adapter_tensors, base_tensors, count_base_params, count_params
from lorabench.models.spec import MOE_TARGETS, ModelSpec

# Bytes per element of the dtypes a base, an adapter or an activation can have.
FLOAT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
QUANTIZED = ("int8", "nf4")
DTYPES = tuple(FLOAT_BYTES) + QUANTIZED

# bitsandbytes NF4 (Dettmers et al. 2023, QLoRA sec. 2): 4-bit codes, one absmax per 64-element block.
# With double quantization the absmax values are themselves 8-bit, one fp32 constant per 256 blocks,
# plus a 256-entry fp32 code book per tensor: 8/64 + 32/(64*256) bits of constants per parameter. Each
# tensor's QuantState also holds its own copy of the 16-value NF4 code (fp32) and the fp32 offset
# subtracted from the absmax before their quantization (bitsandbytes.functional.quantize_4bit).
NF4_BLOCK = 64
NF4_DQ_BLOCK = 256
NF4_CODE = 16
DQ_CODE = 256
# bitsandbytes LLM.int8() (Dettmers et al. 2022): int8 weights plus one fp32 scale per output row.

# Optimizer states per trainable element. Torch keeps AdamW's exp_avg/exp_avg_sq and SGD's momentum
# buffer in the parameter's dtype (zeros_like); bitsandbytes' 8-bit AdamW keeps two uint8 states with an
# fp32 absmax per 256-element block, and fp32 states for tensors under 4096 elements (min_8bit_size).
BNB_OPTIMIZERS = ("adamw-8bit", "paged-adamw-8bit", "paged-adamw")  # bitsandbytes': one fused kernel per tensor
OPTIMIZERS = ("adamw",) + BNB_OPTIMIZERS + ("sgd", "sgd-momentum")
BNB_BLOCK = 256
BNB_MIN_8BIT_SIZE = 4096

# "auto": the attention transformers runs for the family (Arch.attention).
ATTENTION = ("auto", "sdpa", "eager")
DEVICES = ("cuda", "cpu")
# Whose layers run the step: "peft" (Hugging Face transformers + PEFT, what users run) or "lorabench"
# (lorabench.nn's own modules). They differ in what autograd keeps; see _adapter_saves and estimate_activations.
IMPLS = ("peft", "lorabench")
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

# The runtime's own memory on a CUDA device, outside the caching allocator's counters: the CUDA context
# (kernels, cuBLAS/cuDNN handles; lazy module loading on) and cuBLAS's workspace. Measured with NVML on an
# H100 80GB, driver 580.159, torch 2.11 + CUDA 13.0: 676 MiB outside the allocator after the first bf16
# matmul (reports/probes/README.md); it varies a little with driver, CUDA and torch versions.
CUDA_CONTEXT_BYTES = 676 * MiB
CUBLAS_WORKSPACE_BYTES = 32 * MiB


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
    impl: str = "peft"
    loop: str = "trainer"
    autocast: Optional[str] = None
    grad_accum: int = 1
    loss: str = "standard"
    loss_chunk: int = 1024
    kbit_prepare: bool = False

    def validate(self) -> None:
        """Raises LorabenchError for any value out of range."""
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise LorabenchError(f"batch size must be a positive integer, got {self.batch_size!r}.")
        if not isinstance(self.seq_len, int) or self.seq_len <= 0:
            raise LorabenchError(f"sequence length must be a positive integer, got {self.seq_len!r}.")
        _choice("dtype", self.dtype, DTYPES)
        _choice("adapter dtype", self.adapter_dtype, tuple(FLOAT_BYTES))
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("attention", self.attention, ATTENTION)
        _choice("device", self.device, DEVICES)
        _choice("implementation", self.impl, IMPLS)
        _choice("loop", self.loop, LOOPS)
        _choice("loss", self.loss, LOSSES)
        if self.autocast is not None:
            _choice("autocast dtype", self.autocast, AUTOCAST)
            if self.dtype != "fp32":
                raise LorabenchError(f"autocast runs an fp32 model in {self.autocast}; give --dtype fp32 "
                                     f"(got {self.dtype}).")
        if not isinstance(self.grad_accum, int) or not 1 <= self.grad_accum <= MAX_GRAD_ACCUM:
            raise LorabenchError(f"gradient accumulation must be an integer from 1 to {MAX_GRAD_ACCUM}, "
                                 f"got {self.grad_accum!r}.")
        check_loss_chunk(self.loss_chunk)
        if self.kbit_prepare and self.dtype not in QUANTIZED:
            raise LorabenchError("--kbit-prepare prepares a quantized base; give --dtype nf4 or int8.")
        if not 0.0 <= self.dropout < 1.0:  # (NaN fails this too)
            raise LorabenchError(f"dropout must be in [0, 1), got {self.dropout!r}.")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise LorabenchError(f"alpha must be a positive finite number, got {self.alpha!r}.")

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
        long as the graph, checkpointing or not (_layer_saves): on the CPU MatMul8bitFp (dequantize, then
        F.linear) sets ctx.A; on CUDA MatMul8bitLt sets ctx.tensors = (CAt, subA, A) once A needs a gradient
        (bitsandbytes 0.50 autograd/_functions.py), subA being the fp16 outlier columns (|x| > threshold),
        which depend on the data and are not counted."""
        return self.dtype == "int8"


def check_loss_chunk(chunk: int) -> int:
    """chunk, or LorabenchError when it is not an integer in [1, MAX_LOSS_CHUNK] (TrainingSetup and
    lorabench.nn.loss both check it)."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or not 1 <= chunk <= MAX_LOSS_CHUNK:
        raise LorabenchError(f"loss chunk must be an integer from 1 to {MAX_LOSS_CHUNK} tokens, got {chunk!r}.")
    return chunk


def _choice(what: str, value: str, allowed: Tuple[str, ...]) -> None:
    if value not in allowed:
        raise LorabenchError(f"unknown {what} '{value}'; choose from {', '.join(allowed)}.")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one training step. *_bytes are per GPU without sharding; overhead_bytes is apart.

    peak_bytes is what the caching allocator's peak (torch.cuda.max_memory_allocated) should read;
    device_bytes = peak_bytes + overhead_bytes is what nvidia-smi/NVML should show for the process,
    before allocator fragmentation.
    """

    method: str
    rank: Optional[int]
    targets: Tuple[str, ...]
    trainable_params: int
    total_params: int
    trainable_pct: float
    weights_bytes: int
    adapter_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    master_bytes: int
    method_state_bytes: int
    activations_bytes: int
    logits_bytes: int
    overhead_bytes: int
    forward_peak_bytes: int
    backward_peak_bytes: int
    optimizer_peak_bytes: int
    peak_bytes: int
    peak_phase: str
    device_bytes: int
    updates_base_weights: bool
    notes: Tuple[str, ...] = field(default=())


# --------------------------------------------------------------------------------------------------
# Persistent state: weights, adapters, gradients, optimizer states.


def _quantized_linear_bytes(dtype: str, in_f: int, out_f: int) -> int:
    """Bytes of one quantized frozen weight with its quantization constants (bitsandbytes layout)."""
    numel = in_f * out_f
    if dtype == "int8":
        return numel + 4 * out_f  # int8 codes + fp32 row scales (SCB)
    blocks = math.ceil(numel / NF4_BLOCK)
    # packed 4-bit codes, uint8 absmax per block, fp32 absmax per 256 blocks, the fp32 code books of both
    # quantizations and the offset
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / NF4_DQ_BLOCK) + 4 * (DQ_CODE + NF4_CODE + 1)


def weights_bytes(spec: ModelSpec, dtype: str, kbit_prepare: bool = False) -> int:
    """Base weights. Quantized bases quantize the decoder's Linear weights only; embeddings, the
    output head, norms and biases stay in bf16 (transformers keeps the head out of bitsandbytes), or in fp32
    after peft.prepare_model_for_kbit_training (peft/utils/other.py casts every bf16/fp16 parameter that
    is not a Params4bit to fp32)."""
    total = count_base_params(spec)
    if dtype in FLOAT_BYTES:
        return total * FLOAT_BYTES[dtype]
    shapes = spec.linear_shapes().values()
    quant_numel = spec.num_layers * sum(i * o for i, o, _ in shapes)
    quant = spec.num_layers * sum(_quantized_linear_bytes(dtype, i, o) for i, o, _ in shapes)
    return quant + (total - quant_numel) * (4 if kbit_prepare else 2)


def _trainable_tensors(spec: ModelSpec, method: Method, rank: Optional[int],
                       targets: Tuple[str, ...]) -> Tuple[Tuple[int, int], ...]:
    """(numel, count) of each kind of trainable tensor: bnb's 8-bit optimizer decides per tensor."""
    L = spec.num_layers
    if not method.base_trainable:
        out = []
        for t in targets:
            out += [(numel, L) for numel, trains in adapter_tensors(spec, method, rank, t) if trains]
        return tuple(out)
    return base_tensors(spec)


def optimizer_state_bytes(optimizer: str, numel: int, param_bytes: int) -> int:
    """Optimizer state of one trainable tensor of numel elements stored in param_bytes each."""
    if optimizer == "adamw":
        return 2 * numel * param_bytes
    if optimizer == "sgd-momentum":
        return numel * param_bytes
    if optimizer == "paged-adamw":  # bitsandbytes' 32-bit AdamW: fp32 states whatever the parameter's dtype
        return 2 * numel * 4
    if optimizer in ("adamw-8bit", "paged-adamw-8bit"):  # paging moves the states, it does not shrink them
        if numel < BNB_MIN_8BIT_SIZE:
            return 2 * numel * 4
        return 2 * numel + 2 * 4 * math.ceil(numel / BNB_BLOCK)
    return 0


# --------------------------------------------------------------------------------------------------
# Activations: bytes saved for backward per token, op by op.


def _adapter_saves(method: Method, setup: TrainingSetup, rank: int, in_f: int, out_f: int,
                   dropout: float, x_bytes: Optional[int] = None, live: bool = True) -> Tuple[bool, int]:
    """(keeps the shared input x, other bytes per token) that one adapter saves for backward.

    LoRA: B's input z = A x (r) is kept for B's gradient; A's gradient needs x, unless A is frozen
    (LoRA-FA, Zhang et al. 2023 sec. 3: only the r-dim projection is kept). With dropout, A's input is the
    dropped copy of x (kept) and dropout keeps its bool mask (autograd: native_dropout saves the mask).
    DoRA: also the combined output W x + s B A x, which the magnitude's gradient needs.
    VeRA: d's gradient needs A x (r), b's needs B(d * A x) (out); A and B are frozen, so x is not kept.
    Dropout's mask is kept only when x needs a gradient (live): a bool per element on CUDA (native_dropout),
    and on the CPU, where torch's dropout is x * (bernoulli noise / (1 - p)), the noise in x's dtype.

    PEFT (impl="peft") casts x to the adapter dtype in every adapted layer (`_cast_input_dtype`) and
    computes the adapter there: when that dtype differs from x's, each layer keeps its own copy of x (ad
    in) instead of sharing x, and A x, B(...) are ad-wide. PEFT's DoRA (`DoraLinearLayer.forward`) keeps the
    base output (a out) and the low-rank output (ad out) apart. Under autocast every product runs in the
    autocast dtype: autocast casts x (x_bytes wide as it arrives) once more for A, a copy of its own unless
    x is already in that dtype and PEFT did not cast it to the fp32 adapters' dtype first.
    """
    a = setup.act_bytes
    xb = a if x_bytes is None else x_bytes
    peft = setup.impl == "peft"
    store = FLOAT_BYTES[setup.adapter_dtype]
    ad = a if setup.autocast or not peft else store  # the dtype the adapter's products run in
    own_copy = not xb == store == ad if peft else xb != ad  # x as A's product reads it is a copy of its own
    mask_bytes = 1 if setup.device == "cuda" else store if peft else xb  # (PEFT drops out its cast of x)
    mask = mask_bytes * in_f if dropout > 0 and live else 0
    keeps_own = method.trains_a and (dropout > 0 or own_copy)
    saved = mask + (ad * in_f if keeps_own else 0) + ad * rank
    if method.adapter.shared_pair:  # lambda_b's gradient needs its input B(lambda_d * A x)
        saved += ad * out_f
    if method.adapter.magnitude:
        # with dropout, PEFT's DoRA recomputes the base output from the dropped x in its own dtype
        # (F.linear(x, W.to(x.dtype)), dora.py): that product is the one kept, and W's copy with it
        base = ad if peft and dropout > 0 else a
        saved += base * out_f + (ad * out_f if peft else 0)
    return method.trains_a and not keeps_own, saved


def _autocast_casts(method: Method, setup: TrainingSetup, rank: int, in_f: int, out_f: int, adapted: bool,
                    live: bool) -> int:
    """Bytes of one layer's weights cast to the autocast dtype that outlive its forward. A product's
    backward needs its weight for the input's gradient, so the cast weight is kept whenever the input needs a
    gradient, frozen or not; autocast also caches every trainable leaf weight's cast until its context
    exits (torch/csrc/autograd/autocast_mode.cpp, cached_cast), so those last through forward anyway."""
    if not setup.autocast:
        return 0
    a = setup.act_bytes
    copies = a * in_f * out_f if live or method.base_trainable else 0
    if adapted and method.uses_rank:
        copies += a * rank * in_f if live or method.trains_a else 0  # A (VeRA: its slice of the shared A)
        copies += a * rank * out_f  # B: trainable (cached), or read by the trainable lambda_d's product
    return copies


def _norm_saves(spec: ModelSpec, width: int, rows: int, a: int, weight_trainable: bool) -> int:
    """Bytes per token one norm over `width` keeps once its input needs a gradient (rows: norms per token,
    e.g. one per head for a per-head q norm).

    RMSNorm as transformers writes it (x.float(); pow(2).mean; x * rsqrt): the fp32 copy of x (4 width) and
    the rsqrt (4 per row). A trainable weight keeps its other factor: x * rsqrt cast back to x's dtype (a
    width) in Llama's order (weight * x.to(dtype)); in float32 (4 width) where the product is taken before
    the cast (OLMo 2's weight * x, Gemma's x * (1 + weight)). LayerNorm (native_layer_norm): its input (a
    width) plus fp32 mean and rstd (8).
    """
    if spec.norm == "layernorm":
        return a * width + 8 * rows
    weight = (a if spec.norm == "rmsnorm" else 4) * width if weight_trainable else 0
    return 4 * width + 4 * rows + weight


def _consumers_keep_input(names, spec, method, targets, setup, dropout, rank, live: bool = False,
                          x_bytes: Optional[int] = None) -> Tuple[bool, int, int]:
    """Whether the tensor fed to the projections `names` is kept, what they keep beyond it per token, and the
    bytes of their weights cast for backward per layer (autocast). live: the input needs a gradient, so a
    quantized base that keeps its input (setup.base_keeps_input) keeps it. x_bytes: the input's element size
    (the residual stream's, or a product's: setup.act_bytes)."""
    shapes = spec.linear_shapes()
    a = setup.act_bytes
    xb = a if x_bytes is None else x_bytes
    # a trainable W needs its input for the weight gradient: x itself, or where autocast casts x (x is not
    # in its dtype) each projection's own cast, as autocast caches no activation's cast
    needs = method.base_trainable or (setup.base_keeps_input and live)
    keep = needs and xb == a
    extra = casts = 0
    for n in names:
        if n not in shapes:
            continue
        i, o, _ = shapes[n]
        adapted = n in targets and method.uses_rank
        extra += a * i if needs and xb != a else 0
        casts += _autocast_casts(method, setup, rank, i, o, adapted, live)
        if adapted:
            if method.adapter.magnitude and setup.impl == "peft" and dropout > 0 and live:
                # PEFT's DoRA with dropout: W cast to the adapter's dtype (and by autocast to its own), kept by
                # the product that recomputes the base output (_adapter_saves)
                casts += (a if setup.autocast else FLOAT_BYTES[setup.adapter_dtype]) * i * o
            keeps_x, saved = _adapter_saves(method, setup, rank, i, o, dropout, xb, live)
            keep = keep or keeps_x
            extra += saved
    return keep, extra, casts


def _eager_attention_saves(spec: ModelSpec, a: int, seq_len: int) -> int:
    """Bytes per token transformers' eager_attention_forward keeps: q and k for QK^T, where k (and v) are
    repeat_kv copies at full query width under grouped-query attention; the tanh of soft-capped scores
    (Gemma 2); the fp32 softmax output and its cast to q's dtype for the AV product; v."""
    kv = spec.q_dim if spec.num_kv_heads != spec.num_heads else spec.kv_dim
    scores = spec.num_heads * seq_len
    return (a * (spec.q_dim + 2 * kv) + scores * (4 + (a if a < 4 else 0))
            + (a * scores if spec.attn_softcap else 0))


def _moe_saves(spec: ModelSpec, method: Method, targets: Tuple[str, ...], a: int, live: bool) -> int:
    """Bytes per token a mixture-of-experts block keeps, past its input, as transformers' default
    grouped_mm experts (transformers/integrations/moe.py) and the family's router run it.

    Router: the fp32 softmax over E experts, the top-k indices (int64) and, where the top-k weights are
    renormalised (Mixtral, Qwen3-MoE), those weights and their sum. Dispatch: the sort permutation, the
    token index and the inverse permutation (int64, k each). Experts, per routed token copy (k per token):
    the gate_up output (2I, kept whole: silu keeps the gate half, the product the up half), silu's output
    (I), the down output (d, for the routing weight's gradient) and the routing weight (fp32 for Mixtral).
    A trainable expert weight (full fine-tuning, or PEFT's ParamWrapper, whose merged weight requires a
    gradient) also keeps the gathered input (d) and the product (I). Qwen2-MoE's shared expert keeps its
    gate and up outputs and silu's (3 S), its output (d) and the sigmoid gate (1).
    Measured against the tracker for every family.
    """
    if not live:
        return 0
    e, k, i, d = spec.num_experts, spec.experts_per_token, spec.expert_intermediate_size, spec.hidden_size
    routing = spec.arch.routing
    renorm = routing.renormalize
    w = a if routing.cast_back else 4
    trains_experts = method.base_trainable or (method.uses_rank and "experts" in targets)
    saved = 4 * e + 8 * k + (4 * k + 4 if renorm else 0)
    saved += k * (24 + a * d + 3 * a * i + w + (a * (d + i) if trains_experts else 0))
    if spec.shared_expert_gate:  # (the product, down's input, is counted with down's consumers)
        saved += 3 * a * spec.intermediate_size + a * d + a
    return saved


def layer_activation_bytes(spec: ModelSpec, method: Method, rank: Optional[int],
                           targets: Tuple[str, ...], setup: TrainingSetup,
                           input_needs_grad: bool = True) -> int:
    """Bytes per token one decoder layer saves for backward (no checkpointing); see _layer_saves."""
    return _layer_saves(spec, method, rank, targets, setup, input_needs_grad)[0]


def _layer_saves(spec: ModelSpec, method: Method, rank: Optional[int], targets: Tuple[str, ...],
                 setup: TrainingSetup, input_needs_grad: bool = True) -> Tuple[int, int, int]:
    """(bytes per token, bytes per layer, graph-held bytes per token) one decoder layer saves for backward
    (no checkpointing). The per-layer bytes are weights cast for backward (_autocast_casts, PEFT's DoRA with
    dropout).

    The graph-held bytes, part of the first, are the inputs that int8 bases keep (setup.base_keeps_input):
    bitsandbytes' MatMul8bitFp (CPU) and MatMul8bitLt (CUDA) store the input on their autograd context
    (`ctx.A = A`, `ctx.tensors`), not through save_for_backward, so backward does not release it after use and
    gradient checkpointing does not drop it (its saved-tensor hooks see only saved tensors): it lives as long
    as the graph, until the loss that holds the graph dies. q, k and v read one tensor; a gated MLP's gate
    and up another. Measured on the CPU tracker: a LoRA step on an int8 tiny-llama frees exactly these bytes
    when the loss is deleted after backward, and none on an nf4 (MatMul4Bit keeps only the packed weight) or
    a bf16 base.

    input_needs_grad is False for the first layer when the embeddings are frozen. Autograd records an op
    only when something it reads needs a gradient, so until the first trainable weight in that layer
    (LoRA on down only: the whole attention block and the MLP up to down) nothing is kept. The family's
    structure (spec.arch) decides the rest: where the norms sit, q/k norms, fused projections, experts.
    """
    setup = setup.for_spec(spec)
    a, s, d, i = setup.act_bytes, setup.stream_bytes, spec.hidden_size, spec.intermediate_size
    arch = spec.arch
    dropout = setup.dropout if method.applies_dropout else 0.0
    args = (spec, method, targets, setup, dropout, rank)
    full = method.base_trainable

    def trains(names) -> bool:  # a weight of these projections gets a gradient
        return full or (method.uses_rank and any(n in targets for n in names))

    def norm(width: int = d, rows: int = 1, x_bytes: int = s) -> int:  # (the residual stream's, by default)
        return _norm_saves(spec, width, rows, x_bytes, full)

    casts = 0

    def held_input(width: int, live_in: bool) -> int:  # an int8 base's input on its autograd ctx
        return a * width if setup.base_keeps_input and live_in else 0

    def out_bytes(names, x_bytes: int) -> int:
        """Element size of these projections' output: the product's dtype, except under autocast where an
        adapter multiplies its output by fp32 parameters cast to x's dtype (lorabench's VeRA lambda_b and
        DoRA scale) or casts its result to x's dtype (PEFT's VeRA): then x's."""
        adapted = method.uses_rank and any(n in targets for n in names)
        if adapted and (method.adapter.shared_pair or (method.adapter.magnitude and setup.impl == "lorabench")):
            return x_bytes
        return a

    def consumers(names, live=False, x_bytes=None):
        nonlocal casts
        keep, extra, c = _consumers_keep_input(names, *args, live=live, x_bytes=x_bytes)
        casts += c
        return keep, extra

    if spec.single_matrix:
        keep, extra = consumers(("w",), x_bytes=s)
        return (a * d if keep else 0) + extra, casts, 0
    pre, post = arch.norm_layout in ("pre", "sandwich"), arch.norm_layout in ("post", "sandwich")
    live = input_needs_grad  # the residual stream needs a gradient
    total = 0
    # Attention block: (pre-norm), q/k/v, (q/k norms), rotary (cos/sin shared by all layers), attention, o.
    total += norm() if live and pre else 0
    qkv = ("qkv",) if arch.fused_qkv else ("q", "k", "v")
    keep, extra = consumers(qkv, live, s)
    total += (s * d if keep else 0) + extra  # the norm's output (or the residual), shared by q, k and v
    held = held_input(d, live)
    if arch.qk_norm:
        head = arch.qk_norm == "head"
        if live or trains(("q", "qkv")):
            total += norm(spec.q_dim, spec.num_heads if head else 1, a)
        if live or trains(("k", "qkv")):
            total += norm(spec.kv_dim, spec.num_kv_heads if head else 1, a)
    live = live or trains(qkv)
    if live and setup.attention == "sdpa":
        # SDPA (flash / efficient kernels) keeps q, k, v, its output and fp32 logsumexp per head
        # (Dao 2023, FlashAttention-2 Alg. 2). With GQA, k and v stay at kv width (enable_gqa). (A fused
        # qkv's v is a slice of its output, but what SDPA keeps is a contiguous copy: measured.)
        total += a * (2 * spec.q_dim + 2 * spec.kv_dim) + 4 * spec.num_heads
        if arch.fused_qkv and arch.rope_copies and not _kv_cache_on(setup):
            # v is a slice of qkv's output, so SDPA's v keeps the whole output alive, q's and k's widths
            # more than v (the rotation copied q and k). transformers' KV cache, on in a PEFT step without
            # checkpointing, hands SDPA its own copies of k and v instead.
            total += a * (spec.q_dim + spec.kv_dim)
    elif live:
        total += _eager_attention_saves(spec, a, setup.seq_len)
    keep, extra = consumers(("o",), live)
    held += held_input(spec.q_dim, live)
    # o's input: the heads merged. The fused SDPA kernels (CUDA flash/efficient, and the CPU flash kernel
    # for q made as view(B, S, H, hd).transpose(1, 2)) write their output as [B, S, H, hd], so
    # transpose(1, 2).contiguous() is free and o shares the tensor SDPA keeps; eager makes a copy, and so
    # does SDPA where the rotation wrote q anew in [B, H, S, hd] order (Phi-3).
    shared = live and setup.attention == "sdpa" and not arch.rope_copies
    total += (a * spec.q_dim if keep and not shared else 0) + extra
    live = live or trains(("o",))
    total += norm() if live and post else 0  # post-attention norm on o's output
    # MLP block.
    total += norm() if live and pre else 0
    if spec.moe:
        router = ("router", "experts") + (("gate", "up", "shared_gate") if spec.shared_expert_gate else ())
        keep, extra = consumers(router, live)
        keep = keep or method.uses_rank and "router" in targets  # PEFT's merged router weight needs x
        total += (a * d if keep else 0) + extra + _moe_saves(spec, method, targets, a, live)
        live = live or trains(router)
        if spec.shared_expert_gate:
            keep, extra = consumers(("down",), live)
            total += (a * i if keep else 0) + extra
        total += norm() if live and post else 0
        return total, casts, held
    if spec.gated_mlp:
        gate_up = ("gate_up",) if arch.fused_gate_up else ("gate", "up")
        keep, extra = consumers(gate_up, live, s)
        held += held_input(d, live)
        total += (s * d if keep else 0) + extra
        # act(g) * u: the activation keeps g, the product keeps act(g) for u's gradient and u for g's.
        g_grad, u_grad = live or trains(("gate", "gate_up")), live or trains(("up", "gate_up"))
        gb, ub = out_bytes(("gate", "gate_up"), s), out_bytes(("up", "gate_up"), s)
        total += i * ((gb + ub if g_grad else 0) + (gb if u_grad else 0))
        live = g_grad or u_grad
        hb = max(gb, ub)  # the product's (type promotion)
    else:
        keep, extra = consumers(("up",), live, s)
        held += held_input(d, live)
        total += (s * d if keep else 0) + extra
        live = live or trains(("up",))
        hb = out_bytes(("up",), s)
        total += hb * i if live else 0  # gelu keeps its input
    keep, extra = consumers(("down",), live, hb)
    held += held_input(i, live)
    total += (hb * i if keep else 0) + extra
    total += norm() if live and post else 0  # post-feedforward norm on down's output
    return total, casts, held


def _weight_cast_bytes(spec: ModelSpec, method: Method, rank: Optional[int], targets: Tuple[str, ...],
                       setup: TrainingSetup) -> int:
    """Adapter weights cast to the activation dtype, which lorabench.nn's layers keep for backward (F.linear
    saves its weight): per adapted layer, not per token. PEFT casts x instead (see _adapter_saves)."""
    a = setup.act_bytes
    # (under autocast these casts are autocast's or the same bytes made by .to(x.dtype): _autocast_casts)
    if setup.impl != "lorabench" or not method.uses_rank or FLOAT_BYTES[setup.adapter_dtype] == a or setup.autocast:
        return 0
    per_layer, shapes = 0, spec.linear_shapes()
    for t in targets:
        in_f, out_f, _ = shapes[t]
        per_layer += a * rank * (in_f + out_f)
        per_layer += a * sum(n for _, n in method.adapter.vectors(rank, out_f))  # VeRA's lambdas, DoRA's m
    return spec.num_layers * per_layer


def _merges_experts(method: Method, targets: Tuple[str, ...], setup: TrainingSetup) -> bool:
    """PEFT adapts the fused experts through lora.ParamWrapper, which merges W + s B A on every forward."""
    return setup.impl == "peft" and method.uses_rank and "experts" in targets


def _kv_cache_on(setup: TrainingSetup) -> bool:
    """transformers' decoder returns a DynamicCache of every layer's k and v unless use_cache is off: it is
    turned off under gradient checkpointing, and Trainer sets config.use_cache to TrainingArguments.use_cache,
    False by default (transformers 5 trainer.py, "Finalize"); lorabench's layers keep none."""
    return setup.impl == "peft" and not setup.grad_checkpointing and setup.loop == "plain"


def _merged_expert_bytes(spec: ModelSpec, method: Method, rank: Optional[int], targets: Tuple[str, ...],
                         setup: TrainingSetup) -> int:
    """PEFT's lora.ParamWrapper on fused experts (transformers 5) merges W + s B A into a full-size weight on
    every forward (torch.baddbmm, peft/tuners/lora/layer.py _LoraFactorsProxy), which grouped_mm keeps for
    backward: every expert's weights once more per layer, whatever the tokens. In a low-precision model the
    fp32 factors are cast for the product and kept too (B only when A is frozen: A's copies stay). The
    router's merged weight (E x d) likewise."""
    if not _merges_experts(method, targets, setup):
        return 0
    a, shapes = setup.act_bytes, spec.moe_shapes()
    e, i, d = spec.num_experts, spec.expert_intermediate_size, spec.hidden_size
    per_layer = a * 3 * e * i * d
    if FLOAT_BYTES[setup.adapter_dtype] != a:
        # gate_up at rank 2r: B [E, 2I, 2r], A [E, 2r, d]; down at rank r: B [E, d, r], A [E, r, I]
        per_layer += a * e * ((4 * rank * i if method.trains_a else 0) + 2 * rank * d
                              + (rank * d if method.trains_a else 0) + rank * i)
    if "router" in targets:
        per_layer += a * shapes["router"][1] * d
    return spec.num_layers * per_layer


def _layer_backward_transient(spec: ModelSpec, method: Method, targets: Tuple[str, ...],
                              setup: TrainingSetup) -> int:
    """Gradient buffers alive while one layer's MLP back-propagates, for setup.tokens tokens, plus the
    residual stream's gradient twice.

    Dense MLP: grads of the product, of silu's output, of gate and up (intermediate each at worst).
    Mixture of experts (transformers' grouped_mm, per routed token copy, k per token): at the fused
    gate_up's chunk the grads of gate and up and their concatenation (4 I); at down's grouped_mm the
    input's grad (I) beyond what the layer keeps (measured on the CPU tracker, Mixtral and Qwen3-MoE).
    A trainable expert weight that is not a parameter (PEFT's merged W + sBA) also gets its full-size
    gradient there, which baddbmm's backward reduces to B's and A's: down's (E x d x I) while both merged
    weights are kept; gate_up's comes after down's merged weight and the expert activations it read are
    freed. Qwen2-MoE's shared expert back-propagates as a dense MLP, apart from the routed tokens.
    """
    a, t, d = setup.act_bytes, setup.tokens, spec.hidden_size
    dense = not spec.moe or spec.shared_expert_gate  # (Mixtral and Qwen3-MoE have no dense MLP)
    mlp = (3 if spec.gated_mlp else 2) * a * spec.intermediate_size * t if dense else 0
    if spec.moe:
        k, i = spec.experts_per_token, spec.expert_intermediate_size
        merged = a * spec.num_experts * i * d if _merges_experts(method, targets, setup) else 0
        down = a * k * t * i + merged
        mlp = max(mlp, a * k * t * 4 * i, down)
    return mlp + 2 * setup.stream_bytes * d * t


@dataclass(frozen=True)
class ActivationBreakdown:
    """Bytes of activations at the end of forward and of the logits/loss at their forward and backward peaks.

    cache_bytes: transformers' KV cache, which the model output holds until the loop drops it (peft impl,
    no checkpointing); during forward and early backward it is the very k and v SDPA keeps.
    layer_forward_bytes: under checkpointing, the weights one layer makes for its forward and drops after it
    (cast or merged weights), which the stored activations do not hold.
    final_norm_bytes: what the final norm (and the head's weight gradient) keeps, in saved_bytes; freed
    before any layer back-propagates.
    graph_backward_bytes: what the autograd graph holds beyond its saved tensors (int8 bases' inputs on the
    CPU, see _layer_saves), in saved_bytes but not released as backward goes: alive to backward's end.
    graph_step_bytes: the same bytes when the graph outlives backward: the plain loop's output holds the loss,
    and so the graph, through the optimizer step (and, accumulating, through the next forward).
    autocast_cache_bytes: under checkpointing, the casts of trainable weights autocast caches until forward
    ends (kept for backward, hence in saved_bytes, without checkpointing).
    cache_extra_bytes: what transformers' KV cache holds beyond the saved k and v (autocast's fp32 keys),
    from the end of forward until the loop drops the output.
    """

    saved_bytes: int
    recompute_bytes: int
    transient_bytes: int
    logits_held_bytes: int
    logits_forward_bytes: int
    logits_backward_bytes: int
    logits_after_forward_bytes: int = 0
    cache_bytes: int = 0
    layer_forward_bytes: int = 0
    final_norm_bytes: int = 0
    autocast_cache_bytes: int = 0
    cache_extra_bytes: int = 0
    graph_backward_bytes: int = 0
    graph_step_bytes: int = 0

    @property
    def after_forward_bytes(self) -> int:
        """What is alive when forward returns: saved activations, logits and the loss's kept tensors (and
        what a kept output's KV cache holds beyond them)."""
        return self.saved_bytes + self.logits_after_forward_bytes + (self.cache_extra_bytes if self.cache_bytes
                                                                     else 0)


def estimate_activations(spec: ModelSpec, method: Method, rank: Optional[int],
                         targets: Tuple[str, ...], setup: TrainingSetup) -> ActivationBreakdown:
    """Activation and logits memory of one step for the whole model."""
    a, s, t, d = setup.act_bytes, setup.stream_bytes, setup.tokens, spec.hidden_size
    L = spec.num_layers
    # The first layer's input needs a gradient when the embeddings train, or when transformers checkpoints:
    # its activation_checkpointing_enable calls enable_input_require_grads for models read from input_ids
    # (transformers 5 modeling_utils.py), so the embeddings' output requires grad. Otherwise the first
    # layer's norm keeps nothing.
    first_live = method.base_trainable or (setup.grad_checkpointing and setup.impl == "peft")
    first, first_casts, first_held = _layer_saves(spec, method, rank, targets, setup, input_needs_grad=first_live)
    rest, rest_casts, rest_held = _layer_saves(spec, method, rank, targets, setup)
    graph_held = t * (first_held + (L - 1) * rest_held)
    per_token = 16  # input_ids and labels, int64
    if spec.single_matrix:
        return ActivationBreakdown(t * (per_token + first + (L - 1) * rest) + first_casts + (L - 1) * rest_casts,
                                   0, t * 2 * a * d, 0, 0, 0)
    autocast_cache = 0
    if setup.grad_checkpointing:
        # Checkpointing (Chen et al. 2016) keeps each layer's input; backward recomputes one layer at a time.
        # What int8 bases hold on their autograd context stays too (_layer_saves), but for what is the layer's
        # input itself (post-norm layouts feed q, k and v the residual stream).
        input_held = a * d if spec.arch.norm_layout == "post" and rest_held else 0
        per_token += L * s * d + first_held + (L - 1) * (rest_held - input_held)
        recompute = t * rest + rest_casts
        # autocast's cache keeps every trainable weight's cast until forward ends, checkpointed or not
        autocast_cache = L * _trainable_casts(spec, method, rank, targets, setup)
        layer_casts = 0
    else:
        per_token += first + (L - 1) * rest
        recompute = 0
        layer_casts = first_casts + (L - 1) * rest_casts
    rope = 0
    if not spec.max_positions:
        # rotary cos and sin [1, S, hd], kept by the q/k multiplications: per position, not per token
        # (Gemma 3: one pair for its sliding layers, one for its global layers). transformers makes them in
        # the residual stream's dtype (fp32 under autocast).
        rope = 2 * s * spec.head_dim * setup.seq_len * spec.arch.rope_tables
    final = _norm_saves(spec, d, 1, s, method.base_trainable)  # final norm
    if setup.loss == "chunked":
        final += s * d  # the final norm's output, from which the chunked loss recomputes the logits
    elif method.base_trainable and setup.loss == "standard":
        # the output head's weight gradient needs its input: the final norm's output, or autocast's cast of it
        # (Liger's fused loss takes its gradients in forward and keeps neither)
        final += a * d
    per_token += final
    # autocast's cast of the output head's weight, kept for the hidden states' gradient (standard loss)
    head_cast = a * spec.vocab_size * d if setup.autocast and setup.loss == "standard" else 0
    if setup.attention == "eager":
        # the materialized causal mask, shared by all layers (and a sliding-window one for sliding layers),
        # in the residual stream's dtype
        masks = 1 + (1 if 0 < spec.sliding_layers() < L else 0)
        per_token += masks * s * setup.seq_len
    held, fwd, bwd, after = _loss_bytes(spec, method, setup)
    # transformers' KV cache holds every layer's rotated k and its v: SDPA's own saved k and v, except under
    # autocast, where the rotated k is fp32 (q/k times the fp32 cos/sin tables) and SDPA keeps its bf16 cast
    cache_k_extra = L * t * spec.kv_dim * s if _kv_cache_on(setup) and setup.autocast else 0
    # the plain loop's output keeps the cache until the step ends (Trainer drops it)
    cache = L * t * spec.kv_dim * (s + a) if _kv_cache_on(setup) else 0
    casts = _weight_cast_bytes(spec, method, rank, targets, setup) + _merged_expert_bytes(spec, method, rank,
                                                                                           targets, setup)
    layer_forward = 0
    if setup.grad_checkpointing:  # recomputed one layer at a time, and made one layer at a time in forward
        recompute += casts // L
        layer_forward = casts // L
        casts = 0
    transient = _layer_backward_transient(spec, method, targets, setup)
    return ActivationBreakdown(t * per_token + rope + casts + layer_casts + head_cast, recompute, transient, held,
                               fwd, bwd, after, cache, layer_forward, t * final + head_cast, autocast_cache,
                               cache_k_extra, graph_held, graph_held if setup.loop == "plain" else 0)


def _trainable_casts(spec: ModelSpec, method: Method, rank: Optional[int], targets: Tuple[str, ...],
                     setup: TrainingSetup) -> int:
    """Bytes of one layer's trainable weights cast by autocast (the casts its cache keeps)."""
    if not setup.autocast:
        return 0
    a, shapes = setup.act_bytes, spec.linear_shapes()
    if method.base_trainable:
        return a * sum(i * o for i, o, _ in shapes.values())
    if not method.uses_rank:
        return 0
    return a * rank * sum((i if method.trains_a else 0) + (o if method.trains_b else 0)
                          for i, o, _ in (shapes[n] for n in targets))


def liger_chunk_tokens(tokens: int, hidden: int, vocab: int) -> int:
    """Tokens per chunk of Liger's fused linear cross-entropy: next_pow2(ceil(BT / ceil(V / H))), at most BT
    (liger_kernel/ops/fused_linear_cross_entropy.py, chunk_mem_const 1)."""
    return min(tokens, 1 << max(0, math.ceil(math.log2(-(-tokens // -(-vocab // hidden))))))


def _loss_bytes(spec: ModelSpec, method: Method, setup: TrainingSetup) -> Tuple[int, int, int, int]:
    """Bytes of the output head's logits and the loss beyond the saved activations: (held by the model
    output through backward, at the forward peak, at the start of backward, kept when forward returns)."""
    a, t, d, v = setup.act_bytes, setup.tokens, spec.hidden_size, spec.vocab_size
    up = 4 if a < 4 else 0  # bytes per logit of an fp32 copy of logits in a lower precision
    head_grad = v * d * FLOAT_BYTES.get(setup.dtype, 2) if method.base_trainable else 0
    if setup.loss == "chunked":
        # lorabench.nn.loss: per-token log-sum-exp (fp32) kept from forward; one chunk's logits at a time,
        # as the product and its fp32 copy (forward) or the fp32 softmax gradient and its cast (backward);
        # backward makes d_hidden whole and d_weight (a trainable head) before the first chunk.
        chunk = (a + up) * min(setup.loss_chunk, t) * v
        return 0, 4 * t + t + chunk, 4 * t + a * t * d + head_grad + chunk, 4 * t
    if setup.loss == "fused-linear":
        # Liger's LigerFusedLinearCrossEntropyFunction (liger_kernel/ops/fused_linear_cross_entropy.py):
        # forward allocates d_hidden (zeros_like input) and d_weight (a trainable head), loss_1d (fp32) and
        # a target mask, and runs chunks of next_pow2(ceil(BT / ceil(V / H))) tokens; the kernel writes each
        # chunk's logit gradients over its logits. fp32 weights add d_weight's product before it is added
        # in. It keeps d_hidden and d_weight for backward; the hidden states it read are not kept.
        chunk = liger_chunk_tokens(t, d, v)
        kept = a * t * d + head_grad
        temp = head_grad if method.base_trainable and a == 4 else 0
        return 0, a * t * d + kept + 4 * t + t + a * chunk * v + temp, kept, kept
    # Logits and loss as transformers computes them: logits (a V) are upcast to fp32 (4 V) and
    # cross_entropy = log_softmax (keeps its fp32 output, 4 V) + nll_loss. In backward, nll_loss's
    # gradient (4 V) and log_softmax's input gradient (4 V) are alive with the kept output. While the loss
    # is computed, transformers' causal-LM forward still holds the decoder's output (last_hidden_state,
    # stream-wide); lorabench.nn's has let go of it.
    held = a * v
    last_hidden = setup.stream_bytes * d if setup.impl == "peft" else 0
    # Gemma 2 soft-caps the logits, cap * tanh(logits / cap): tanh keeps its output (a V) until backward.
    capped = a * v if spec.final_softcap else 0
    # The plain loop keeps the model's output (its logits) until the step ends; Trainer.training_step keeps
    # only the loss: the output is gone before backward.
    kept = held if setup.loop == "plain" else 0
    return (t * kept, t * (held + up * v + 4 * v + capped + last_hidden), t * (kept + 12 * v + capped),
            t * (kept + 4 * v + capped))


# --------------------------------------------------------------------------------------------------
# The estimate.


@dataclass(frozen=True)
class Gathered:
    """Bytes of parameters all-gathered from their shards and alive at the moments a step's peaks fall on
    (lorabench.estimator.sharding: FSDP2's unsharded parameters and the all-gather buffers it holds); none on one GPU.

    Attributes:
        forward_end_bytes: at the end of forward, with the logits and the loss.
        after_forward_bytes: when forward has returned.
        layer_forward_bytes: while the last decoder layer runs its forward.
        first_layer_bytes: when the first layer's all-gather lands, before any layer has run.
        backward_start_bytes: at the start of backward, with the loss's gradients.
        layer_backward_bytes: while the last layer back-propagates.
        all_gather_bytes: while the last layer's all-gather lands in forward, the earlier layers' activations
            saved (on gloo, which receives into a flat copy of its own, more than while the layer runs).
    """

    forward_end_bytes: int = 0
    after_forward_bytes: int = 0
    layer_forward_bytes: int = 0
    first_layer_bytes: int = 0
    backward_start_bytes: int = 0
    layer_backward_bytes: int = 0
    all_gather_bytes: int = 0


@dataclass(frozen=True)
class Held:
    """What one GPU holds besides activations in each phase of a step: on one GPU, StepParts.held(); spread over
    several, lorabench.estimator.sharding.rank_memory's share of one of them.

    Attributes:
        persistent_bytes: alive in every phase (weights, adapters, optimizer and master state, DDP's buckets).
        grads_bytes: gradients alive after backward, through the optimizer step.
        accum_bytes: gradients alive through forward and backward (accumulation, from the 2nd micro-batch).
        backward_grads_bytes: gradients alive while the last layer back-propagates (the head's, on one GPU).
        end_grads_bytes: alive at the end of backward besides the logits and the graph: gradients, the first
            layer's backward temporaries, the parameters gathered then.
        optimizer_temp_bytes: the optimizer step's temporaries.
        gathered: parameters all-gathered from their shards, moment by moment (Gathered).
    """

    persistent_bytes: int
    grads_bytes: int
    accum_bytes: int
    backward_grads_bytes: int
    end_grads_bytes: int
    optimizer_temp_bytes: int
    gathered: Gathered = Gathered()


@dataclass(frozen=True)
class StepParts:
    """The pieces of one step's memory on one GPU, before deciding the peak (lorabench.estimator.sharding spreads them
    over several)."""

    method: Method
    counts: ParamCount
    weights_bytes: int
    adapter_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    master_bytes: int
    method_state_bytes: int
    optimizer_temp_bytes: int
    head_grad_bytes: int
    dequant_bytes: int
    act: ActivationBreakdown
    overhead_bytes: int
    notes: Tuple[str, ...]
    norm_temp_bytes: int = 0  # DoRA's weight-norm temporaries: forward only (and recomputation)
    recomputes: bool = False  # gradient checkpointing re-runs each layer's forward in backward
    grad_accum: int = 1  # micro-batches per optimizer step

    @property
    def persistent_bytes(self) -> int:
        return (self.weights_bytes + self.adapter_bytes + self.optimizer_bytes + self.master_bytes
                + self.method_state_bytes)

    @property
    def layer_temp_bytes(self) -> int:
        """A layer's temporaries while it back-propagates: while it is recomputed (checkpointing) its forward
        temporaries come back; the MLP's gradient buffers come after."""
        return max(self.act.transient_bytes, self.dequant_bytes, self.norm_temp_bytes if self.recomputes else 0)

    def held(self) -> Held:
        """What one GPU running the whole step holds besides activations. Gradient accumulation: from the
        second micro-batch on, every gradient is alive through forward and backward (accumulated in place,
        the head's too)."""
        accum = self.gradients_bytes if self.grad_accum > 1 else 0
        return Held(self.persistent_bytes, self.gradients_bytes, accum, max(self.head_grad_bytes, accum),
                    self.gradients_bytes + self.act.transient_bytes, self.optimizer_temp_bytes)

    def phase_peaks(self, held: Optional[Held] = None) -> Dict[str, int]:
        """Peak bytes per phase on a GPU holding `held` besides activations: by default the whole step on one
        GPU (held()); lorabench.estimator.sharding gives one GPU's share of a step spread over several."""
        h, act = held or self.held(), self.act
        g = h.gathered
        # the plain loop's previous output (logits, KV cache) lives through the next forward, until the new
        # output replaces it
        previous_out = (act.logits_held_bytes + act.cache_bytes + act.graph_step_bytes) if self.grad_accum > 1 else 0
        # the output's KV cache beyond the saved k and v, from forward's end; through backward where the loop
        # keeps the output (cache_bytes is non-zero exactly then)
        cache_extra = act.cache_extra_bytes
        kept_extra = cache_extra if act.cache_bytes else 0
        # Spread over GPUs, the parameters gathered differ between the end of forward and a layer's forward; the
        # first layer's all-gather lands beside the embedding output alone (which this leaves out).
        forward = h.persistent_bytes + h.accum_bytes + previous_out + max(act.saved_bytes + max(
            g.forward_end_bytes + act.logits_forward_bytes + act.autocast_cache_bytes + cache_extra,
            g.layer_forward_bytes + max(self.dequant_bytes, self.norm_temp_bytes, act.layer_forward_bytes),
            g.all_gather_bytes), g.first_layer_bytes)
        layer_temp = self.layer_temp_bytes
        # Backward: at its start the loss gradients are alive with every saved activation; then each
        # layer's activations are freed as its gradients appear, so the peak is at one end (or at the
        # first layer, where recomputation and the largest gradient buffers meet).
        backward = h.persistent_bytes + kept_extra + max(
            g.backward_start_bytes + act.saved_bytes + act.logits_backward_bytes + h.accum_bytes,
            g.layer_backward_bytes + act.saved_bytes - act.final_norm_bytes + act.logits_held_bytes
            + h.backward_grads_bytes + act.recompute_bytes + layer_temp,
            h.end_grads_bytes + act.logits_held_bytes + act.cache_bytes + act.graph_backward_bytes - kept_extra,
        )
        optimizer = (h.persistent_bytes + h.grads_bytes + act.logits_held_bytes + act.cache_bytes
                     + act.graph_step_bytes + h.optimizer_temp_bytes)
        return {"forward": forward, "backward": backward, "optimizer": optimizer}


def step_parts(spec: ModelSpec, method: Method, rank: Optional[int] = None, targets=None,
               setup: TrainingSetup = TrainingSetup(), counts: Optional[ParamCount] = None) -> StepParts:
    """Every memory component of one training step of method on spec.

    Raises:
        LorabenchError: bad setup values, bad rank/targets, or a quantized base under a method that
            writes W (full, delta-lora).
    """
    setup.validate()
    setup = setup.for_spec(spec)
    if setup.loss == "chunked" and spec.final_softcap:
        raise LorabenchError(f"--loss chunked does not soft-cap the logits as {spec.name} does (Gemma 2's "
                             "final_logit_softcapping); use --loss standard or fused-linear.")
    if setup.dtype in QUANTIZED and not method.allows_quantized_base:
        raise LorabenchError(f"{method.name} writes the base weights, which a {setup.dtype} base cannot "
                             f"hold; use an adapter method (lora, lora-fa, vera, lora-plus, dora).")
    counts = counts or count_params(spec, method, rank, targets)
    targets = counts.targets
    moe_targets = [t for t in targets if t in MOE_TARGETS] if method.uses_rank else []
    if moe_targets and setup.impl == "lorabench":
        raise LorabenchError(f"lorabench's layers do not adapt the {' or '.join(moe_targets)} of {spec.name}'s "
                             "mixture of experts; use --impl peft, or target the attention (-t q,k,v,o).")
    if moe_targets and setup.autocast:
        raise LorabenchError(f"--autocast with the {' and '.join(moe_targets)} adapted (PEFT's lora.ParamWrapper, "
                             "which merges W + sBA on every forward) is not modeled yet; drop --autocast (bf16 "
                             "weights), or target the attention (-t q,k,v,o).")
    notes = list(spec.notes)
    if setup.attention == "eager" and spec.arch.attention == "eager":
        notes.append(f"{spec.arch.label} runs eager attention in transformers, which refuses SDPA for it (SDPA "
                     "cannot soft-cap the scores): every layer keeps its s x s scores.")
    if method.adapter.magnitude and setup.impl == "peft" and setup.dropout > 0:
        notes.append("PEFT's DoRA with dropout recomputes each adapted layer's base output from the dropped input, "
                     "with the weight (dequantized, on a quantized base) cast to the input's dtype: that copy is kept "
                     "until backward, every adapted weight once more. --dropout 0 avoids it.")
    if setup.dtype == "int8":
        notes.append("LLM.int8() (bitsandbytes) keeps each layer's input on its autograd context until the step's "
                     "graph is freed, checkpointing or not; its fp16 outlier columns (|x| > 6) depend on the data "
                     "and are not counted.")
    if setup.autocast:
        notes.append(f"autocast {setup.autocast} over fp32 weights: each weight's {setup.autocast} cast is kept for "
                     "backward (frozen ones too); the residual stream and norms stay fp32.")
    if _merges_experts(method, targets, setup):
        notes.append("PEFT's LoRA on fused experts (transformers 5) merges W + sBA into a full-size weight on "
                     "every forward and keeps it for backward: every expert's weights once more per layer.")
    w_bytes = weights_bytes(spec, setup.dtype, setup.kbit_prepare)
    ad = FLOAT_BYTES[setup.adapter_dtype]
    adapter = counts.adapter_params * ad
    if method.adapter.shared_pair:
        adapter += counts.shared_buffer_numel * ad
        notes.append("VeRA's shared A and B are buffers: in adapter_bytes, not in the parameter counts.")
    # Trainable tensors live in the base dtype (full) or the adapter dtype.
    p_bytes = FLOAT_BYTES.get(setup.dtype, 2) if method.base_trainable else ad
    tensors = _trainable_tensors(spec, method, rank, targets)
    grads = counts.trainable_params * p_bytes
    master = counts.trainable_params * 4 if setup.master_weights and p_bytes < 4 else 0
    state_bytes = 4 if master else p_bytes
    optim = sum(n * optimizer_state_bytes(setup.optimizer, numel, state_bytes) for numel, n in tensors)
    method_state = 0
    if method.delta_update:
        # Delta-LoRA (Zi et al. 2023, eq. 4) needs A_t B_t after the step: a copy of A and B.
        method_state = counts.adapter_params * ad
        notes.append(f"{method.name} writes W after each step (no gradient or optimizer state for W); "
                     "it keeps a copy of A and B; no dropout on its low-rank path.")
    if method.base_trainable and not setup.master_weights and p_bytes < 4:
        notes.append("pure low-precision training: gradients and AdamW states in the weights' dtype; "
                     "--master-weights adds fp32 copies and fp32 states.")
    shapes = spec.linear_shapes()
    # The largest dequantized weight alive at once (bitsandbytes dequantizes per matmul): NF4 to its bf16
    # compute dtype; int8 on the CPU (MatMul8bitFp) to its input's dtype, fp32 after kbit preparation.
    dequant = norm_temp = 0
    if setup.dtype in QUANTIZED:
        dequant = max(i * o for i, o, _ in shapes.values()) * (2 if setup.dtype == "nf4" else setup.act_bytes)
    if method.adapter.magnitude and setup.impl == "peft":
        # PEFT's DoraLinearLayer.forward, per adapted layer: lora_weight = B(A(eye(in))).T keeps eye(in) and
        # A(eye) for its graph; the norm of W + s * lora_weight builds W cast to x's dtype (when it differs),
        # s * lora_weight and the sum: out x in each, all in the adapter dtype x was cast to.
        ad, a = FLOAT_BYTES[setup.adapter_dtype], setup.act_bytes
        norm_temp = max(ad * (i * i + i * rank + i * o * (3 + (1 if ad != a else 0)))
                        for i, o, _ in (shapes[t] for t in targets))
    elif method.adapter.magnitude:
        # lorabench's DoRALinear: ||W + s B A|| from one out x in addmm under no_grad.
        norm_temp = max(shapes[t][0] * shapes[t][1] for t in targets) * setup.act_bytes
    # Optimizer step transients: torch's foreach AdamW (the CUDA default) makes one temporary list the size
    # of all exp_avg_sq (sqrt); the per-tensor loop (CPU default) two temporaries of the largest tensor.
    largest = max((numel for numel, _ in tensors), default=0)
    opt_tmp = 0
    if setup.optimizer == "adamw":
        opt_tmp = (counts.trainable_params if setup.device == "cuda" else 2 * largest) * state_bytes
    head_grads = 0
    if method.base_trainable and not spec.single_matrix and not spec.tie_embeddings:
        head_grads = spec.vocab_size * spec.hidden_size * p_bytes
    return StepParts(method, counts, w_bytes, adapter, grads, optim, master, method_state, opt_tmp,
                     head_grads, dequant, estimate_activations(spec, method, rank, targets, setup),
                     CUDA_CONTEXT_BYTES + CUBLAS_WORKSPACE_BYTES if setup.device == "cuda" else 0,
                     tuple(notes), norm_temp, setup.grad_checkpointing, setup.grad_accum)


def estimate_from_parts(parts: StepParts) -> MemoryEstimate:
    """The one-GPU estimate: components and the peak over the phases of a step."""
    phases = parts.phase_peaks()
    phase = max(phases, key=phases.get)
    c = parts.counts
    return MemoryEstimate(
        method=c.method, rank=c.rank, targets=c.targets, trainable_params=c.trainable_params,
        total_params=c.total_params, trainable_pct=c.trainable_pct, weights_bytes=parts.weights_bytes,
        adapter_bytes=parts.adapter_bytes, gradients_bytes=parts.gradients_bytes,
        optimizer_bytes=parts.optimizer_bytes, master_bytes=parts.master_bytes,
        method_state_bytes=parts.method_state_bytes, activations_bytes=parts.act.saved_bytes,
        logits_bytes=parts.act.logits_backward_bytes, overhead_bytes=parts.overhead_bytes,
        forward_peak_bytes=phases["forward"], backward_peak_bytes=phases["backward"],
        optimizer_peak_bytes=phases["optimizer"], peak_bytes=phases[phase], peak_phase=phase,
        device_bytes=phases[phase] + parts.overhead_bytes,
        updates_base_weights=parts.method.updates_base, notes=parts.notes)


def estimate_memory(spec: ModelSpec, method: Method, rank: Optional[int] = None, targets=None,
                    setup: TrainingSetup = TrainingSetup(),
                    counts: Optional[ParamCount] = None) -> MemoryEstimate:
    """Memory of one training step of method on spec (see step_parts for what it raises)."""
    return estimate_from_parts(step_parts(spec, method, rank, targets, setup, counts))


# --------------------------------------------------------------------------------------------------
# Fitting on GPUs.


# The allocator's reserve beyond its allocated peak, as a fraction of that peak, counted when deciding
# "fits": the caching allocator rounds blocks up and fragments, so a step whose allocated peak is a few MiB
# under the card's memory still fails to reserve its next block. `lorabench bench` reads both on CUDA
# (torch.cuda.max_memory_reserved / max_memory_allocated). Over the 59 H100 rows committed in
# reports/gpu-sweep-h100 (Llama-3-8B cut to 4 layers; every method; PEFT's and lorabench's layers; with and
# without checkpointing) reserved exceeded allocated by 7.6% at the median and by 1% to 29% in all
# (checkpointed PEFT layers fragment the most). --headroom sets another fraction.
ALLOCATOR_ALLOWANCE = 0.076
ALLOWANCE_SOURCE = "the median of reserved over allocated in 59 H100 steps, reports/gpu-sweep-h100"


def need_bytes(parts: StepParts, allowance: float = ALLOCATOR_ALLOWANCE, held: Optional[Held] = None) -> int:
    """What a GPU must have: the peak over the phases (of the whole step, or of `held`, one GPU's share of it),
    the runtime outside the allocator, and `allowance` x the peak kept free for the allocator."""
    peak = max(parts.phase_peaks(held).values())
    return peak + parts.overhead_bytes + int(allowance * peak)
