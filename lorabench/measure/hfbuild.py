"""transformers + PEFT as users train them, in the pieces both the bench's builder (measure.builders.build_peft,
from a described model) and the tracing engine (measure.traced, from any config.json and any PEFT config) put
together: the model from its config, checkpointing, the PEFT config applied, the optimizer.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Dict, List, Optional

import torch

from lorabench.errors import LorabenchError
from lorabench.estimator.setup import QUANTIZED, TrainingSetup
from lorabench.measure.qlora import load_quantized

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def expected_library_warnings():
    """Silences the warnings transformers, PEFT and bitsandbytes raise on every model of ours, none of which the
    reader can act on; every other warning stays visible."""
    with warnings.catch_warnings():
        # PEFT 0.21's PeftModel.__init__ reads model.is_gradient_checkpointing, and prepare_model_for_kbit_training
        # calls gradient_checkpointing_enable: both renamed (activation_...) in transformers 5.2x
        warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing(_enable)?` is deprecated",
                                category=FutureWarning)
        # PEFT's conversion for fused experts sets gate_up's rank and alpha by pattern, and warns where the model
        # has no gate_up_proj module (every dense model)
        warnings.filterwarnings("ignore", message=r"The following (rank|alpha)_pattern keys did not match",
                                category=RuntimeWarning)
        # GPT-2's Conv1D stores its weight [in, out]: PEFT sets fan_in_fan_out itself, and says so
        warnings.filterwarnings("ignore", message=r"fan_in_fan_out is set to False but the target module is `Conv1D`",
                                category=UserWarning)
        # bitsandbytes' paged optimizers run unpaged on the CPU (the README says so once)
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU", category=UserWarning)
        # Llama 4's vision tower keeps its rotary frequencies as a complex buffer, which Module.to(dtype) casts
        warnings.filterwarnings("ignore", message="Casting complex values to real discards the imaginary part",
                                category=UserWarning)
        yield


def libraries():
    """(transformers, peft), or a one-line error naming the extra that installs them. bitsandbytes (which PEFT
    imports) logs, as it loads on a CPU with AVX-512 BF16, that it could not fetch an optional kernel from the Hub;
    nothing here runs that kernel, so the line is held back while it loads."""
    quiet = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import peft
        import transformers
    except ImportError:
        raise LorabenchError("this needs transformers and peft: pip install 'lorabench[trace]'.") from None
    finally:
        quiet.setLevel(level)
    return transformers, peft


def hf_config(cfg: Dict, where: str):
    """transformers' config object for a config.json's contents (its model_type's class, every key passed as
    from_pretrained passes them).

    Raises:
        LorabenchError: a model_type transformers does not know, or values its class refuses.
    """
    transformers, _ = libraries()
    cfg = dict(cfg)
    model_type = cfg.pop("model_type", None)
    try:
        return transformers.AutoConfig.for_model(model_type, **cfg)
    except (ValueError, TypeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        if "Unrecognized model identifier" in first or isinstance(exc, KeyError):
            raise LorabenchError(f"{where}: transformers {transformers.__version__} does not know model_type "
                                 f"'{model_type}'.") from None
        raise LorabenchError(f"{where}: transformers refuses the config: {first}") from None


def causal_lm(config, setup: TrainingSetup, device: torch.device, attention: Optional[str], name: str,
              images: bool = False):
    """transformers' causal-LM model for config, on device, in setup.dtype (a quantized base: loaded back through
    bitsandbytes, measure.qlora). attention: an attn_implementation, or None for transformers' own choice.
    images: the image-text-to-text model (its vision tower run on images), where the causal-LM mapping would
    build the language model alone (Llama 4).

    Raises:
        LorabenchError: transformers refuses to build it (e.g. Gemma 2 refuses SDPA).
    """
    transformers, _ = libraries()
    dtype = TORCH_DTYPES.get(setup.dtype, torch.bfloat16)
    try:
        with torch.device(device):
            model = _from_config(transformers, config, attention, images).to(dtype)
        if setup.dtype in QUANTIZED:
            model = load_quantized(model, setup.dtype, device, attention)
    except ValueError as exc:
        raise LorabenchError(f"transformers cannot build {name}" + (f" with {attention} attention" if attention
                             else "") + f": {str(exc).splitlines()[0][:200]}") from None
    return model


def _from_config(transformers, config, attention, images: bool = False):
    """AutoModelForCausalLM's model for config, or, for a vision-language config that the causal-LM mapping does
    not list (LLaVA, Qwen2.5-VL, Idefics3...), AutoModelForImageTextToText's: the language model with its vision
    tower and projector, as a fine-tuning script loads it. images: AutoModelForImageTextToText's first, for a
    config with a vision_config."""
    if images and getattr(config, "vision_config", None) is not None:
        try:
            return transformers.AutoModelForImageTextToText.from_config(config, attn_implementation=attention)
        except ValueError as exc:
            if "Unrecognized configuration class" not in str(exc):
                raise
    try:
        return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attention)
    except ValueError as exc:
        if "Unrecognized configuration class" not in str(exc):
            raise
        return transformers.AutoModelForImageTextToText.from_config(config, attn_implementation=attention)


def is_vision_language(model) -> bool:
    """The model holds a vision tower (an image-text-to-text model): its config has a vision_config."""
    return getattr(model.config, "vision_config", None) is not None


def checkpointing(model, setup: TrainingSetup):
    """Activation checkpointing as Trainer turns it on (non-reentrant), or PEFT's k-bit preparation (which turns
    it on itself); with setup.offload "checkpoints", each layer's input kept in host memory (measure.offload)."""
    _, peft = libraries()
    if setup.kbit_prepare:
        with expected_library_warnings():
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=setup.grad_checkpointing,
                                                         gradient_checkpointing_kwargs={"use_reentrant": False})
    elif setup.grad_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x's name for it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if setup.offload == "checkpoints":  # (k-bit preparation checkpoints too)
        from lorabench.measure.offload import offload_checkpoints

        offload_checkpoints(model)
    return model


