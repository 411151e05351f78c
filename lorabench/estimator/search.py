"""The largest value that fits, in few calls of an expensive need (a trace of seconds: measure.tracefit). Pure
Python."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple


def largest_within(need: Callable[[int], int], capacity: int, lo: int, hi: int,
                   start: Optional[int] = None) -> Optional[int]:
    """The largest n in [lo, hi] with need(n) <= capacity (None: not even lo), for need nondecreasing in n, in few
    calls of need: each may be a trace of seconds (measure.tracefit). A step's peak is nearly affine in the batch,
    the sequence and the rank, or quadratic in the sequence where eager attention keeps its scores (convex: the
    largest of its ops' sizes), so the curve through the three known values nearest the answer lands on or beside
    it; the answer is then checked on both sides (n fits, n + 1 does not), and a step that does not halve the
    bracket is followed by bisection. Exact for any nondecreasing need, whatever its shape.

    Example:
        >>> calls = []
        >>> largest_within(lambda n: calls.append(n) or 1000 + 37 * n, 5000, 1, 1 << 20, start=4)
        108
        >>> calls
        [4, 5, 108, 109]
    """
    known: Dict[int, int] = {}

    def f(n: int) -> int:
        if n not in known:
            known[n] = need(n)
        return known[n]

    first = lo if start is None else min(max(start, lo), hi)
    good: Optional[int] = first if f(first) <= capacity else None  # the largest n known to fit
    bad: Optional[int] = None if good is not None else first  # the smallest known not to
    if good is None:
        if first == lo or f(lo) > capacity:
            return None
        good = lo
    bisect = False
    while bad is None or bad - good > 1:
        if bad is None and good == hi:
            return hi
        top = bad - 1 if bad is not None else hi  # the largest n still open
        width = top - good
        if bisect and bad is not None:
            n = (good + bad) // 2
        elif len(known) == 1:  # a second point, for a slope
            n = good + 1
        else:
            nearest = sorted(known, key=lambda k: abs(k - good))[:3]
            n = _crossing([(k, known[k]) for k in nearest], capacity, good, top)
        n = min(max(n, good + 1), top)
        if f(n) <= capacity:
            good = n
        else:
            bad = n
        bisect = not bisect and ((bad - 1 if bad is not None else hi) - good) * 2 > width
    return good


def _crossing(points: List[Tuple[int, int]], capacity: int, good: int, top: int) -> int:
    """Where the curve through points (a line through two, a parabola through three) reaches capacity, rounded
    down, between good and top; a parabola without a root there falls back to the line through its first two."""
    (x0, y0), (x1, y1) = points[:2]
    d01 = (y1 - y0) / (x1 - x0)
    if len(points) == 3:
        x2, y2 = points[2]
        d2 = ((y2 - y1) / (x2 - x1) - d01) / (x2 - x0)
        if d2 > 0:  # y0 + d01 u + d2 u (u - (x1 - x0)) = capacity, u = x - x0: the larger root
            b = d01 - d2 * (x1 - x0)
            disc = b * b - 4 * d2 * (y0 - capacity)
            if disc >= 0:
                root = x0 + (-b + disc ** 0.5) / (2 * d2)
                if good <= root < top + 1:
                    return int(root)
    if d01 <= 0:
        return top
    return int(min(x0 + (capacity - y0) / d01, top))


__all__ = ["largest_within"]
