"""The tracing engine: any model transformers builds from a config.json, with any PEFT config, stepped at full
width on fake tensors (lorabench.measure.trace) under the configured loop, and its memory read as the live-tensor
tracker reads a real CPU step.

Depth. A decoder's layers come in a few kinds (dense or mixture of experts, sliding or global attention, attention
or recurrent mixing): layers of one kind hold the same tensors and save the same activations. The engine builds the
model on the meta device at its full depth, tells the kinds apart (each layer's modules, parameter shapes and
layer type), and traces cuts of it: the first layer of every kind (at least two layers, so that every cut has a top
and a bottom layer), then that cut with one more layer of a kind, per kind. Every byte count of a step is affine in
the number of layers of each kind, so the full depth is the first trace plus, per kind, (its further layers) x
what one more added; phases' peaks are summed segment by segment (measure.segments), since the moment a phase
peaks can move with depth. The parameter counts are exact by the same sum. A model of at most MAX_WHOLE layers,
or a sharded step, is traced whole.

What it assumes (said in every answer): the CPU's kernels (SDPA's flash kernel keeps what CUDA's flash kernel
keeps in bf16 and fp16: the output and a [B, H, S] float32 log-sum-exp); every row one unpadded, unpacked
sequence; a mixture of experts' routing as the model computes it on fake tensors (each expert's share given by the
shapes transformers' code produces, without data).
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode

from lorabench.errors import LorabenchError
from lorabench.estimator.images import ImageInputs
from lorabench.estimator.setup import QUANTIZED, TrainingSetup
from lorabench.estimator.tuner import Tuner
from lorabench.measure.builders import LR, Built, _wrapped
from lorabench.measure.hfbuild import causal_lm, checkpointing, expected_library_warnings, hf_config, \
    is_vision_language, libraries, optimizer, with_peft
from lorabench.measure.images import plan_images
from lorabench.measure.fakerank import fake_process_group, rank_wrap, sharded_wrap
from lorabench.measure.routing import ROUTING_NOTE, experts
from lorabench.measure.segments import phase_peaks
from lorabench.measure.steps import forward_with_loss
from lorabench.measure.tracequant import fake_quantized, quantize_layers
from lorabench.measure.trace import fake_tensors, trace_built
from lorabench.models.raw import RawModel

MAX_WHOLE = 4  # layers: a model this shallow is traced whole
# Per-layer attributes transformers' decoder layers keep that tell layers of one structure apart
KIND_ATTRIBUTES = ("attention_type", "layer_type", "is_sliding", "sliding_window", "use_rope", "is_causal")
Progress = Callable[[str], None]


def _decoder_layers(model: torch.nn.Module, depth: int):
    """(parent, attribute, list) of the language model's decoder layers: the ModuleList of `depth` modules,
    the vision tower's left out; None where there is none."""
    found = []
    for name, module in model.named_modules():
        for attr, child in module.named_children():
            if isinstance(child, torch.nn.ModuleList) and len(child) == depth:
                found.append((f"{name}.{attr}", module, attr, child))
    text = [f for f in found if not any(w in f[0].lower() for w in ("vision", "visual", "audio", "image"))]
    if not (text or found):
        return None
    _, parent, attr, layers = (text or found)[0]
    return parent, attr, layers


def _kind(layer: torch.nn.Module, layer_type) -> str:
    """A layer's structure, as text: what two layers of one kind share."""
    parts: List = [layer_type]
    for name, module in layer.named_modules():
        parts.append((name, type(module).__name__) + tuple(
            (a, v) for a in KIND_ATTRIBUTES for v in (getattr(module, a, None),)
            if isinstance(v, (bool, int, float, str))))
    parts += [(n, tuple(p.shape), str(p.dtype)) for n, p in layer.named_parameters()]
    parts += [(n, tuple(b.shape), str(b.dtype)) for n, b in layer.named_buffers()]
    return repr(parts)


