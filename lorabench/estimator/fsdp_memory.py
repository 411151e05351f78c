"""What FSDP2 holds on one GPU, moment by moment, under lorabench.estimator.sharding's zero2 and fsdp. Pure Python.

FSDP2 (torch.distributed.fsdp.fully_shard, torch 2.13: _fsdp_param.py, _fsdp_param_group.py, _fsdp_state.py,
_fsdp_collectives.py) applied to each decoder layer and to the root (lorabench.measure.distributed.apply_fsdp):
- each parameter is a DTensor sharded on dim 0 by torch.chunk: every GPU stores ceil(dim0 / N) rows, zero-padded
  (FSDPParam._init_sharded_param: `padded_sharded_param_size = chunks[0].size()`), and rank r's unpadded
  share is rows [r ceil(dim0/N), (r+1) ceil(dim0/N)) clipped to dim0: rank 0 holds the most, the last may hold
  none. Optimizer states are zeros_like of the unpadded shard;
- a group's parameters are all-gathered in their own dtype (no MixedPrecisionPolicy modelled) into one flat
  padded output, then copied out into the unsharded parameters: which of the two are alive when is
  gathered_params. The root is not resharded after forward (FSDPState._lazy_init, when fully_shard is not
  told otherwise): it stays gathered from forward to the end of backward;
- gradients: autograd makes a layer's unsharded gradients, foreach_reduce copies them into a padded
  reduce-scatter input and frees them but the last; the output (the padded shards) becomes the sharded .grad
  (_reduce). One reduce-scatter input is kept in flight (reduce_scatter_max_input_buffers = 1) until the next
  group reduces. Frozen parameters are sharded and gathered like the rest, and never reduce-scattered;
- CPUOffloadPolicy: sharded parameters and gradients live on the host, the optimizer steps there.

Each of these was found measuring FSDP2 on 2 and 3 CPU processes (bench --nproc, tests/test_distributed.py)
against an estimate that had two layers gathered throughout, and read back in torch's source.
"""

from __future__ import annotations

from typing import Dict, Tuple

from lorabench.estimator.memory import Gathered, Held, StepParts
from lorabench.estimator.optimizer import OPTIMIZERS, optimizer_state_bytes
from lorabench.estimator.parallel import Parallel
from lorabench.estimator.plan import Plan
from lorabench.estimator.setup import TrainingSetup


