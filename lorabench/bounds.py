"""The ranges a user's numbers must fall in, for the CLI's options and the Python API alike. They are far
outside anything real, so they only stop absurd inputs from becoming absurd numbers: the longest context
trained today is ~10**6 tokens, the widest model d=16384."""

from __future__ import annotations

from lorabench.errors import LorabenchError

DEFAULT_MODEL = "llama-3-8b"
MAX_RANK = 1 << 16
MAX_BATCH = 1 << 20
MAX_SEQ_LEN = 1 << 24
MAX_STEPS = 100_000
MAX_ALPHA = 1e6
MAX_TOKENS = 10 ** 15  # a thousand times the largest pre-training runs published (~10^13 tokens)


def check_int(name: str, value, lo: int, hi: int = MAX_SEQ_LEN) -> int:
    """value, an int in [lo, hi] (not a bool, not a float).

    Raises:
        LorabenchError: anything else.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise LorabenchError(f"{name} must be an integer from {lo:,} to {hi:,}, got {value!r}.")
    return value