class Model:
    """A model built once on the meta device at full depth (no tuner), copied and cut for each trace; on the CPU
    with real weights (device "cpu") for a real step to hold a trace to. images: the images every sequence
    carries (a vision-language model's; measure.images), none by default."""

    def __init__(self, raw: RawModel, setup: TrainingSetup, device: str = "meta",
                 images: ImageInputs = ImageInputs()):
        cfg = raw.config
        self.notes: List[str] = []
        if cfg.pop("quantization_config", None) is not None:
            self.notes.append("the config's quantization_config (a checkpoint's storage, e.g. gpt-oss's MXFP4 or "
                              "an FP8 release) is left out: transformers loads such weights dequantized for "
                              f"training, so the base is traced in {setup.dtype}.")
        self.name = raw.name
        config = hf_config(cfg, raw.name)
        attention = None if setup.attention == "auto" else setup.attention
        # a quantized base is built in its compute dtype and quantized per trace (measure.tracequant)
        built_as = replace(setup, dtype="bf16") if setup.dtype in QUANTIZED else setup
        with expected_library_warnings():
            self.model = causal_lm(config, built_as, torch.device(device), attention, raw.name, images.count > 0)
        text = self.model.config.get_text_config()
        self.attention = text._attn_implementation
        self.images = plan_images(self.model, images, setup.seq_len) if images.count else None
        if self.images is not None:
            self.notes.append(self.images.note)
        elif is_vision_language(self.model):
            self.notes.append("a vision-language model traced on text alone: its vision tower and projector are "
                              "held (in the weights and the counts) but not run; image inputs, their tokens and the "
                              "tower's activations are not traced yet, and a trained tower part gets no gradient "
                              "or optimizer state here.")
        # an encoder-decoder's config aliases num_hidden_layers to encoder_layers; its causal LM is the decoder
        depths = [d for d in (text.num_hidden_layers, getattr(text, "decoder_layers", None)) if isinstance(d, int)]
        found = next(((d, f) for d in depths for f in (_decoder_layers(self.model, d),) if f), None)
        if found is None:
            raise LorabenchError(f"cannot find the model's {depths[0]} decoder layers to trace.")
        self.depth, (parent, attr, layers) = found
        self.where = (parent, attr)
        types = getattr(getattr(parent, "config", text), "layer_types", None)
        self.kinds = [_kind(layer, types[i] if isinstance(types, list) and i < len(types) else None)
                      for i, layer in enumerate(layers)]

    def plans(self) -> Tuple[Optional[List[int]], List[Tuple[List[int], int]]]:
        """(the first cut, [(a cut with one more layer of a kind, how many more of that kind the model has)]):
        the first cut None (the whole model) when it is shallow enough."""
        if self.depth <= MAX_WHOLE:
            return None, []
        first: Dict[str, int] = {}
        second: Dict[str, int] = {}
        for i, k in enumerate(self.kinds):
            if k in first:
                second.setdefault(k, i)
            else:
                first[k] = i
        base = sorted(first.values())
        if len(base) == 1 and second:  # a top and a bottom layer in every cut: the segments stay alike
            base = sorted(base + list(second.values()))
            third = next((i for i, k in enumerate(self.kinds) if k == self.kinds[base[0]] and i not in base), None)
            return base, ([(base + [third], self.depth - 2)] if third is not None else [])
        more = [(sorted(base + [second[k]]), self.kinds.count(k) - 1) for k in first if k in second]
        return base, more

    def cut(self, keep: Optional[Sequence[int]]) -> Tuple[torch.nn.Module, List[torch.nn.Module]]:
        """A copy of the meta model with only the layers `keep` (all: None), in order; and those layers."""
        model = copy.deepcopy(self.model)
        parent, attr = self.where
        parent = dict(model.named_modules())[next(n for n, m in self.model.named_modules() if m is parent)]
        layers = getattr(parent, attr)
        if keep is None:
            return model, list(layers)
        setattr(parent, attr, torch.nn.ModuleList([layers[i] for i in keep]))
        config = getattr(parent, "config", None) or model.config.get_text_config()
        config.num_hidden_layers = len(keep)
        if getattr(config, "decoder_layers", None) == self.depth:  # an encoder-decoder's decoder
            config.decoder_layers = len(keep)
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = [config.layer_types[i] for i in keep]
        return model, list(getattr(parent, attr))


# LoRA initialisations that read the base weights (an SVD, a quantisation error, activations): they change values,
# not shapes or what a step keeps, and the meta device holds no values
DATA_INITS = ("pissa", "olora", "loftq", "eva", "corda")


def _data_init(config: Dict) -> Optional[str]:
    """The LoRA initialisation of config that reads the weights (DATA_INITS), else None."""
    init = config.get("init_lora_weights")
    return init if isinstance(init, str) and init.lower().startswith(DATA_INITS) else None


