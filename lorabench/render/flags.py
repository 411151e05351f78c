"""A change to a setup (fields and values, as the estimator gives it) as the options a user types, with
lorabench.spelling's table: ("grad_checkpointing", True) is --grad-checkpointing, ("batch_size", 2) is
--batch-size 2. The estimator names no option; answers (CLI and API alike) carry these options as "args", what
to type whichever way the question came."""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

from lorabench.spelling import OPTIONS

def args(changes: Iterable[Tuple[str, object]]) -> List[str]:
    """The options that make `changes`, in their order: a flag alone for True, else the flag and its value."""
    out: List[str] = []
    for field, value in changes:
        out += [OPTIONS[field]] if value is True else [OPTIONS[field], str(value)]
    return out


def with_args(row: Optional[Dict]) -> Optional[Dict]:
    """The row with its "changes" spelled as "args" (options), in the same place among its keys."""
    if row is None or "changes" not in row:
        return row
    return {("args" if k == "changes" else k): (args(v) if k == "changes" else v) for k, v in row.items()}


def spelled(rows: List[Dict]) -> List[Dict]:
    """Memory rows with their verdict's changes (fix, fix_alternative) spelled as options; in place."""
    for row in rows:
        for key in ("fix", "fix_alternative"):
            if row.get(key) is not None:
                row[key] = with_args(row[key])
    return rows
