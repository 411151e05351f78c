"""The options of how a batch is made (lorabench.estimator.batches: padding, packing, padding-free rows, the
examples' lengths) and of where activations live (--offload). setup_options adds them; they reach TrainingSetup
through estimator.setup.setup_from, as the API's keywords do."""

from __future__ import annotations

import functools

import click

from lorabench.bounds import MAX_SEQ_LEN
from lorabench.estimator.batches import PADDING
from lorabench.estimator.setup import OFFLOAD


def batch_options(fn):
    """--padding, --packing, --padding-free, --lengths, --mean-len and --offload; passes batch_fields={...} (setup
    fields)."""
    from lorabench.cli.options import BoundedFloat

    @click.option("--padding", type=click.Choice(PADDING), default="none", show_default=True,
                  help="How rows are padded: none (each row --seq-len tokens of one example, no mask), longest (to "
                       "the batch's longest example, as DataCollatorWithPadding) or max (to --seq-len). The memory "
                       "is the longest batch's; time and cost follow the real tokens of a typical one.")
    @click.option("--packing", is_flag=True,
                  help="Rows of --seq-len filled with whole examples (TRL's packing), kept apart by position_ids: "
                       "transformers gives SDPA a block mask.")
    @click.option("--padding-free", is_flag=True,
                  help="The batch's examples end to end in one row (TRL's padding_free): FlashAttention's "
                       "variable-length kernel on CUDA, no mask; a block mask over the row on the CPU.")
    @click.option("--lengths", "lengths", type=click.Path(dir_okay=False), default=None, metavar="FILE",
                  help="The examples' token lengths: integers separated by spaces, commas or lines, or a JSON "
                       "list. --seq-len caps them (default: their longest).")
    @click.option("--mean-len", type=BoundedFloat(0.0, MAX_SEQ_LEN, lo_open=True), default=None,
                  help="The examples' mean length in tokens, --seq-len being the longest (instead of --lengths; "
                       "no spread is known).")
    @click.option("--offload", type=click.Choice(OFFLOAD), default="none", show_default=True,
                  help="checkpoints: with --grad-checkpointing, each layer's input kept in pinned host memory and "
                       "brought back for its recomputation (Unsloth's offloaded checkpointing, axolotl's "
                       "hidden_states offload); offload_host_bytes is the host memory it takes.")
    @functools.wraps(fn)
    def wrapper(padding, packing, padding_free, lengths, mean_len, offload, **kw):
        return fn(batch_fields=dict(padding=padding, packing=packing, padding_free=padding_free, lengths=lengths,
                                    mean_len=mean_len, offload=offload), **kw)
    return wrapper


__all__ = ["batch_options"]
