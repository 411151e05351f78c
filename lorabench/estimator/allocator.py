"""What PyTorch's CUDA caching allocator reserves for a sequence of allocations and frees: its rules replayed in
pure Python, so that the tracker's event log of a step measured on the CPU (measure.probes.LiveTensorTracker with
events on) says what `torch.cuda.memory_reserved()` would read, block rounding, splitting and segment sizes
included. No torch import.

The rules, from c10/cuda/CUDACachingAllocator.cpp (torch 2.x, default settings: no max_split_size, no
expandable segments, no garbage-collection threshold, one stream):
- every request is rounded up to a multiple of 512 bytes (kMinBlockSize; round_size);
- requests of at most 1 MiB (kSmallSize) come from the small pool, larger ones from the large pool;
- a request no cached block holds gets a new segment (cudaMalloc) of 2 MiB (kSmallBuffer) for the small pool,
  20 MiB (kLargeBuffer) for a large request under 10 MiB (kMinLargeAlloc), else the request rounded up to 2 MiB
  (kRoundLarge) (get_allocation_size);
- a cached block is chosen best-fit: the smallest free block of the pool that holds the request
  (get_free_block over blocks ordered by size, then address);
- a block larger than the request is split when what remains is at least 512 bytes (small pool) or more than
  1 MiB (large pool) (should_split); the remainder stays a free block of the same segment;
- a freed block merges with free neighbours of its segment (free_block, try_merge_blocks);
- nothing goes back to the device until empty_cache(), which releases every wholly free segment.
Not replayed: kernel workspaces that never surface as tensors (cuBLAS's, attention kernels' scratch), other
streams, and the retry that frees the cache when a cudaMalloc fails (a step that needs it is at the edge of
out-of-memory anyway).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

from lorabench.gpus import MiB

MIN_BLOCK = 512
SMALL_SIZE = 1 * MiB
SMALL_BUFFER = 2 * MiB
LARGE_BUFFER = 20 * MiB
MIN_LARGE_ALLOC = 10 * MiB
ROUND_LARGE = 2 * MiB


def round_size(size: int) -> int:
    """A request's size as the allocator books it: a multiple of 512 bytes, at least 512."""
    return MIN_BLOCK if size < MIN_BLOCK else MIN_BLOCK * -(-size // MIN_BLOCK)


def segment_size(size: int) -> int:
    """The segment cudaMalloc'd for a (rounded) request that no cached block holds."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return ROUND_LARGE * -(-size // ROUND_LARGE)


@dataclass
class _Block:
    segment: int
    offset: int
    size: int
    free: bool = True
    prev: Optional["_Block"] = None
    next: Optional["_Block"] = None

    def key(self) -> Tuple[int, int, int]:
        return (self.size, self.segment, self.offset)


@dataclass
class _Pool:
    free: List[Tuple[int, int, int]] = field(default_factory=list)  # sorted (size, segment, offset)
    blocks: Dict[Tuple[int, int, int], _Block] = field(default_factory=dict)

    def add(self, block: _Block) -> None:
        k = block.key()
        bisect.insort(self.free, k)
        self.blocks[k] = block

    def remove(self, block: _Block) -> None:
        k = block.key()
        self.free.pop(bisect.bisect_left(self.free, k))
        del self.blocks[k]

    def best_fit(self, size: int) -> Optional[_Block]:
        i = bisect.bisect_left(self.free, (size, -1, -1))
        return self.blocks[self.free[i]] if i < len(self.free) else None


class CachingAllocator:
    """The allocator's bookkeeping: malloc(key, nbytes), free(key), empty_cache(); reserved and allocated bytes (as
    torch.cuda.memory_reserved / memory_allocated read them) and their peaks."""

    def __init__(self) -> None:
        self._pools = {True: _Pool(), False: _Pool()}  # small, large
        self._segments: Dict[int, Tuple[int, bool]] = {}  # segment -> (size, small)
        self._live: Dict[object, _Block] = {}
        self._next_segment = 0
        self.reserved_bytes = self.allocated_bytes = 0
        self.peak_reserved_bytes = self.peak_allocated_bytes = 0

    def malloc(self, key: object, nbytes: int) -> None:
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        pool = self._pools[small]
        block = pool.best_fit(size)
        if block is None:
            seg = self._next_segment
            self._next_segment += 1
            total = segment_size(size)
            self._segments[seg] = (total, small)
            self.reserved_bytes += total
            self.peak_reserved_bytes = max(self.peak_reserved_bytes, self.reserved_bytes)
            block = _Block(seg, 0, total)
        else:
            pool.remove(block)
        remaining = block.size - size
        if remaining >= MIN_BLOCK if small else remaining > SMALL_SIZE:
            rest = _Block(block.segment, block.offset + size, remaining, True, block, block.next)
            if block.next is not None:
                block.next.prev = rest
            block.next, block.size = rest, size
            pool.add(rest)
        block.free = False
        self._live[key] = block
        self.allocated_bytes += block.size
        self.peak_allocated_bytes = max(self.peak_allocated_bytes, self.allocated_bytes)

    def free(self, key: object) -> None:
        block = self._live.pop(key, None)
        if block is None:
            return
        self.allocated_bytes -= block.size
        small = self._segments[block.segment][1]
        pool = self._pools[small]
        block.free = True
        for neighbour in (block.prev, block.next):
            if neighbour is not None and neighbour.free:
                pool.remove(neighbour)
                if neighbour is block.prev:
                    neighbour.size += block.size
                    neighbour.next = block.next
                    if block.next is not None:
                        block.next.prev = neighbour
                    block = neighbour
                else:
                    block.size += neighbour.size
                    block.next = neighbour.next
                    if neighbour.next is not None:
                        neighbour.next.prev = block
        pool.add(block)

    def empty_cache(self) -> None:
        """Every wholly free segment back to the device."""
        for small, pool in self._pools.items():
            for k in list(pool.free):
                block = pool.blocks[k]
                if block.prev is None and block.next is None:
                    pool.remove(block)
                    self.reserved_bytes -= self._segments.pop(block.segment)[0]

    def reset_peaks(self) -> None:
        self.peak_reserved_bytes, self.peak_allocated_bytes = self.reserved_bytes, self.allocated_bytes


def replay(events: Iterable[Tuple[str, object, int]], allocator: Optional[CachingAllocator] = None) -> CachingAllocator:
    """The allocator after a tracker's event log: ("a", key, nbytes) allocates, ("f", key, nbytes) frees, ("e", None,
    0) empties the cache."""
    allocator = allocator or CachingAllocator()
    for kind, key, nbytes in events:
        if kind == "a":
            allocator.malloc(key, nbytes)
        elif kind == "f":
            allocator.free(key)
        else:
            allocator.empty_cache()
    return allocator


__all__ = ["round_size", "segment_size", "CachingAllocator", "replay"]
