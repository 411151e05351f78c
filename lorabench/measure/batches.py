"""The tensors of a padded, packed or padding-free batch (lorabench.estimator.batches), at its longest: the batch
that memory is estimated for, made for the bench and the trace.

- Padding: the first row is --seq-len tokens long, the others as long as the examples' mean (rounded), padded on
  the right (attention_mask 0, as tokenizers pad for training); padding "max" pads every row to --seq-len.
- Packing: every row is --seq-len tokens of examples the mean's length, and a last one that fills the row; the
  position_ids restart at each example.
- Padding-free: the batch's examples, --seq-len tokens each (the longest batch), end to end in one row, with
  position_ids restarting at each.
"""

from __future__ import annotations

from typing import Dict

import torch

from lorabench.estimator.batches import lengths_of, rows_of
from lorabench.estimator.setup import TrainingSetup


def _positions(row_len: int, example: int) -> torch.Tensor:
    """position_ids of one row of examples `example` tokens long (the last one cut to fill the row)."""
    return torch.arange(row_len) % max(1, example)


def batch_tensors(setup: TrainingSetup, vocab_size: int, generator: torch.Generator) -> Dict[str, torch.Tensor]:
    """input_ids and, for a batched setup, attention_mask or position_ids (real CPU tensors)."""
    rows, row_len = rows_of(setup)
    ids = torch.randint(0, vocab_size, (rows, row_len), generator=generator)
    out = {"input_ids": ids}
    if not setup.batched:
        return out
    mean = max(1, min(row_len, round(lengths_of(setup).mean)))
    if setup.padding != "none":
        mask = torch.ones((rows, row_len), dtype=torch.long)
        if setup.padding == "max" or rows > 1:
            mask[0 if setup.padding == "max" and rows == 1 else 1:, mean:] = 0
        ids.masked_fill_(mask == 0, 0)
        out["attention_mask"] = mask
    elif setup.padding_free:
        out["position_ids"] = _positions(row_len, setup.seq_len).unsqueeze(0)
    else:  # packing
        out["position_ids"] = _positions(row_len, mean).unsqueeze(0).repeat(rows, 1)
    return out


__all__ = ["batch_tensors"]
