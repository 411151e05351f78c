"""Batches as users make them: padded, packed or padding-free rows, and the lengths of the examples in them.
Pure Python: no torch import.

What a batch changes, as transformers 5 and torch build the step:
- **The rows' shape.** `--padding longest|max` pads each row to the batch's longest example or to `--seq-len`
  (transformers' DataCollatorWithPadding, tokenizers' padding="longest"/"max_length"); `--packing` fills rows of
  `--seq-len` with whole examples (TRL's packing); `--padding-free` concatenates the batch's examples into one row
  (TRL's padding_free, DataCollatorWithFlattening), kept apart by position_ids that restart at each example.
- **A mask.** With padding, or several examples in a row, transformers builds a bool [B, 1, S, S] mask
  (masking_utils.sdpa_mask: it skips it only when every row is one unpadded sequence, and for a sliding-window
  layer only while the row fits in the window). SDPA then cannot run its causal flash kernel:
  - torch converts the bool mask to an additive one in q's dtype, per layer (attention.cpp,
    convert_boolean_attn_mask: at::where(mask, 0, -inf)), a full [B, 1, S, S] tensor, and the kernel that takes a
    mask keeps it for backward: CUDA's memory-efficient kernel (FlashAttention refuses masks; sdp_utils.cpp), its
    last dimension padded to a multiple of 8 (preprocess_mask, pad_bias), and the CPU's flash kernel, unpadded;
  - the kernel computes every key of the row (is_causal is off once a mask is given), not the causal half;
  - transformers' SDPA path leaves grouped-query attention to repeat_kv once a mask exists
    (integrations/sdpa_attention.py, use_gqa_in_sdpa: CUDA and the CPU need no mask): k and v are copied to the
    query's width, and SDPA keeps those copies (with one kv head the expanded view needs no copy).
  Measured on the CPU tracker (tests/test_batches.py): exactly these bytes per layer.
- **Positions per row.** With position_ids given (packing), the rotary tables cos and sin are made per row,
  [B, S, head_dim], instead of once for all rows.
- **Padding-free on CUDA** runs FlashAttention's variable-length kernel (transformers' flash_attention_2,
  TRL's padding_free): no mask, no padding, and each example attends only to itself. On the CPU transformers runs
  SDPA with a block-causal mask over the one row instead.
- **Tokens.** Padding costs compute but trains nothing: time and cost follow the real tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable, Optional, Tuple

from lorabench.errors import LorabenchError
from lorabench.spelling import option

PADDING = ("none", "longest", "max")
# FlashAttention and CUDA's memory-efficient kernel read an attention bias whose last dimension is a multiple of
# this many elements: torch pads a mask to it (attention.cpp, preprocess_mask: mem_eff_alignment = 8)
MASK_ALIGNMENT = 8
# The longest lengths file read: examples (a histogram of them is kept, not the list)
MAX_EXAMPLES = 100_000_000


@dataclass(frozen=True)
class Lengths:
    """Token lengths of the training examples: a histogram (a lengths file), or a summary (a mean, the longest
    being --seq-len), which knows no spread.

    Attributes:
        counts: (length, examples) pairs in ascending length; empty for a summary.
        mean: the mean length, in tokens.
        longest: the longest example's length.
    """

    counts: Tuple[Tuple[int, int], ...] = ()
    mean: float = 0.0
    longest: int = 0
    square: float = 0.0  # a summary's E[l^2], where known (0: mean^2)

    @classmethod
    def of(cls, values: Iterable[int]) -> "Lengths":
        """The histogram of these lengths.

        Raises:
            LorabenchError: no lengths, or one that is not a positive integer.
        """
        hist: dict = {}
        n = 0
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise LorabenchError(f"a token length must be a positive integer, got {v!r}.")
            hist[v] = hist.get(v, 0) + 1
            n += 1
            if n > MAX_EXAMPLES:
                raise LorabenchError(f"more than {MAX_EXAMPLES:,} lengths; give a sample of them.")
        if not hist:
            raise LorabenchError("no token lengths given.")
        counts = tuple(sorted(hist.items()))
        return cls(counts, sum(l * c for l, c in counts) / n, counts[-1][0])

    @classmethod
    def summary(cls, mean: float, longest: int, square: float = 0.0) -> "Lengths":
        return cls((), float(mean), int(longest), float(square))

    @property
    def examples(self) -> int:
        return sum(c for _, c in self.counts)

    def capped(self, cap: int) -> "Lengths":
        """These lengths truncated at cap tokens (the tokenizer's max_length, --seq-len)."""
        if self.longest <= cap:
            return self
        if not self.counts:
            return Lengths.summary(min(self.mean, cap), cap)
        merged: dict = {}
        for l, c in self.counts:
            merged[min(l, cap)] = merged.get(min(l, cap), 0) + c
        counts = tuple(sorted(merged.items()))
        return Lengths(counts, sum(l * c for l, c in counts) / self.examples, counts[-1][0])

    @property
    def uniform(self) -> bool:
        """Every example is equally long (a summary whose mean is its longest, or a one-length histogram)."""
        return self.mean >= self.longest

    def expected_longest(self, rows: int) -> float:
        """The expected longest of `rows` examples drawn at random (with replacement) from the histogram:
        sum over lengths l of l (F(l)^rows - F(l-1)^rows), F the cumulative share. A summary knows no spread:
        its longest."""
        if not self.counts:
            return float(self.longest)
        n, below, total = self.examples, 0, 0.0
        for l, c in self.counts:
            at = below + c
            total += l * ((at / n) ** rows - (below / n) ** rows)
            below = at
        return total

    @property
    def mean_square(self) -> float:
        """E[l^2]: the attention work of an example grows with its length squared. A summary knows no spread:
        mean^2 (equal lengths, the least it can be)."""
        if not self.counts:
            return self.square or self.mean ** 2
        return sum(l * l * c for l, c in self.counts) / self.examples


def read_lengths(path: str) -> Lengths:
    """The lengths in a file: integers separated by white space or commas, or a JSON list of them; '#' starts a
    comment.

    Raises:
        LorabenchError: unreadable, empty, or a value that is not a positive integer.
    """
    import json

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(64 << 20)
    except (OSError, UnicodeDecodeError) as exc:
        raise LorabenchError(f"cannot read lengths file {path}: {getattr(exc, 'strerror', None) or exc}.") from None
    if text.lstrip().startswith("["):
        try:
            values = json.loads(text)
        except ValueError as exc:
            raise LorabenchError(f"{path} is not a JSON list of token lengths: {exc}.") from None
        if not isinstance(values, list):
            raise LorabenchError(f"{path} is not a JSON list of token lengths.")
    else:
        words = " ".join(line.split("#", 1)[0] for line in text.splitlines()).replace(",", " ").split()
        values = []
        for w in words:
            try:
                values.append(int(w))
            except ValueError:
                raise LorabenchError(f"{path}: '{w[:40]}' is not a token length (a positive integer).") from None
    try:
        return Lengths.of(values)
    except LorabenchError as exc:
        raise LorabenchError(f"{path}: {exc}") from None


def kv_cache_on(setup) -> bool:
    """transformers' decoder returns a DynamicCache of every layer's k and v unless use_cache is off: it is
    turned off under gradient checkpointing, and Trainer sets config.use_cache to TrainingArguments.use_cache,
    False by default (transformers 5 trainer.py, "Finalize"); lorabench's layers keep none."""
    return setup.impl == "peft" and not setup.grad_checkpointing and setup.loop == "plain"


def rows_of(setup) -> Tuple[int, int]:
    """(rows, tokens per row) of the tensors the model runs on, at the longest batch: padding-free concatenates
    the batch's examples into one row."""
    if setup.padding_free:
        return 1, setup.batch_size * setup.seq_len
    return setup.batch_size, setup.seq_len


def typical_row_len(setup) -> float:
    """Tokens per row of a typical batch: padded to the expected longest of batch_size examples
    (padding longest), to --seq-len (padding max), full rows (packing, or no padding), or, padding-free, the
    batch's examples end to end."""
    lengths = lengths_of(setup)
    if setup.padding_free:
        return setup.batch_size * (setup.seq_len if setup.packing else lengths.mean)
    if setup.padding == "longest" and not setup.packing:
        return lengths.expected_longest(setup.batch_size)
    return float(setup.seq_len)


def typical_setup(setup):
    """The setup of a typical batch, which time and cost follow (the estimate's peak is the longest batch's):
    padded to the expected longest of batch_size examples (padding longest), or, padding-free, batch_size examples
    of the mean length end to end; any other batch is as long as its longest."""
    if setup.packing or not setup.batched:
        return setup
    lengths = lengths_of(setup)
    if setup.padding_free:
        mean = math.ceil(lengths.mean)
        return replace(setup, seq_len=mean, lengths=Lengths.summary(min(lengths.mean, mean), mean, lengths.mean_square))
    if setup.padding == "longest":
        return replace(setup, seq_len=max(1, math.ceil(lengths.expected_longest(setup.batch_size) - 1e-9)))
    return setup


def lengths_of(setup) -> Lengths:
    """The examples' lengths capped at --seq-len; every example --seq-len long when none were given."""
    given: Optional[Lengths] = setup.lengths
    if given is None:
        return Lengths.summary(setup.seq_len, setup.seq_len)
    return given.capped(setup.seq_len)


def real_tokens(setup) -> float:
    """Tokens per micro-batch that are not padding: full rows packed or unpadded, else the examples' mean."""
    if setup.packing or setup.padding == "none" and not setup.padding_free:
        return float(setup.tokens)
    return setup.batch_size * lengths_of(setup).mean


def masked(spec, setup, sliding: bool) -> bool:
    """A mask reaches this layer's SDPA kernel (module docstring): padding (unless every example is as long as the
    row), several examples in a row (packing; padding-free off CUDA), or a sliding window shorter than the row."""
    if spec.single_matrix or setup.for_spec(spec).attention != "sdpa":
        return False
    if sliding and spec.sliding_window and spec.sliding_window < rows_of(setup)[1]:
        return True
    if setup.padding_free or setup.packing:
        # transformers reads packed examples from position_ids only when no cache is passed
        # (masking_utils._preprocess_mask_arguments): with the KV cache on, rows attend across their examples
        return not kv_cache_on(setup) and several_in_a_row(setup) and not (setup.padding_free and
                                                                          setup.device == "cuda")
    if setup.padding == "longest" and setup.batch_size == 1:
        return False  # a row of one example is never padded
    return setup.padding != "none" and not lengths_of(setup).uniform


def several_in_a_row(setup) -> bool:
    """A packed or padding-free row holds more than one example: padding-free, when the batch has several; packed,
    unless every example fills a row."""
    if setup.padding_free:
        return setup.batch_size > 1
    lengths = lengths_of(setup)
    return not (lengths.uniform and lengths.longest >= setup.seq_len)


def mask_saves(spec, setup, sliding: bool) -> int:
    """Bytes per token one layer keeps for a mask beyond what it keeps without one: the additive mask in q's
    dtype, [rows, 1, S, S] (its last dimension padded to MASK_ALIGNMENT on CUDA), and, under grouped-query
    attention, k and v copied to the query's width (repeat_kv) instead of kept at theirs."""
    if not masked(spec, setup, sliding):
        return 0
    _, row_len = rows_of(setup)
    keys = -(-row_len // MASK_ALIGNMENT) * MASK_ALIGNMENT if setup.device == "cuda" else row_len
    return setup.act_bytes * keys + repeat_kv_bytes(spec, setup)


def repeat_kv_bytes(spec, setup) -> int:
    """Bytes per token repeat_kv's copies of k and v add under a mask, beyond k and v at their own width: grouped-
    query attention only (with one kv head, multi-query, the reshape of the expanded [B, 1, n, S, hd] is a view, no
    copy; with as many kv heads as heads there is nothing to repeat)."""
    if not 1 < spec.num_kv_heads < spec.num_heads:
        return 0
    return 2 * setup.act_bytes * (spec.q_dim - spec.kv_dim)


def bool_mask_bytes(spec, setup) -> int:
    """transformers' bool mask, one per kind of layer that needs one (full, sliding), shared by the layers:
    [rows, 1, S, S] bytes, alive while the decoder runs (and through backward under checkpointing, which keeps
    each layer's arguments for its recomputation). Without padding, a sliding-window mask is one [S, S]
    expanded over the rows."""
    if spec.single_matrix or setup.for_spec(spec).attention != "sdpa":
        return 0
    rows, row_len = rows_of(setup)
    total = 0
    sliding = spec.sliding_layers()
    for kind, layers in ((True, sliding), (False, spec.num_layers - sliding)):
        if layers and masked(spec, setup, kind):
            per_row = not (kind and not masked(spec, setup, False))  # only the window: one [S, S] for all rows
            total += (rows if per_row else 1) * row_len * row_len
    return total


def positions_per_row(setup) -> bool:
    """position_ids given per row (packing: they restart at each example), so rotary cos and sin are made per row."""
    return setup.packing and not setup.padding_free


def useful_keys(spec, setup, sliding: bool) -> float:
    """Keys a query's attention needs on average, the model FLOPs' count (whatever the kernel computes): the causal
    half of its row, about the window on a sliding-window layer, or, with several examples in a row (packed or
    padding-free), the causal half of its own example (E[l^2] / 2 E[l])."""
    if setup.packing or setup.padding_free:
        lengths = lengths_of(setup)
        return spec.attended_keys(min(lengths.mean_square / lengths.mean, rows_of(setup)[1]), sliding)
    return spec.attended_keys(rows_of(setup)[1], sliding)


def keys_attended(spec, setup, sliding: bool) -> float:
    """Keys a query's attention kernel computes on average, which its time follows: the causal half of its row
    (ModelSpec.attended_keys; FlashAttention skips the blocks outside a sliding window), every key of the row where
    a mask turns the causal kernel off (the memory-efficient kernel skips no block a bias masks), or, padding-free on
    CUDA, the causal half of its own example (E[l^2] / 2 E[l]). Model FLOPs count useful_keys instead."""
    if setup.padding_free and setup.device == "cuda" and setup.for_spec(spec).attention == "sdpa":
        return useful_keys(spec, setup, sliding)  # (the varlen kernel computes only what each example needs)
    if masked(spec, setup, sliding):
        return float(rows_of(setup)[1])
    return spec.attended_keys(rows_of(setup)[1], sliding)


def batch_fields(setup) -> dict:
    """A row's fields of how the batch is made: padding, packing, the tokens per optimizer step that are not
    padding, and the share of a typical batch's tokens that is padding; for padded, packed or padding-free batches
    the examples' mean and longest, examples per step and the typical batch's row length, which time and cost
    follow (a row's memory fields are the longest batch's)."""
    real = real_tokens(setup) * setup.grad_accum
    typical = typical_setup(setup)
    rows, row_len = rows_of(typical)
    padded = 0.0 if setup.packing or setup.padding_free else 1 - real / (rows * row_len * setup.grad_accum)
    fields = {"padding": setup.padding, "packing": setup.packing, "padding_free": setup.padding_free,
              "real_tokens_per_step": round(real), "padding_pct": round(100.0 * padded, 2)}
    if setup.batched:
        lengths = lengths_of(setup)
        fields.update({"mean_len": round(lengths.mean, 2), "longest_len": lengths.longest,
                       "examples_per_step": round(real / lengths.mean, 2), "typical_seq_len": typical.seq_len})
    return fields


def batch_notes(spec, setup) -> list:
    """What the batch changes, said in the output (module docstring)."""
    if not setup.batched or spec.single_matrix:
        return []
    notes = []
    lengths = lengths_of(setup)
    if setup.lengths is None and setup.padding != "none":
        notes.append(f"no lengths given: every example is taken as {option('seq_len')} ({setup.seq_len:,}) tokens, "
                     f"so nothing is padded; give {option('lengths')} FILE or {option('mean_len')} for the "
                     "padding.")
    if (setup.packing or setup.padding_free) and kv_cache_on(setup) and several_in_a_row(setup):
        notes.append("with the KV cache on (the plain loop without checkpointing), transformers does not read the "
                     "examples apart from position_ids (masking_utils): each row attends across its examples, "
                     "with no mask. Turn use_cache off (Trainer does) to keep them apart, and this estimate "
                     "then gains the mask.")
    sliding = spec.sliding_layers()
    masked_layers = (sliding * masked(spec, setup, True) + (spec.num_layers - sliding) * masked(spec, setup, False))
    if masked_layers:
        rows, row_len = rows_of(setup)
        per_layer = setup.act_bytes * rows * row_len * row_len
        repeat = repeat_kv_bytes(spec, setup) > 0
        notes.append(f"a mask reaches SDPA in {masked_layers} of {spec.num_layers} layers: torch keeps each layer's "
                     f"additive mask ({per_layer / 2 ** 20:,.1f} MiB a layer)"
                     + (", k and v are copied to the query's width (repeat_kv: transformers' GQA path needs no mask)"
                        if repeat else "")
                     + ", and the kernel computes every key, not the causal half."
                     + (f" {option('padding_free')} on CUDA (FlashAttention's variable-length kernel) needs no "
                        "mask." if not setup.padding_free else
                        " On the CPU transformers runs padding-free rows through SDPA with a block mask over the "
                        "whole row; on CUDA FlashAttention's variable-length kernel needs none."))
    if setup.padding == "longest" or setup.padding_free:
        notes.append("batches of varying length: the caching allocator keeps blocks cut for earlier shapes, so what "
                     "it reserves grows past the longest batch's peak (1.31-1.34x in a replay of its rules over "
                     f"varying, bucketed steps, reports/allocator-study); {option('headroom')} 34 leaves room for "
                     "that.")
    if setup.padding == "longest" and setup.lengths is not None and not lengths.counts and setup.batch_size > 1:
        notes.append(f"{option('mean_len')} gives no spread: a typical batch is taken as padded to the longest "
                     f"example; {option('lengths')} FILE gives the expected longest of {setup.batch_size} examples.")
    return notes
