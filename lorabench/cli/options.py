"""The CLI's option types and shared option groups: every value a user types is checked here, once.

Numbers are finite and within a sane range (NaN, inf, 10**300 or 4096.5 where a count is meant get
one line and exit code 2); strings are never empty (an unset $MODEL is an error, not the default
model). The ranges are far outside anything real, so they only stop absurd inputs from becoming
absurd numbers: the longest context trained today is ~10**6 tokens, the widest model d=16384. (Over 400 lines:
every shared option group sits here, so that one module checks what a user types; the batch's options are in
batch_options.)
"""

from __future__ import annotations

import decimal
import functools
import inspect
import math
import re

import click
from click.core import ParameterSource

from lorabench.cli.batch_options import batch_options
from lorabench.bounds import DEFAULT_MODEL, MAX_ALPHA, MAX_BATCH, MAX_RANK, MAX_SEQ_LEN, MAX_STEPS, MAX_TOKENS
from lorabench.models.keys import MAX_LAYERS, MAX_WIDTH
from lorabench.estimator.optimizer import OPTIMIZER_NAMES as OPTIMIZERS
from lorabench.estimator.setup import (ATTENTION, AUTOCAST, DTYPES, FLOAT_BYTES, IMPLS, LOOPS, LOSSES, MAX_GRAD_ACCUM,
                                       MAX_LOSS_CHUNK, setup_from)
from lorabench.methods import resolve_methods
from lorabench.render.formats import FORMATS
from lorabench.errors import LorabenchError
from lorabench.models.raw import Undescribed
from lorabench.models.hub import resolve_model, resolve_specs
from lorabench.models.spec import from_dimension


_INT_RE = re.compile(r"[+-]?[0-9]+")
# decimal notation, and the words float() knows for the non-finite values (refused below, by name)
_FLOAT_RE = re.compile(r"[+-]?(([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|inf|infinity|nan)", re.IGNORECASE)


def shown(text: str, limit: int = 24) -> str:
    """A user's value for an error message, shortened: 10**300 typed out is not worth echoing."""
    text = str(text)
    return repr(text) if len(text) <= limit else repr(text[:limit - 6] + "...") + f" ({len(text):,} characters)"


class BoundedInt(click.ParamType):
    """An integer in [lo, hi], typed as digits: no fractions, no exponents, no hundreds of digits."""

    name = "integer"

    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi

    def convert(self, value, param, ctx):
        if isinstance(value, bool):
            self.fail(f"{value!r} is not an integer.", param, ctx)
        if isinstance(value, int):
            number = value
        else:
            text = str(value).strip()
            if not text:
                self.fail("is empty.", param, ctx)
            if not _INT_RE.fullmatch(text):
                self.fail(f"{shown(text)} is not an integer.", param, ctx)
            if len(text.lstrip("+-0")) > len(str(self.hi)):
                self.fail(f"must be from {self.lo:,} to {self.hi:,}, got {shown(text)}.", param, ctx)
            number = int(text)
        if not self.lo <= number <= self.hi:
            self.fail(f"must be from {self.lo:,} to {self.hi:,}, got {shown(str(number))}.", param, ctx)
        return number

    def get_metavar(self, param, ctx=None):
        return "INTEGER"


