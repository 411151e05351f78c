"""How a setting is named in a message: the estimator names fields (`option("dtype", "fp32")`), never flags.
Under the CLI (the default) a field is spelled as its option, --dtype fp32; inside the Python API
(`api_spelling()`) as its keyword, dtype='fp32'. The options are this one table; render.flags spells a fix's
changes with it too."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Dict, Iterator

# A field of the setup (TrainingSetup, Parallel, the model, the sweep, the run) and its CLI option.
OPTIONS: Dict[str, str] = {
    "model": "--model", "config": "--config", "d": "--d", "layers": "--layers", "method": "--method",
    "rank": "--rank", "targets": "--targets", "alpha": "--alpha",
    "batch_size": "--batch-size", "seq_len": "--seq-len", "dtype": "--dtype", "adapter_dtype": "--adapter-dtype",
    "optimizer": "--optimizer", "grad_checkpointing": "--grad-checkpointing", "attention": "--attention",
    "dropout": "--dropout", "master_weights": "--master-weights", "device": "--device", "impl": "--impl",
    "loop": "--loop", "autocast": "--autocast", "grad_accum": "--grad-accum", "loss": "--loss",
    "loss_chunk": "--loss-chunk", "kbit_prepare": "--kbit-prepare", "padding": "--padding", "packing": "--packing",
    "padding_free": "--padding-free", "lengths": "--lengths", "mean_len": "--mean-len",
    "offload": "--offload", "headroom": "--headroom",
    "gpus": "--gpus", "sharding": "--sharding", "cpu_offload": "--cpu-offload", "gpu": "--gpu",
    "tokens": "--tokens", "dataset_tokens": "--dataset-tokens", "epochs": "--epochs", "price": "--price",
    "engine": "--engine", "peft_config": "--peft-config", "images": "--images", "image_size": "--image-size",
}

# The short forms the CLI's messages use for a few options.
SHORT: Dict[str, str] = {"targets": "-t", "batch_size": "-b", "seq_len": "-s", "rank": "-r", "model": "-m"}

_API = contextvars.ContextVar("lorabench_api_spelling", default=False)
_NAMED = object()


def option(field: str, value: object = _NAMED, short: bool = False) -> str:
    """field (and the value given to it) as the user typed it: '--dtype fp32', '--kbit-prepare' and '--targets'
    (short: '-t') under the CLI; "dtype='fp32'", 'kbit_prepare=True' and 'targets' under the API."""
    if _API.get():
        return field if value is _NAMED else f"{field}={value!r}"
    flag = SHORT[field] if short else OPTIONS[field]
    return flag if value is _NAMED or value is True else f"{flag} {value}"


@contextlib.contextmanager
def api_spelling() -> Iterator[None]:
    """Messages made inside spell settings as the API's keywords."""
    token = _API.set(True)
    try:
        yield
    finally:
        _API.reset(token)