def _shape_init(config: Dict) -> Dict:
    """config with a LoRA initialisation that reads the weights replaced by LoRA's default."""
    return dict(config, init_lora_weights=True) if _data_init(config) else config


def init_note(tuner: Tuner) -> str:
    """What a trace says of a tuner initialised from the weights (_shape_init), else ""."""
    init = _data_init(tuner.config)
    return (f"PEFT's {init} initialisation reads the base weights; it sets values, not shapes or what a step keeps: "
            "traced with LoRA's default initialisation.") if init else ""


def _peft_error(exc: Exception, tuner: Tuner) -> LorabenchError:
    text = str(exc).strip().splitlines()[0][:240] if str(exc).strip() else type(exc).__name__
    return LorabenchError(f"PEFT cannot apply {tuner.name} ({tuner.source}): {text}")


def _built(model: torch.nn.Module, tuner: Tuner, setup: TrainingSetup, mode: Optional[FakeTensorMode],
           strategy: Optional[Callable] = None) -> Tuple[Built, Dict]:
    """The cut model made ready to train (on fake tensors of `mode`; None: as it is): checkpointing, the tuner,
    a data-parallel strategy (measure.fakerank.rank_wrap; None: one GPU), the optimizer; and its counts."""
    _, peft = libraries()
    quantized = setup.dtype in QUANTIZED
    if quantized:
        if mode is None:
            raise LorabenchError("a quantized base is traced on fake tensors only; measure the real step with "
                                 "'lorabench bench'.")
        if tuner.config.get("use_dora"):
            raise LorabenchError(f"DoRA on a {setup.dtype} base is not traced: PEFT computes its magnitude from the "
                                 "dequantized weights as it initialises, which the meta device does not hold; the "
                                 "analytic model answers for the described families.")
        quantize_layers(model, setup.dtype)
    model = checkpointing(model, setup)
    base_ids = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    if tuner.config_json:
        try:
            config = peft.PeftConfig.from_peft_type(**_shape_init(tuner.config))
            model = with_peft(model, config, tuner.freeze_a, setup.adapter_dtype)
        except (ValueError, TypeError, KeyError, AttributeError, NotImplementedError, RuntimeError) as exc:
            raise _peft_error(exc, tuner) from None
    model.train()
    consts: List[torch.Tensor] = []

    def fake(m: torch.nn.Module) -> torch.nn.Module:  # a quantized base's storage first, then every other tensor
        consts.extend(fake_quantized(m, mode) if quantized else [])
        return fake_tensors(mode)(m)

    wrap = fake if mode is not None else None
    if strategy is not None:
        wrap = sharded_wrap(wrap, strategy)
    # the base tensors told apart by id before the fake ones replace them, then found again by name
    runner, base, adapter = _wrapped(model, base_ids, wrap)
    base += consts
    params = {id(p): p for p in model.parameters()}.values()
    counts = {"trainable_params": sum(p.numel() for p in params if p.requires_grad),
              "total_params": sum(p.numel() for p in params)}
    if hasattr(model, "get_nb_trainable_parameters"):  # PEFT's own count (prompt encoders, 4-bit packing)
        counts["trainable_params"], counts["total_params"] = model.get_nb_trainable_parameters()
    if hasattr(model, "peft_config"):
        got = getattr(model.peft_config.get("default"), "target_modules", None)
        # PEFT resolves all-linear to module paths: answers name the layers' own names, once each
        counts["targets"] = (sorted({t.rsplit(".", 1)[-1] for t in got}) if isinstance(got, (set, list, tuple))
                             else got)
    # torch steps CUDA tensors with its multi-tensor (foreach) kernels and CPU ones tensor by tensor: the trace's
    # CPU tensors step as the target device's would
    opt = optimizer(model, setup.optimizer, LR, tuner.b_lr_ratio, torch.device("cpu"), foreach=setup.device == "cuda")
    inputs: Dict = {}  # a vision-language step's image inputs, made with the token ids (trace_built)
    return Built(model, opt, [], lambda ids: runner(input_ids=ids, labels=ids, **inputs), base, adapter,
                 inputs), counts


class DataDependent(LorabenchError):
    """A step that reads values fake tensors do not hold (its allocations depend on the data)."""