def padded_rows(dim0: int, gpus: int) -> int:
    """Rows of dim 0 every GPU stores: torch.chunk's chunk, ceil(dim0 / N) (FSDP2 pads the others to it)."""
    return -(-dim0 // gpus)


def shard_rows(dim0: int, gpus: int, gpu_rank: int) -> int:
    """Rows of dim 0 that are rank gpu_rank's own (unpadded): torch.chunk's chunk gpu_rank, or none."""
    chunk = padded_rows(dim0, gpus)
    return max(0, min(chunk, dim0 - gpu_rank * chunk))


def _state_bytes(t, setup: TrainingSetup) -> int:
    """Bytes per element of a trainable tensor's optimizer states: fp32 with master weights (as step_parts)."""
    return 4 if setup.master_weights and t.elem_bytes < 4 else t.elem_bytes


def _sharded_parts(plan: "Plan", p: "Parallel", gpu_rank: int) -> Dict[str, int]:
    """One GPU's components under zero2/fsdp, tensor by tensor (see the module docstring). Per FSDP group
    (root, one layer): its all-gathered bytes (`root`, `layer`), its trainable parameters' unsharded gradients
    (`*_ugrads`), their padded reduce-scatter input (`*_rs_in`) and output, the shards (`*_shard`), and the
    unsharded gradient of its last trainable parameter in registration order (`*_last`: foreach_reduce's loop
    variable keeps it until the reduce-scatter returns)."""
    n, setup, parts = p.gpus, plan.setup, plan.parts
    layout = plan.layout
    c = dict.fromkeys(("weights", "adapter", "weights_replicated", "adapter_replicated", "grads", "optim", "master",
                       "method_state", "temp", "host_params", "host_grads", "root_early_grads"), 0)
    for group in ("root", "layer"):
        c.update(dict.fromkeys((group, f"{group}_ugrads", f"{group}_rs_in", f"{group}_shard", f"{group}_last"), 0))
    largest_local = 0
    for group, tensors, count in (("root", layout.root, 1), ("layer", layout.layer, layout.num_layers)):
        for t in tensors:
            rows = padded_rows(t.dim0, n) if t.sharded else t.dim0
            kept = count * rows * t.rest * t.elem_bytes
            c["adapter" if t.adapter else "weights"] += kept
            if t.sharded:
                c[group] += n * rows * t.rest * t.elem_bytes
                c["host_params"] += kept
            else:
                c["adapter_replicated" if t.adapter else "weights_replicated"] += kept
            local = shard_rows(t.dim0, n, gpu_rank) * t.rest
            if t.adapter and parts.method_state_bytes:  # Delta-LoRA's copy of A and B, for the GPU's own
                c["method_state"] += count * local * t.elem_bytes
            if not t.trainable:
                continue
            c["grads"] += kept
            c["host_grads"] += count * local * t.elem_bytes
            c[f"{group}_ugrads"] += t.nbytes
            c[f"{group}_rs_in"] += n * rows * t.rest * t.elem_bytes
            c[f"{group}_shard"] += rows * t.rest * t.elem_bytes
            c[f"{group}_last"] = t.nbytes
            # autograd reaches the embeddings last: the root's other gradients (the head's, the final norm's)
            # are alive, unsharded, while the layers back-propagate
            if group == "root" and t.name not in ("embed", "positions"):
                c["root_early_grads"] += t.nbytes
            sb = _state_bytes(t, setup)
            c["optim"] += count * optimizer_state_bytes(setup.optimizer, local, sb)
            c["master"] += count * 4 * local if sb == 4 and t.elem_bytes < 4 else 0
            c["temp"] += count * local * sb
            largest_local = max(largest_local, local * sb)
    if not OPTIMIZERS[setup.optimizer].step_temporaries:
        c["temp"] = 0
    elif setup.device != "cuda":  # torch's per-tensor AdamW: two temporaries of the largest tensor
        c["temp"] = 2 * largest_local
    if plan.spec.tie_embeddings and plan.method.base_trainable:  # the head's gradient lands in embed's
        c["root_early_grads"] += plan.parts.head_grad_bytes
    c["gpus"] = n
    return c


def gathered_params(root: int, layer: int, layers: int, keeps_gathered: bool, gpus: int,
                    gloo: bool = False) -> Gathered:
    """Bytes of parameters gathered at each moment of a step under FSDP2 (torch 2.13, _fsdp_param_group.py,
    _fsdp_state.py), from `root` and `layer`, one group's all-gathered bytes (padded).

    A group's all-gather fills one flat output buffer, which the copy-out splits into the unsharded parameters
    (FSDPParam.all_gather_outputs, as big again). In forward the group keeps that output (comm_ctx's
    all_gather_state) until the next group's copy-out, so it may overlap the next all-gather; the root's
    post-forward frees the last one after the loss. In backward each layer's pre-backward prefetches the next
    layer's all-gather (_backward_prefetch) and frees its own output right after its copy-out. So:
    - when the first layer's all-gather lands, the root's parameters and its output are alive with it;
    - while a layer computes its forward, the root's parameters, the layer's and its output: two layers;
    - at the end of forward, the root's parameters and the last layer's output (under zero2 every layer too);
    - at the start of backward, the root's and the last layer's output, which the root's pre-backward
      prefetched; while a layer back-propagates, its parameters and the next layer's prefetched output;
    - zero2 (reshard_after_forward=False): every layer stays gathered from its forward to its backward, where
      nothing is gathered again, and each is resharded after its backward.
    On one GPU there is no all-gather (FSDPParamGroup.wait_for_unshard copies each shard into its unsharded
    parameter): only the unsharded parameters. gloo (the CPU's process group) receives an all-gather into a
    flat tensor of its own and copies it into the output (ProcessGroupGloo's AsyncAllgatherWork: newLikeFlat):
    while a layer's all-gather lands, a second copy of it is alive, beside the previous layer's output that
    forward keeps until this copy-out (wait_for_unshard frees it then).
    """
    flat = layer if gpus > 1 else 0  # the last all-gather output (forward) or the prefetched one (backward)
    landing = flat if gloo else 0  # gloo's own flat copy of the all-gather arriving
    first = root + (root if gpus > 1 else 0) + layer + landing  # the root's parameters, its output, the first layer's
    if keeps_gathered:
        every = root + layers * layer
        return Gathered(every + flat, every, every + flat, first, every, every,
                        root + (layers - 1) * layer + 2 * flat + landing)
    prefetched = flat if layers > 1 else 0
    return Gathered(root + flat, root, root + layer + flat, first, root + flat, root + layer + prefetched,
                    root + 2 * flat + landing if layers > 1 else 0)


def _reduce(c: Dict[str, int], group: str, device: str) -> int:
    """A group's reduce-scatter in _fsdp_collectives.foreach_reduce: the padded input, into which the unsharded
    gradients are copied; then, those freed but the last (the loop variable `unsharded_grad` keeps it until the
    function returns), the output (the new shards) and, on the CPU, gloo's copy of the input, which it
    all-reduces whole and copies this rank's chunk from (ProcessGroupGloo::reduce_scatter_tensor_coalesced).
    On one GPU the input is copied to the output, nothing kept beside them."""
    if c["gpus"] == 1:
        return c[f"{group}_rs_in"] + max(c[f"{group}_ugrads"], c[f"{group}_shard"])
    gloo = c[f"{group}_rs_in"] if device == "cpu" else 0
    return c[f"{group}_rs_in"] + max(c[f"{group}_ugrads"], c[f"{group}_last"] + c[f"{group}_shard"] + gloo)


def _early_layers(c: Dict[str, int], layers: int, accum: int, off: bool, device: str, parts: StepParts) -> int:
    """What the first two decoder layers hold while they back-propagate (the end of backward but for the
    embeddings), beside the root's parameters and early gradients: the layer's parameters, and its recomputed
    activations and temporaries or its unsharded gradients; the next layer's reduce-scatter input, still kept
    (reduce_scatter_max_input_buffers = 1: freed when the next group reduces); the later layers' shards (every
    shard, accumulating; none on the GPU with CPU offload). The second layer also has the first layer's
    prefetched all-gather output (zero2: its parameters) and the first layer's saved activations (the saved
    activations over the layers), but one shard fewer. Then the first layer, resharded, reduce-scatters its
    gradients (_reduce)."""
    def shards(later_layers: int) -> int:
        return 0 if off else accum if accum else later_layers * c["layer_shard"]

    # as the one-GPU estimate takes a layer's backward (memory.StepParts.phase_peaks): its recomputed
    # activations and temporaries before its weight gradients, or those gradients with its last temporaries
    computing = c["layer"] + max(parts.act.recompute_bytes + parts.layer_temp_bytes,
                                 c["layer_ugrads"] + parts.act.transient_bytes)
    first = computing + (c["layer_rs_in"] if layers > 1 else 0) + shards(layers - 1)
    second = 0
    if layers > 1:
        saved = (parts.act.saved_bytes - parts.act.final_norm_bytes) // layers
        second = computing + c["layer"] + (c["layer_rs_in"] if layers > 2 else 0) + shards(layers - 2) + saved
    reduce = shards(layers - 1) + _reduce(c, "layer", device)
    return c["root"] + c["root_early_grads"] + max(first, second, reduce)


def _root_end(c: Dict[str, int], grads: int, accum: int, off: bool, device: str) -> int:
    """The root's post-backward, the last: its parameters resharded before it reduces, every layer's shards (and
    the root's own, accumulating), and its reduce-scatter (_reduce)."""
    kept = 0 if off else accum if accum else grads - c["root_shard"]
    return kept + _reduce(c, "root", device) if c["root_ugrads"] else kept


def sharded_held(plan: "Plan", parallel: "Parallel", gpu_rank: int) -> Tuple[Dict[str, int], Held]:
    """One GPU's components under zero2/fsdp (_sharded_parts, with `gather`, the most parameters gathered at
    once, `reduce_scatter`, the larger group's unsharded gradients with their reduce-scatter input, and `host`,
    what --cpu-offload keeps on the host) and what it holds in each phase (memory.Held)."""
    c = _sharded_parts(plan, parallel, gpu_rank)
    parts, setup, off, layers = plan.parts, plan.setup, parallel.cpu_offload, plan.layout.num_layers
    grads, temp = c["grads"], c["temp"]
    c["host"] = 0
    if off:  # CPUOffloadPolicy: the shards, their gradients and the optimizer step live on the host
        c["host"] = c["host_params"] + c["host_grads"] + c["optim"] + c["master"] + temp
        grads = temp = 0
    persistent = (c["weights_replicated"] + c["adapter_replicated"] if off
                  else c["weights"] + c["adapter"] + c["optim"] + c["master"]) + c["method_state"]
    accum = grads if setup.grad_accum > 1 else 0
    gathered = gathered_params(c["root"], c["layer"], layers, parallel.strategy.keeps_gathered, parallel.gpus,
                               gloo=setup.device == "cpu")
    c["gather"] = max(gathered.layer_forward_bytes, gathered.first_layer_bytes)
    c["reduce_scatter"] = max(c["layer_ugrads"] + c["layer_rs_in"], c["root_ugrads"] + c["root_rs_in"])
    # The last layer back-propagates: the head's unsharded gradient (the root's, reduce-scattered at the end
    # of backward) and that layer's unsharded gradients as they appear.
    last_layer = parts.head_grad_bytes + accum + c["layer_ugrads"]
    end = max(_early_layers(c, layers, accum, off, setup.device, parts), _root_end(c, grads, accum, off, setup.device))
    return c, Held(persistent_bytes=persistent, grads_bytes=grads, accum_bytes=accum, backward_grads_bytes=last_layer,
                   end_grads_bytes=end, optimizer_temp_bytes=temp, gathered=gathered)


def floor_held(plan: "Plan", parallel: "Parallel") -> Held:
    """A Held that no count of GPUs (2 or more) under parallel's strategy goes under, field by field: nothing
    sharded kept, only what is replicated (quantization constants, VeRA's buffers); the parameters gathered
    without padding (N ceil(dim0 / N) >= dim0 rows); the last layer's unsharded gradients and the head's; the
    root's parameters, its early gradients and one layer back-propagating at the end of backward (as
    _early_layers). memory.StepParts.phase_peaks only adds what it is given, so the need it gives is a floor
    for lorabench.estimator.sharding.fewest_gpus."""
    one = Parallel(1, parallel.sharding, parallel.cpu_offload)
    c, parts = _sharded_parts(plan, one, 0), plan.parts  # on one GPU every tensor is whole, unpadded
    gathered = gathered_params(c["root"], c["layer"], plan.layout.num_layers, parallel.strategy.keeps_gathered, 2)
    computing = c["layer"] + max(parts.act.recompute_bytes + parts.layer_temp_bytes,
                                 c["layer_ugrads"] + parts.act.transient_bytes)
    return Held(persistent_bytes=c["weights_replicated"] + c["adapter_replicated"], grads_bytes=0, accum_bytes=0,
                backward_grads_bytes=parts.head_grad_bytes + c["layer_ugrads"],
                end_grads_bytes=c["root"] + c["root_early_grads"] + computing, optimizer_temp_bytes=0,
                gathered=gathered)


__all__ = ["padded_rows", "shard_rows", "gathered_params", "sharded_held", "floor_held"]
