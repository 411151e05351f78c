"""GPU memory of one training step, component by component (StepParts), and its peak over the phases of a step.

Pure Python: no torch import. The components come from lorabench.estimator.weights (the base), .optimizer (states),
.activations (what autograd keeps, layer by layer in .layer_saves, and the loss in .loss); the setup of a step is
lorabench.estimator.setup.TrainingSetup.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Tuple

from lorabench.estimator.case import Case
from lorabench.errors import LorabenchError
from lorabench.spelling import option
from lorabench.gpus import MiB
from lorabench.methods import Method
from lorabench.estimator.batches import batch_notes
from lorabench.estimator.activations import ActivationBreakdown, estimate_activations
from lorabench.estimator.layer_saves import merges_experts
from lorabench.estimator.optimizer import OPTIMIZERS, group_numels, optimizer_state_bytes, trainable_tensors
from lorabench.estimator.params import ParamCount, count_params
from lorabench.estimator.setup import FLOAT_BYTES, QUANTIZED
from lorabench.estimator.weights import weights_bytes
from lorabench.models.families import MOE_TARGETS

# The runtime's own memory on a CUDA device, outside the caching allocator's counters: the CUDA context
# (kernels, cuBLAS/cuDNN handles; lazy module loading on) and cuBLAS's workspace. Measured with NVML on an
# H100 80GB, driver 580.159, torch 2.11 + CUDA 13.0: 676 MiB outside the allocator after the first bf16
# matmul (reports/probes/README.md); it varies a little with driver, CUDA and torch versions.
CUDA_CONTEXT_BYTES = 676 * MiB
CUBLAS_WORKSPACE_BYTES = 32 * MiB


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
    offload_host_bytes: int = 0  # activations kept in pinned host memory (setup.offload), not on the device



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
    # ... in a checkpointed forward, which keeps nothing for backward (None: the same)
    norm_temp_unsaved_bytes: Optional[int] = None
    tied_sum_bytes: int = 0  # a trained tied embedding's two gradients and their sum, at the end of backward
    recomputes: bool = False  # gradient checkpointing re-runs each layer's forward in backward
    num_layers: int = 1  # decoder layers: the bottom layer's backward has every other layer's gradients
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

    @property
    def forward_norm_temp_bytes(self) -> int:
        """DoRA's norm temporaries at their forward peak: a checkpointed forward saves nothing for backward."""
        unsaved = self.norm_temp_unsaved_bytes
        return unsaved if self.recomputes and unsaved is not None else self.norm_temp_bytes

    def held(self) -> Held:
        """What one GPU running the whole step holds besides activations. Gradient accumulation: from the
        second micro-batch on, every gradient is alive through forward and backward (accumulated in place,
        the head's too)."""
        accum = self.gradients_bytes if self.grad_accum > 1 else 0
        return Held(persistent_bytes=self.persistent_bytes, grads_bytes=self.gradients_bytes, accum_bytes=accum,
                    backward_grads_bytes=max(self.head_grad_bytes, accum),
                    end_grads_bytes=self.gradients_bytes + max(self.act.transient_bytes, self.tied_sum_bytes),
                    optimizer_temp_bytes=self.optimizer_temp_bytes)

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
            g.layer_forward_bytes + act.mask_bytes
            + max(self.dequant_bytes, self.forward_norm_temp_bytes, act.layer_forward_bytes),
            g.all_gather_bytes), g.first_layer_bytes)
        layer_temp = self.layer_temp_bytes
        # Backward: at its start the loss gradients are alive with every saved activation; then each
        # layer's activations are freed as its gradients appear, so the peak is at one end (or at the
        # first layer, where recomputation and the largest gradient buffers meet).
        # Checkpointed, the bottom layer is recomputed while every other layer's gradients are alive: where
        # recomputation is large (PEFT's merged experts) that moment is backward's peak
        bottom = (h.grads_bytes - h.grads_bytes // max(self.num_layers, 1) + act.recompute_bytes + layer_temp
                  + act.logits_held_bytes + act.cache_bytes - kept_extra) if self.recomputes else 0
        backward = h.persistent_bytes + kept_extra + max(
            g.backward_start_bytes + act.saved_bytes + act.logits_backward_bytes + h.accum_bytes,
            g.layer_backward_bytes + act.saved_bytes - act.final_norm_bytes + act.logits_held_bytes
            + h.backward_grads_bytes + act.recompute_bytes + layer_temp,
            h.end_grads_bytes + act.logits_held_bytes + act.cache_bytes + act.graph_backward_bytes - kept_extra,
            bottom,
        )
        optimizer = (h.persistent_bytes + h.grads_bytes + act.logits_held_bytes + act.cache_bytes
                     + act.graph_step_bytes + h.optimizer_temp_bytes)
        return {"forward": forward, "backward": backward, "optimizer": optimizer}