class BoundedFloat(click.ParamType):
    """A finite number in [lo, hi] (lo excluded with lo_open): never NaN or inf."""

    name = "number"

    def __init__(self, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open

    def convert(self, value, param, ctx):
        text = str(value).strip()
        if not text:
            self.fail("is empty.", param, ctx)
        if not _FLOAT_RE.fullmatch(text):  # float() would also take '٣' and '1_6'
            self.fail(f"{shown(text)} is not a number.", param, ctx)
        number = float(text)
        if not math.isfinite(number):
            self.fail(f"must be a finite number, got {shown(text)}.", param, ctx)
        low_ok = number > self.lo if self.lo_open else number >= self.lo
        high_ok = number < self.hi if self.hi_open else number <= self.hi
        if not (low_ok and high_ok):
            interval = f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
            self.fail(f"must be in {interval}, got {shown(text)}.", param, ctx)
        return number

    def get_metavar(self, param, ctx=None):
        return "FLOAT"


class Text(click.ParamType):
    """A non-empty string: an empty --model "" (an unset variable in a script) is an error."""

    name = "text"

    def __init__(self, metavar: str = "TEXT"):
        self.metavar = metavar

    def convert(self, value, param, ctx):
        if not str(value).strip():
            self.fail("is empty.", param, ctx)
        if "\0" in str(value):
            self.fail("contains a NUL character.", param, ctx)
        return value

    def get_metavar(self, param, ctx=None):
        return self.metavar


RANK = BoundedInt(1, MAX_RANK)
LAYERS = BoundedInt(1, MAX_LAYERS)
STEPS = BoundedInt(1, MAX_STEPS)
MFU = BoundedFloat(0.01, 1.0)


def model_options(fn):
    """--model (repeatable), --config (repeatable), --d and --layers; passes specs=(ModelSpec, ...), in the
    order given (bench also gets layers=: it measures a cut and projects to the full depth itself)."""
    keep_depth = "layers" in inspect.signature(fn).parameters

    @click.option("--model", "-m", "models", type=Text("NAME"), multiple=True,
                  help=f"A preset (see 'lorabench models'), a Hugging Face Hub id (Qwen/Qwen3-8B: its config.json, "
                       f"from the local cache or downloaded) or a local model folder; repeat for several models. "
                       f"Default: {DEFAULT_MODEL}.")
    @click.option("--config", "config_paths", type=Text("PATH"), multiple=True,
                  help="A Hugging Face config.json (or a folder holding one), read offline; repeatable.")
    @click.option("--d", "dim", type=BoundedInt(1, MAX_WIDTH), default=None,
                  help="Describe one d x d weight matrix instead of a model (the worked example of the "
                       "'Neurons, Weights & Fine-Tuning' deep dive: --d 4096).")
    @click.option("--layers", type=LAYERS, default=None,
                  help="With --d: that many matrices. With a model: cut it to that many layers.")
    @functools.wraps(fn)
    def wrapper(models, config_paths, dim, layers, **kw):
        # a command that traces (an engine option) takes a model_type without a description as a RawModel
        traceable = kw.get("engine", "analytic") != "analytic"
        if dim is not None and (models or config_paths):
            given = ", ".join(n for n, v in (("--model", models), ("--config", config_paths)) if v)
            raise click.UsageError(f"give --d or {given}, not both.")
        if dim is not None:
            specs = (from_dimension(dim, layers or 1),)
            return fn(specs=specs, layers=None, **kw) if keep_depth else fn(specs=specs, **kw)
        try:
            specs = tuple(resolve_specs(models, config_paths, traceable=traceable)) or (resolve_model(DEFAULT_MODEL),)
        except Undescribed as exc:
            if "engine" in kw:  # --engine analytic: the refusal is the answer asked for
                raise
            command = click.get_current_context().info_name
            raise LorabenchError(f"{exc} 'lorabench memory', 'params' and 'fit' trace it with transformers + "
                                 f"PEFT; '{command}' does not yet.") from None
        if layers is not None:
            shallow = [s for s in specs if s.num_layers is not None and layers > s.num_layers]
            if shallow:
                raise click.BadParameter(f"{shallow[0].name} has {shallow[0].num_layers} layers; --layers cuts a "
                                         f"model to fewer, got {layers}.", param_hint="--layers")
        if keep_depth:  # bench measures N layers and projects to the full depth itself
            return fn(specs=specs, layers=layers, **kw)
        if layers:
            specs = tuple(s.with_layers(layers) for s in specs)
        return fn(specs=specs, **kw)
    return wrapper


def engine_options(fn):
    """--engine and --peft-config: which engine answers (analytic, or a trace); below method_options."""
    @click.option("--engine", type=click.Choice(["auto", "analytic", "trace"], case_sensitive=False), default="auto",
                  show_default=True,
                  help="Who answers. analytic: lorabench's model of the described families (instant, no torch). "
                       "trace: transformers + PEFT stepped at full size on fake tensors (needs lorabench[trace]; "
                       "seconds, then cached). auto: analytic where the family is described, else trace.")
    @click.option("--peft-config", "peft_config", type=Text("PATH"), default=None,
                  help="A PEFT adapter_config.json (or its folder), for any tuner PEFT has (IA3, AdaLoRA, LoHa, "
                       "OFT, prompt tuning...): traced; replaces --method/--rank/--targets.")
    @functools.wraps(fn)
    def wrapper(engine, peft_config, **kw):
        if peft_config is not None and not kw.get("methods_from_all", True):  # method_options, applied above
            raise click.UsageError("give --method or --peft-config, not both: the adapter_config.json names its "
                                   "tuner.")
        return fn(engine=engine.lower(), peft_config=peft_config, **kw)
    return wrapper


def image_options(fn):
    """--images and --image-size (memory, fit): passes images=ImageInputs(...)."""
    from lorabench.estimator.images import MAX_IMAGES, image_inputs

    @click.option("--images", "image_count", type=BoundedInt(0, MAX_IMAGES), default=0, show_default=True,
                  help="Images in each sequence of a vision-language model (LLaVA, Qwen2.5-VL, Qwen3-VL, Gemma 3, "
                       "Llama 4, Idefics3, SmolVLM), traced through its vision tower; their image tokens are part "
                       "of --seq-len. 0: text only.")
    @click.option("--image-size", "image_size", type=Text("HxW"), default=None,
                  help="With --images: height x width in pixels (448x448). Default: the config's vision_config."
                       "image_size, which the processor gives every image (Qwen keeps each image's own: give it).")
    @functools.wraps(fn)
    def wrapper(image_count, image_size, **kw):
        return fn(images=image_inputs(image_count, image_size), **kw)  # a LorabenchError: one line, exit 2
    return wrapper


def method_options(fn):
    from lorabench.methods import METHODS

    @click.option("--method", "methods", multiple=True, default=("all",), show_default=True,
                  help=f"Repeatable or comma-separated: {', '.join(METHODS)}, all.")
    @click.option("--rank", "-r", "ranks", type=RANK, multiple=True, default=(8,), show_default=True,
                  help="LoRA rank; repeat for a sweep (--rank 8 --rank 64).")
    @click.option("--targets", "-t", type=Text("NAMES"), multiple=True,
                  help="Projections to adapt, comma-separated: q,k,v,o,gate,up,down (or PEFT's names, "
                       "q_proj...); fused ones where the family has them (qkv, gate_up: Phi-3, gpt2); router, "
                       "experts and shared_gate on a mixture of experts; or all-linear (what PEFT's all-linear "
                       "adapts). One set per run. Default: PEFT's for the family (q,v; Phi-3, gpt2: qkv).")
    @functools.wraps(fn)
    def wrapper(methods, targets, **kw):
        from_all = any(part.strip().lower() == "all" for m in methods for part in m.split(","))
        kw["ranks"] = tuple(dict.fromkeys(kw["ranks"]))  # -r 8 -r 8 is one sweep point, not two rows
        if len(set(targets)) > 1:  # not last-wins, silently; a sweep of target sets is a run each
            raise click.BadParameter(f"given {len(targets)} times ({' and '.join(map(repr, targets))}); give one "
                                     "set, comma-separated (-t q,k,v,o), and run again for another.",
                                     param_hint="'--targets' / '-t'")
        kw["targets"] = targets[0] if targets else None
        return fn(methods=resolve_methods(methods), methods_from_all=from_all, **kw)
    return wrapper


def setup_options(fn=None, *, impl_default: str = "peft"):
    """The options of how a step runs (memory, bench, report); passes setup=TrainingSetup(...)."""
    if fn is None:
        return functools.partial(setup_options, impl_default=impl_default)

    @click.option("--alpha", type=BoundedFloat(0.0, MAX_ALPHA, lo_open=True), default=16.0, show_default=True,
                  help="LoRA alpha (scale alpha/r).")
    @click.option("--batch-size", "-b", type=BoundedInt(1, MAX_BATCH), default=1, show_default=True,
                  help="Sequences per step per GPU.")
    @click.option("--seq-len", "-s", type=BoundedInt(1, MAX_SEQ_LEN), default=2048, show_default=True,
                  help="Tokens per sequence.")
    @click.option("--dtype", type=click.Choice(DTYPES, case_sensitive=False), default="bf16", show_default=True,
                  help="Base weights; int8/nf4 is a quantized frozen base (QLoRA), adapters only.")
    @click.option("--adapter-dtype", type=click.Choice(tuple(FLOAT_BYTES), case_sensitive=False), default="fp32",
                  show_default=True, help="Adapter weights (PEFT keeps them in fp32).")
    @click.option("--optimizer", type=click.Choice(OPTIMIZERS, case_sensitive=False), default="adamw",
                  show_default=True, help="Optimizer; its states follow the trainable weights' dtype.")
    @click.option("--grad-checkpointing/--no-grad-checkpointing", default=False, show_default=True,
                  help="Keep only each layer's input; recompute in backward.")
    @click.option("--attention", type=click.Choice(ATTENTION, case_sensitive=False), default="auto",
                  show_default=True, help="sdpa (flash/efficient kernels), eager (keeps s x s scores), or auto: "
                                          "what transformers runs for the family (eager for Gemma 2).")
    @click.option("--dropout", type=BoundedFloat(0.0, 1.0, hi_open=True), default=0.0, show_default=True,
                  help="LoRA dropout on adapter inputs, in [0, 1).")
    @click.option("--master-weights", is_flag=True, help="fp32 master copy and fp32 optimizer states (mixed precision).")
    @click.option("--device", type=click.Choice(("cuda", "cpu")), default="cuda", show_default=True,
                  help="Where the step runs: cuda adds the runtime's overhead and foreach AdamW.")
    @click.option("--impl", type=click.Choice(IMPLS), default=impl_default, show_default=True,
                  help="Whose layers: peft (transformers + PEFT: per-layer fp32 input copies, KV cache) "
                       "or lorabench (lorabench.nn's lean layers).")
    @click.option("--loop", type=click.Choice(LOOPS), default="trainer", show_default=True,
                  help="plain: the model's output (logits) lives through backward; trainer: transformers' "
                       "Trainer.training_step, which keeps only the loss.")
    @click.option("--autocast", type=click.Choice(AUTOCAST), default=None,
                  help="Autocast mixed precision over fp32 weights (Trainer's bf16=True/fp16=True); implies "
                       "--dtype fp32.")
    @click.option("--grad-accum", type=BoundedInt(1, MAX_GRAD_ACCUM), default=1, show_default=True,
                  help="Micro-batches of --batch-size per optimizer step.")
    @click.option("--loss", type=click.Choice(LOSSES), default="standard", show_default=True,
                  help="standard (transformers' loss on full logits), chunked (logits per chunk, recomputed "
                       "in backward) or fused-linear (Liger's fused linear cross-entropy).")
    @click.option("--loss-chunk", type=BoundedInt(1, MAX_LOSS_CHUNK), default=1024, show_default=True,
                  help="Tokens per chunk of --loss chunked (its logits: (a + 4) x chunk x vocab bytes).")
    @click.option("--kbit-prepare", is_flag=True,
                  help="With --dtype nf4/int8: peft.prepare_model_for_kbit_training (fp32 upcasts of the "
                       "non-quantized parameters).")
    @batch_options
    @functools.wraps(fn)
    def wrapper(alpha, batch_size, seq_len, dtype, adapter_dtype, optimizer, grad_checkpointing, attention,
                dropout, master_weights, device, impl, loop, autocast, grad_accum, loss, loss_chunk,
                kbit_prepare, batch_fields, **kw):
        ctx = click.get_current_context()
        fields = dict(batch_size=batch_size, seq_len=seq_len, dtype=dtype, adapter_dtype=adapter_dtype,
                      optimizer=optimizer, grad_checkpointing=grad_checkpointing, attention=attention,
                      dropout=dropout, master_weights=master_weights, device=device or "cuda", alpha=alpha,
                      impl=impl, loop=loop, autocast=autocast, grad_accum=grad_accum, loss=loss,
                      loss_chunk=loss_chunk, kbit_prepare=kbit_prepare, **batch_fields)
        setup = setup_from(fields, {k for k in fields if ctx.get_parameter_source(k) != ParameterSource.DEFAULT})
        return fn(setup=setup, **kw)
    return wrapper


def parallel_options(fn):
    """How many GPUs share the step and how (memory, fit); passes parallel=Parallel(...)."""
    from lorabench.estimator.sharding import MAX_GPUS, STRATEGIES, Parallel

    @click.option("--gpus", "gpus", type=BoundedInt(1, MAX_GPUS), default=1, show_default=True,
                  help="GPUs sharing the step, each running its own --batch-size; every memory field is then "
                       "one GPU's (the largest).")
    @click.option("--sharding", type=click.Choice(tuple(STRATEGIES)), default="none", show_default=True,
                  help="How: ddp (a replica each, gradients all-reduced), zero2 (gradients and optimizer states "
                       "sharded), fsdp (parameters too: FSDP2 / ZeRO-3). Needed with --gpus over 1.")
    @click.option("--cpu-offload", is_flag=True,
                  help="Optimizer states (and master weights) in host memory; under zero2/fsdp the sharded "
                       "parameters and gradients too (FSDP2's CPUOffloadPolicy).")
    @functools.wraps(fn)
    def wrapper(gpus, sharding, cpu_offload, **kw):
        parallel = Parallel(gpus, sharding, cpu_offload)
        parallel.validate()
        return fn(parallel=parallel, **kw)
    return wrapper


def distributed_options(fn):
    """bench's --nproc, --sharding and --timeout: passes distributed=(nproc, sharding, timeout_s), or None
    without --nproc (the case runs in this process, as always)."""
    from lorabench.estimator.sharding import STRATEGIES

    @click.option("--nproc", type=BoundedInt(1, 1024), default=None,
                  help="Run each case on this many processes through torch.distributed.run (torchrun): one GPU "
                       "each with NCCL on CUDA, gloo on the CPU; a row per process, beside the estimate for it.")
    @click.option("--sharding", type=click.Choice(tuple(STRATEGIES)), default=None,
                  help="With --nproc: ddp (DistributedDataParallel), zero2 (fully_shard without resharding after "
                       "forward) or fsdp (FSDP2: fully_shard on each decoder layer and the root); none with "
                       "--nproc 1 only. Default: none.")
    @click.option("--timeout", "timeout_s", type=BoundedFloat(0.0, 86_400.0, lo_open=True), default=None,
                  help="With --nproc: seconds a case may run, all its processes together, before they are stopped "
                       "(its rows say timeout). Default: 600.")
    @functools.wraps(fn)
    def wrapper(nproc, sharding, timeout_s, **kw):
        if nproc is None:
            given = [f"--{n}" for n, v in (("sharding", sharding), ("timeout", timeout_s)) if v is not None]
            if given:
                raise click.UsageError(f"{' and '.join(given)} only apply with --nproc N.")
            return fn(distributed=None, **kw)
        sharding = sharding or "none"
        if nproc > 1 and sharding == "none":
            raise click.BadParameter(f"--nproc {nproc} needs --sharding ddp, zero2 or fsdp: how the processes share "
                                     "the step.", param_hint="--sharding")
        return fn(distributed=(nproc, sharding, 600.0 if timeout_s is None else timeout_s), **kw)
    return wrapper


def format_option(fn):
    return click.option("--format", "-f", "fmt", type=click.Choice(FORMATS, case_sensitive=False),
                        default="table", show_default=True,
                        help="table and markdown for people; csv and json carry every field.")(fn)


_SUFFIXED_RE = re.compile(r"([0-9]+(\.[0-9]+)?)([kKmMbBtT])")


class TokenCount(BoundedInt):
    """A token count in [lo, hi]: digits, or a number with a K, M, B or T suffix (500k, 2B, 1.5T)."""

    _SCALE = {"k": 10 ** 3, "m": 10 ** 6, "b": 10 ** 9, "t": 10 ** 12}

    def convert(self, value, param, ctx):
        match = _SUFFIXED_RE.fullmatch(str(value).strip())
        if match:
            # exact decimal arithmetic: a float of 1 and 400 zeros is inf, and round(inf) raises
            number = decimal.Decimal(match.group(1)) * self._SCALE[match.group(3).lower()]
            if number > self.hi:
                self.fail(f"must be from {self.lo:,} to {self.hi:,}, got {shown(str(value).strip())}.", param, ctx)
            value = str(int(number.to_integral_value(decimal.ROUND_HALF_EVEN)))
        return super().convert(value, param, ctx)


def cost_options(fn):
    """How much to train and at what price (memory, report); passes cost=CostSetup(...), or cost=None when no
    tokens were given."""
    from lorabench.estimator.cost import CostSetup

    @click.option("--tokens", type=TokenCount(1, MAX_TOKENS), default=None,
                  help="Tokens to train on in all, epochs included (digits, or 500M, 2B, 1.5T): adds training "
                       "steps, hours, GPU-hours and, with a price, the cost (with --gpu).")
    @click.option("--dataset-tokens", type=TokenCount(1, MAX_TOKENS), default=None,
                  help="Tokens in the dataset, trained over --epochs times (instead of --tokens).")
    @click.option("--epochs", type=BoundedFloat(0.0, 10_000.0, lo_open=True), default=None,
                  help="Passes over --dataset-tokens (fractions allowed). Default: 1.")
    @click.option("--price", type=BoundedFloat(0.0, 1_000.0), default=None,
                  help="US dollars per GPU-hour. Default: the catalog's dated on-demand price for --gpu, where "
                       "it has one ('lorabench gpus').")
    @functools.wraps(fn)
    def wrapper(tokens, dataset_tokens, epochs, price, **kw):
        if tokens is not None and dataset_tokens is not None:
            raise click.UsageError("give --tokens (all tokens trained) or --dataset-tokens with --epochs, not both.")
        if epochs is not None and dataset_tokens is None:
            raise click.UsageError("--epochs counts passes over --dataset-tokens; give --dataset-tokens too.")
        if price is not None and tokens is None and dataset_tokens is None:
            raise click.UsageError("--price prices a training run; give --tokens or --dataset-tokens too.")
        cost = None
        if tokens is not None or dataset_tokens is not None:
            cost = CostSetup(tokens=tokens, dataset_tokens=dataset_tokens,
                             epochs=1.0 if epochs is None else epochs, price_per_gpu_hour=price)
        return fn(cost=cost, **kw)
    return wrapper
