"""Data parallelism applied to a built model, one function per strategy (as torchtitan's `apply_fsdp` /
`apply_ddp`), and what a rank reads off it: its local shards and the bytes its collectives move.

The strategies are torch's own, applied as their docs show:
- fsdp: FSDP2, `torch.distributed.fsdp.fully_shard` on each decoder layer, then on the root (the fully_shard
  docs; torchtitan's apply_fsdp), each parameter a DTensor sharded on dim 0;
- zero2: the same with `reshard_after_forward=False` (FSDP1's SHARD_GRAD_OP);
- ddp: `torch.nn.parallel.DistributedDataParallel` with its defaults.
lorabench.estimator.sharding.STRATEGIES is the estimator's table of what each shards.

The collectives are counted where torch dispatches them: FSDP2's `all_gather_single` / `reduce_scatter_single`
and DDP's Reducer (its all-reduce runs from C++ on autograd's thread) all call the c10d ops
(`torch.ops.c10d._allgather_base_`, `_reduce_scatter_base_`, `allreduce_`, `broadcast_`) through the
dispatcher, so a TorchDispatchMode sees every one with its tensors (checked: torch 2.13, gloo).
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lorabench.errors import LorabenchError
from lorabench.estimator.sharding import STRATEGIES

SHARDINGS = tuple(STRATEGIES)  # the estimator's table of what each shards, in its order


def decoder_layers(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The decoder layers of lorabench.nn's Transformer (`model.layers`), of a transformers causal LM
    (`model.model.layers`: its base_model's) or of a PEFT model around one (through get_base_model()).

    Raises:
        LorabenchError: no decoder layers found.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT's wrapper
    for owner in (inner, getattr(inner, "base_model", None)):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, torch.nn.ModuleList):
            return list(layers)
    raise LorabenchError(f"no decoder layers found in {type(model).__name__} to shard one by one.")


def apply_fsdp(model: torch.nn.Module, reshard_after_forward: bool = True,
               layers: Optional[Sequence[torch.nn.Module]] = None) -> torch.nn.Module:
    """FSDP2 on `model` in place: fully_shard each decoder layer (`layers`, else decoder_layers(model)), then the
    root (embeddings, final norm, head and anything no layer holds). Each layer is one all-gather and one
    reduce-scatter group. The root gets fully_shard's default, so that FSDPState._lazy_init keeps it gathered
    from forward to backward (it would be all-gathered again at once); given reshard_after_forward=True
    explicitly, it would be resharded and gathered twice. Returns model (fully_shard changes its class in place)."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model) if layers is None else layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward)
    fully_shard(model)
    return model


def apply_ddp(model: torch.nn.Module, device: Optional[torch.device] = None) -> torch.nn.Module:
    """DistributedDataParallel around model, torch's defaults (25 MiB buckets, the first 1 MiB;
    gradient_as_bucket_view=False; buffers broadcast from rank 0 before every forward). On CUDA, one GPU
    per process: device_ids=[device]."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device] if device is not None and device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def parallelize(model: torch.nn.Module, sharding: str, device: torch.device,
                layers: Optional[Sequence[torch.nn.Module]] = None) -> torch.nn.Module:
    """model under `sharding` (SHARDINGS): what to call for forward. none returns model as it is. layers: the
    decoder layers FSDP shards one by one, where decoder_layers cannot find them (any transformers family)."""
    if sharding == "fsdp":
        return apply_fsdp(model, layers=layers)
    if sharding == "zero2":
        return apply_fsdp(model, reshard_after_forward=False, layers=layers)
    if sharding == "ddp":
        return apply_ddp(model, device)
    if sharding == "none":
        return model
    raise LorabenchError(f"unknown sharding '{sharding}'; choose from {', '.join(SHARDINGS)}.")


# c10d op -> (kind, which argument holds the whole collective's buffer): the gathered output, the
# reduce-scatter input, the all-reduced or broadcast tensors (torch/csrc/distributed/c10d/Ops.cpp schemas).
COLLECTIVES = {
    "_allgather_base_": ("all_gather", 0), "allgather_": ("all_gather", 0),
    "allgather_into_tensor_coalesced_": ("all_gather", 0),
    "_reduce_scatter_base_": ("reduce_scatter", 1), "reduce_scatter_": ("reduce_scatter", 1),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "allreduce_": ("all_reduce", 0), "allreduce_coalesced_": ("all_reduce", 0),
    "broadcast_": ("broadcast", 0),
}
KINDS = ("all_gather", "reduce_scatter", "all_reduce", "broadcast", "other")


class CommCounter(TorchDispatchMode):
    """Calls and buffer bytes of each kind of collective dispatched while the mode is active.

    A collective's buffer is the whole tensor it fills or reduces: an all-gather's output, a reduce-scatter's
    input, an all-reduce's tensor (N chunks of what each rank contributes or keeps). sent_bytes turns them into
    the bytes one rank sends with ring algorithms, as lorabench.estimator.comms counts them.
    """

    def __init__(self):
        super().__init__()
        self.calls: Dict[str, int] = dict.fromkeys(KINDS, 0)
        self.buffer_bytes: Dict[str, int] = dict.fromkeys(KINDS, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            name = func._schema.name.split("::")[-1]
            kind, arg = COLLECTIVES.get(name, ("other", None))
            self.calls[kind] += 1
            if arg is not None:
                self.buffer_bytes[kind] += sum(t.nbytes for t in tree_flatten(args[arg])[0]
                                               if isinstance(t, torch.Tensor))
        return func(*args, **(kwargs or {}))

    def sent_bytes(self, world: int) -> Dict[str, int]:
        """Bytes one of `world` ranks sends per kind (ring: all-gather and reduce-scatter (N - 1) / N of the
        buffer, all-reduce 2 (N - 1) / N; Patarasuk & Yuan 2009), as lorabench.estimator.comms.comm_volume counts."""
        b, n = self.buffer_bytes, world
        return {"all_gather": (n - 1) * b["all_gather"] // n, "reduce_scatter": (n - 1) * b["reduce_scatter"] // n,
                "all_reduce": 2 * (n - 1) * b["all_reduce"] // n}


def settle(probe, pause_s: float = 0.005, limit_s: float = 0.5) -> None:
    """Let collectives' threads drop what they finished with before a phase boundary is read.

    gloo's worker thread holds a collective's tensors until it has done with the work (a reduce-scatter's copy
    of its input, which gloo all-reduces: ProcessGroupGloo::reduce_scatter_tensor_coalesced), and a thread other
    than Python's main one frees a tensor Python has seen only once it holds the GIL: the copy made for the
    root's reduce-scatter, the last of backward, could otherwise still count when the optimizer phase's peak is
    reset (seen: 4 MiB on 2 of 3 ranks, some runs). This sleeps, giving the GIL away, until what is alive stops
    changing (at most limit_s)."""
    last, waited = probe.current(), 0.0
    while waited < limit_s:
        time.sleep(pause_s)
        waited += pause_s
        now = probe.current()
        if now == last:
            return
        last = now


__all__ = ["SHARDINGS", "decoder_layers", "apply_fsdp", "apply_ddp", "parallelize", "CommCounter", "settle"]