def trace_once(full: Model, keep: Optional[Sequence[int]], tuner: Tuner, setup: TrainingSetup,
               real: bool = False, sharding: str = "none", gpus: int = 1, routed: int = 0) -> Dict[str, int]:
    """One trace of the layers `keep` (None: all): the step's measured fields, its FLOPs, its counts. real: the
    step run on full's real CPU tensors instead (the live-tensor tracker on real tensors), to hold a trace to.
    sharding (not "none"): rank 0 of `gpus` under that strategy, inside measure.fakerank.fake_process_group.
    routed: a mixture of experts' count whose routing is given, balanced (measure.routing); 0: as the model
    routes."""
    mode = None if real else FakeTensorMode(allow_non_fake_inputs=True)
    model, layers = full.cut(keep)
    strategy = rank_wrap(sharding, layers) if sharding != "none" else None
    built, counts = _built(model, tuner, setup, mode, strategy)
    if setup.loss != "standard":  # the chunked loss from the final hidden states, as the bench runs it
        if getattr(model.config.get_text_config(), "final_logit_softcapping", None):
            raise LorabenchError(f"--loss chunked does not soft-cap the logits as {full.name} does "
                                 "(final_logit_softcapping); use --loss standard.")
        built = forward_with_loss(built, None, setup, torch.device("cpu"), "peft")
    try:
        out = trace_built(built, setup, mode, layers=layers, images=full.images, routed=routed)
    except (DataDependentOutputException, DynamicOutputShapeException) as exc:
        # an op whose output's shape or value is the data's (.item(), nonzero): e.g. experts run one by one
        # over the tokens routed to each (DBRX, JetMoE), where the real step's memory depends on the tokens
        raise DataDependent(f"{full.name} cannot be traced: its step reads values that fake tensors do not "
                            f"hold ({exc.func}), so what it allocates depends on the data.") from None
    except (AttributeError, TypeError, ValueError, IndexError, NotImplementedError, RuntimeError) as exc:
        # transformers or PEFT failing on this step (PEFT's all-linear wrapping a router whose forward returns a
        # tuple: Llama 4, PhiMoE): theirs to fix, said in one line
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise LorabenchError(f"{full.name}: transformers + PEFT fail on this step ({type(exc).__name__}: {first}); "
                             "other targets (-t q_proj,v_proj) may avoid it.") from None
    out.update({k: v for k, v in counts.items() if k != "targets"})
    out["targets"] = counts.get("targets")
    return out


def count_model(raw: RawModel, tuner: Tuner, setup: TrainingSetup) -> Dict:
    """The parameter counts of `tuner` on `raw` at its full depth, built on the meta device (nothing traced):
    base_params (transformers' model), trainable_params and total_params (PEFT's get_nb_trainable_parameters),
    shared_buffer_numel (VeRA's shared pair, a buffer), targets, narrowest (the narrowest side of a layer PEFT
    wraps)."""
    libraries()
    full = Model(raw, setup)
    base = sum(p.numel() for p in {id(p): p for p in full.model.parameters()}.values())
    built, counts = _built(full.model, tuner, setup, None)  # full is not cut again: no copy needed
    shared = sum(b.numel() for n, b in built.model.named_buffers() if "vera_A" in n or "vera_B" in n)
    # the narrowest side of the layers PEFT wraps: the largest rank worth searching (estimator.fit.max_rank)
    sides = [min(m.in_features, m.out_features) for m in built.model.modules() if hasattr(m, "base_layer")
             and isinstance(getattr(m, "in_features", None), int) and isinstance(getattr(m, "out_features", None), int)]
    narrowest = min(sides) if sides else full.model.config.get_text_config().hidden_size
    return {**counts, "base_params": base, "shared_buffer_numel": shared, "attention": full.attention,
            "narrowest": narrowest, "notes": full.notes}


def combine(first: Dict, more: Sequence[Tuple[Dict, int]]) -> Dict:
    """The full depth: first + sum over kinds of n x (that kind's trace - first), field by field, op by op
    (measure.oplog), and segment by segment (measure.segments); each phase's peak is then its segments'
    largest."""
    out = dict(first)
    for trace, n in more:
        for key, value in first.items():
            if isinstance(value, int) and not isinstance(value, bool):
                out[key] += n * (trace[key] - value)
    if "ops" in first:  # the step's ops, counts of identical ones: each layer of a kind adds its own
        runs = {tuple(op[:-1]): op[-1] for op in first["ops"]}
        for trace, n in more:
            for op in trace["ops"]:
                runs[tuple(op[:-1])] = runs.get(tuple(op[:-1]), 0) + n * op[-1]
            for op in first["ops"]:
                runs[tuple(op[:-1])] -= n * op[-1]
        out["ops"] = [list(k) + [r] for k, r in sorted(runs.items()) if r]
    shared = [k for k in first.get("segments", {}) if all(k in t.get("segments", {}) for t, _ in more)]
    if more and shared:
        segments = {k: first["segments"][k] + sum(n * (t["segments"][k] - first["segments"][k]) for t, n in more)
                    for k in shared}
        peaks = phase_peaks(segments)
        for phase, peak in peaks.items():
            out[f"measured_{phase}_peak_bytes"] = peak
        out["measured_peak_bytes"] = max(peaks.values())
        out["segments"] = segments
    return out