def step_parts(case: Case, counts: Optional[ParamCount] = None) -> StepParts:
    """Every memory component of one training step of case.method on case.spec (case.parallel aside).

    Raises:
        LorabenchError: bad setup values, bad rank/targets, or a quantized base under a method that
            writes W (full, delta-lora).
    """
    spec, method, rank, setup = case.spec, case.method, case.rank, case.setup
    setup.validate()
    setup = setup.for_spec(spec)
    if setup.loss == "chunked" and spec.final_softcap:
        raise LorabenchError(f"{option('loss', 'chunked')} does not soft-cap the logits as {spec.name} does (Gemma "
                             f"2's final_logit_softcapping); use {option('loss', 'standard')} or fused-linear.")
    if setup.dtype in QUANTIZED and not method.allows_quantized_base:
        raise LorabenchError(f"{method.name} writes the base weights, which a {setup.dtype} base cannot "
                             f"hold; use an adapter method (lora, lora-fa, vera, lora-plus, dora).")
    counts = counts or count_params(spec, method, rank, case.targets)
    targets = counts.targets
    case = replace(case, targets=targets, setup=setup)  # what the helpers below read: resolved targets
    moe_targets = [t for t in targets if t in MOE_TARGETS] if method.uses_rank else []
    if moe_targets and setup.impl == "lorabench":
        raise LorabenchError(f"lorabench's layers do not adapt the {' or '.join(moe_targets)} of {spec.name}'s "
                             f"mixture of experts; use {option('impl', 'peft')}, or target the attention "
                             f"({option('targets', 'q,k,v,o', short=True)}).")
    if moe_targets and setup.autocast:
        raise LorabenchError(f"{option('autocast')} with the {' and '.join(moe_targets)} adapted (PEFT's "
                             "lora.ParamWrapper, which merges W + sBA on every forward) is not modeled yet; drop "
                             f"{option('autocast')} (bf16 weights), or target the attention "
                             f"({option('targets', 'q,k,v,o', short=True)}).")
    notes = list(spec.notes) + batch_notes(spec, setup)
    if setup.attention == "eager" and spec.arch.attention == "eager":
        notes.append(f"{spec.arch.label} runs eager attention in transformers, which refuses SDPA for it (SDPA "
                     "cannot soft-cap the scores): every layer keeps its s x s scores.")
    if method.adapter.magnitude and setup.impl == "peft" and setup.dropout > 0:
        notes.append("PEFT's DoRA with dropout recomputes each adapted layer's base output from the dropped input, "
                     "with the weight (dequantized, on a quantized base) cast to the input's dtype: that copy is kept "
                     f"until backward, every adapted weight once more. {option('dropout', 0)} avoids it.")
    if setup.dtype == "int8":
        notes.append("LLM.int8() (bitsandbytes) keeps each layer's input on its autograd context until the step's "
                     "graph is freed, checkpointing or not; its fp16 outlier columns (|x| > 6) depend on the data "
                     "and are not counted.")
    if setup.autocast:
        notes.append(f"autocast {setup.autocast} over fp32 weights: each weight's {setup.autocast} cast is kept for "
                     "backward (frozen ones too); the residual stream and norms stay fp32.")
    if merges_experts(method, targets, setup):
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
    tensors = trainable_tensors(case)
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
                     f"{option('master_weights')} adds fp32 copies and fp32 states.")
    shapes = spec.linear_shapes()
    # The largest dequantized weight alive at once (bitsandbytes dequantizes per matmul): NF4 to its bf16
    # compute dtype; int8 on the CPU (MatMul8bitFp) to its input's dtype, fp32 after kbit preparation.
    dequant = norm_temp = 0
    norm_unsaved = None
    if setup.dtype in QUANTIZED:
        dequant = max(i * o for i, o, _ in shapes.values()) * (2 if setup.dtype == "nf4" else setup.act_bytes)
    if method.adapter.magnitude and setup.impl == "peft":
        # PEFT's DoraLinearLayer.forward, per adapted layer: lora_weight = B(A(eye(in))).T keeps eye(in) and
        # A(eye) for its graph; the norm of W + s * lora_weight builds W cast to x's dtype (when it differs),
        # s * lora_weight and the sum: out x in each, all in the adapter dtype x was cast to.
        ad, a = FLOAT_BYTES[setup.adapter_dtype], setup.act_bytes
        norm_temp = max(ad * (i * i + i * rank + i * o * (3 + (1 if ad != a else 0)))
                        for i, o, _ in (shapes[t] for t in targets))
        # Checkpointed, the forward keeps nothing for backward: eye(in) lives until B(A(eye)) is made (while
        # get_lora_weight returns), then the four out x in tensors meet
        norm_unsaved = max(ad * max(i * i + i * rank + i * o, i * o * (3 + (1 if ad != a else 0)))
                           for i, o, _ in (shapes[t] for t in targets))
    elif method.adapter.magnitude:
        # lorabench's DoRALinear: ||W + s B A|| from one out x in addmm under no_grad.
        norm_temp = max(shapes[t][0] * shapes[t][1] for t in targets) * setup.act_bytes
    # Optimizer step transients: torch's foreach AdamW (the CUDA default) makes one temporary list the size
    # of all exp_avg_sq (sqrt), group by group (LoRA+ has two); the per-tensor loop (CPU default) two
    # temporaries of the largest tensor.
    largest = max((numel for numel, _ in tensors), default=0)
    opt_tmp = 0
    if OPTIMIZERS[setup.optimizer].step_temporaries:
        opt_tmp = (max(group_numels(case, counts.trainable_params)) if setup.device == "cuda" else 2 * largest) \
            * state_bytes
    head_grads = tied_sum = 0
    if method.base_trainable and not spec.single_matrix and not spec.tie_embeddings:
        head_grads = spec.vocab_size * spec.hidden_size * p_bytes
    elif method.base_trainable and not spec.single_matrix:
        # Tied: the head's gradient is the weight's .grad from the start of backward; the embedding's backward,
        # the step's last op, makes a dense [V, d] gradient, and autograd adds it out of place (grad + new):
        # besides every gradient, two more [V, d] tensors, after the layers' temporaries are gone
        tied_sum = 2 * spec.vocab_size * spec.hidden_size * p_bytes
    act = estimate_activations(case)
    if act.host_bytes:
        notes.append(f"{act.host_bytes / 2 ** 30:,.2f} GiB of layer inputs in pinned host memory "
                     "(offload_host_bytes), each copied to the host in forward and back in backward; the device "
                     "keeps the one being recomputed"
                     + (" and the first layer's, which autograd holds as a leaf." if setup.impl == "peft" and
                        not method.base_trainable else "."))
    return StepParts(
        method=method, counts=counts, weights_bytes=w_bytes, adapter_bytes=adapter, gradients_bytes=grads,
        optimizer_bytes=optim, master_bytes=master, method_state_bytes=method_state, optimizer_temp_bytes=opt_tmp,
        head_grad_bytes=head_grads, dequant_bytes=dequant, tied_sum_bytes=tied_sum,
        act=act,
        overhead_bytes=CUDA_CONTEXT_BYTES + CUBLAS_WORKSPACE_BYTES if setup.device == "cuda" else 0,
        notes=tuple(notes), norm_temp_bytes=norm_temp, norm_temp_unsaved_bytes=norm_unsaved,
        recomputes=setup.grad_checkpointing, num_layers=spec.num_layers,
        grad_accum=setup.grad_accum)


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
        updates_base_weights=parts.method.updates_base, notes=parts.notes, offload_host_bytes=parts.act.host_bytes)


def estimate_memory(case: Case, counts: Optional[ParamCount] = None) -> MemoryEstimate:
    """Memory of one training step of case (see step_parts for what it raises)."""
    return estimate_from_parts(step_parts(case, counts))


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
