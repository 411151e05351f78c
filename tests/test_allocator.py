"""The caching allocator's rules (lorabench.estimator.allocator), each case worked by hand from
c10/cuda/CUDACachingAllocator.cpp: round_size (512-byte blocks), get_allocation_size (2 MiB small segments, 20 MiB
large ones under 10 MiB, else rounded to 2 MiB), best-fit search, should_split and the merge of freed neighbours."""

from lorabench.estimator.allocator import CachingAllocator, replay, round_size, segment_size
from lorabench.gpus import MiB


def test_rounding_and_segment_sizes_by_hand():
    assert [round_size(n) for n in (1, 512, 513, 4096)] == [512, 512, 1024, 4096]
    assert segment_size(MiB) == 2 * MiB  # the small pool's segment
    assert segment_size(MiB + 512) == 20 * MiB  # a large request under 10 MiB
    assert segment_size(10 * MiB - 512) == 20 * MiB
    assert segment_size(10 * MiB) == 10 * MiB
    assert segment_size(11 * MiB + 512) == 12 * MiB  # rounded up to 2 MiB


def test_large_requests_share_a_20_mib_segment():
    a = CachingAllocator()
    for i in range(4):  # 5 MiB each: the first splits the new 20 MiB segment, the fourth takes what is left
        a.malloc(i, 5 * MiB)
    assert (a.reserved_bytes, a.allocated_bytes) == (20 * MiB, 20 * MiB)
    a.malloc(4, 5 * MiB)
    assert a.reserved_bytes == 40 * MiB


def test_a_cached_block_too_small_takes_a_new_segment_and_best_fit_does_not_split_1_mib():
    a = CachingAllocator()
    a.malloc("x", 12 * MiB)
    a.free("x")
    a.malloc("y", 13 * MiB)  # the cached 12 MiB block cannot hold it: a new 14 MiB segment
    assert a.reserved_bytes == 26 * MiB
    a.free("y")
    a.malloc("z", 11 * MiB)  # best fit: the 12 MiB block; 1 MiB would remain, not more than 1 MiB: no split
    assert (a.reserved_bytes, a.allocated_bytes) == (26 * MiB, 12 * MiB)


def test_freed_neighbours_merge():
    a = CachingAllocator()
    a.malloc("a", 3 * MiB)
    a.malloc("b", 3 * MiB)
    a.free("a")
    a.free("b")  # a, b and the 14 MiB left merge back into the whole 20 MiB segment
    a.malloc("c", 20 * MiB)
    assert a.reserved_bytes == 20 * MiB and a.peak_reserved_bytes == 20 * MiB


def test_the_small_pool_fills_2_mib_segments():
    a = CachingAllocator()
    for i in range(2048):  # 1 KiB each: 2,048 to a 2 MiB segment
        a.malloc(i, 1000)
    assert a.reserved_bytes == 2 * MiB
    a.malloc("one more", 1000)
    assert a.reserved_bytes == 4 * MiB


def test_empty_cache_releases_wholly_free_segments_only():
    # 5 MiB takes a 20 MiB segment (15 MiB left free in it); 16 MiB does not fit there: a 16 MiB segment
    events = [("a", "kept", 5 * MiB), ("a", "gone", 16 * MiB), ("f", "gone", 16 * MiB), ("e", None, 0)]
    a = replay(events)
    assert (a.reserved_bytes, a.peak_reserved_bytes) == (20 * MiB, 36 * MiB)