def with_peft(model, config, freeze_a: bool = False, adapter_dtype: str = "fp32"):
    """model wrapped by peft.get_peft_model(config); freeze_a freezes every lora_A (LoRA-FA). adapter_dtype
    "fp32": PEFT's default, which upcasts 16-bit adapter weights to float32 (autocast_adapter_dtype); otherwise
    the adapters stay in the base layer's dtype."""
    _, peft = libraries()
    with expected_library_warnings():
        model = peft.get_peft_model(model, config, autocast_adapter_dtype=adapter_dtype == "fp32")
    if freeze_a:
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
    return model


def optimizer(model, name: str, lr: float, b_lr_ratio: float, device: torch.device,
              foreach: Optional[bool] = None) -> torch.optim.Optimizer:
    """setup.optimizer over the trainable parameters; LoRA+ (b_lr_ratio != 1): peft.optimizers'
    create_loraplus_optimizer, AdamW with B's learning rate ratio x A's. foreach: torch's multi-tensor step
    (None: torch's own choice for the tensors' device)."""
    if b_lr_ratio != 1.0:
        from peft.optimizers import create_loraplus_optimizer

        extra = {} if foreach is None else {"foreach": foreach}
        return create_loraplus_optimizer(model, optimizer_cls=torch.optim.AdamW, lr=lr, loraplus_lr_ratio=b_lr_ratio,
                                         **extra)
    from lorabench.nn.optim import make_optimizer

    params: List[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]
    return make_optimizer(name, [{"params": params}], lr, device=device, foreach=foreach)


__all__ = ["TORCH_DTYPES", "expected_library_warnings", "libraries", "hf_config", "causal_lm", "is_vision_language",
           "checkpointing", "with_peft", "optimizer"]