def trace_model(raw: RawModel, tuner: Tuner, setup: TrainingSetup, progress: Progress = lambda s: None,
                sharding: str = "none", gpus: int = 1, images: ImageInputs = ImageInputs()) -> Dict:
    """The step of `tuner` on `raw` under `setup`, traced: the measured fields of the full depth, FLOPs,
    counts, and how it was found (layers traced, kinds, seconds, notes). sharding (not "none"): rank 0's step
    of `gpus` under that strategy (measure.fakerank), traced in a fake process group made and destroyed here.
    images: the images each sequence carries (measure.images); the result then has images, image_size (as
    traced) and image_tokens (per sequence).

    Raises:
        LorabenchError: what cannot be traced (a quantized base, a loss the CPU cannot run, a step that reads
            its data), or what transformers or PEFT refuse, in one line.
    """
    if setup.loss == "fused-linear":
        raise LorabenchError("--loss fused-linear runs Liger's Triton kernels, which a trace on the CPU does not "
                             "run; the analytic model answers for the described families.")
    started = time.perf_counter()
    transformers, _ = libraries()
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its deprecation and config notices are not the user's to act on
    try:
        out = _trace_model(raw, tuner, setup, progress, sharding, gpus, images)
    finally:
        transformers.logging.set_verbosity(verbosity)
    out["trace_seconds"] = round(time.perf_counter() - started, 2)
    return out


def _trace_model(raw: RawModel, tuner: Tuner, setup: TrainingSetup, progress: Progress, sharding: str,
                 gpus: int, images: ImageInputs) -> Dict:
    progress(f"building {raw.name} on the meta device")
    full = Model(raw, setup, images=images)
    # under FSDP the depth sum of segments misses 2% of the backward peak (6 granite layers from 2 and 3: the
    # reduce-scatters and prefetched gathers do not fall in the layers' segments alike): a sharded step is
    # traced whole until the segments follow FSDP's hooks
    first_cut, more = full.plans() if sharding == "none" else (None, [])
    kinds = len(set(full.kinds))
    progress(f"tracing {len(first_cut) if first_cut else full.depth} of {full.depth} layers"
             + (f" ({kinds} kinds)" if kinds > 1 else ""))
    with fake_process_group(gpus) if sharding != "none" else contextlib.nullcontext():
        try:
            first = trace_once(full, first_cut, tuner, setup, sharding=sharding, gpus=gpus)
            routed = 0
        except DataDependent:
            routed = experts(full.model)  # a mixture of experts run expert by expert: the routing given
            if not routed:
                raise
            progress(f"tracing {raw.name} with its routing given, balanced")
            first = trace_once(full, first_cut, tuner, setup, sharding=sharding, gpus=gpus, routed=routed)
        extra = []
        for keep, n in more:
            progress(f"tracing {len(keep)} layers (one more of a kind {n} more layers share)")
            extra.append((trace_once(full, keep, tuner, setup, sharding=sharding, gpus=gpus, routed=routed), n))
    out = combine(first, extra)
    out.update({"layers_traced": sorted({len(k) for k, _ in more} | {len(first_cut) if first_cut else full.depth}),
                "layer_kinds": kinds, "depth": full.depth, "attention": full.attention,
                "notes": full.notes + [n for n in (init_note(tuner), ROUTING_NOTE if routed else "") if n]})
    if full.images is not None:
        plan = full.images
        out.update({"images": plan.count, "image_size": f"{plan.height}x{plan.width}",
                    "image_tokens": plan.tokens * plan.count})
    return out


__all__ = ["MAX_WHOLE", "DataDependent", "Model", "trace_once", "count_model", "combine", "trace_model"]
