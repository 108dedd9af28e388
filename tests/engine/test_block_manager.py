"""Pools and refcounts (block_manager.py) and the cache's LRU (prefix_cache.py), directly."""

import pytest
from fake_runner import make_limits

from dsv4_jax.engine.block_manager import BlockManager, fmt_bytes
from dsv4_jax.engine.prefix_cache import PrefixCache


def manager(**kw):
    cache = PrefixCache()
    return BlockManager(make_limits(**kw), cache), cache


def test_refcounts_sharing_and_write_exclusivity():
    bm, cache = manager(num_blocks=6)
    a = bm.allocate(3)
    assert a == [0, 1, 2] and all(bm.is_exclusive(b) for b in a)
    e0, e1 = cache.insert(b"k0", a[0], 0), cache.insert(b"k1", a[1], 1)
    assert cache.insert(b"k0", 5, 0) is None  # the key is taken: a duplicate stays private
    assert not bm.is_exclusive(a[0])  # published: read-only even for its writer
    assert bm.share([e0, e1]) == [0, 1] and bm.refcount(0) == 2
    bm.release(a)  # the writer finishes: 2 is freed, 0 and 1 are still shared
    assert bm.num_free_blocks == 4 and cache.num_evictable == 0
    bm.release([0, 1])
    assert cache.num_evictable == 2 and bm.num_available_blocks == 6
    with pytest.raises(RuntimeError, match="refcount 0"):
        bm.release([0])
    assert bm.leaks() == []


def test_free_list_before_cache_and_lru_evicts_chain_tails_first():
    bm, cache = manager(num_blocks=4, num_snapshots=2)
    blocks = bm.allocate(3)
    entries = [cache.insert(bytes([i]), b, i) for i, b in enumerate(blocks)]
    sid = bm.alloc_snapshot()
    assert bm.attach_snapshot(sid, entries[2]) and entries[2].snapshot == sid
    bm.release(blocks)  # released last-first: block 2 is the least recently released
    assert bm.allocate(1) == [3]  # the free list goes first
    assert bm.allocate(1) == [2] and cache.get(bytes([2])) is None  # then the chain's tail
    assert bm.num_free_snapshots == 2  # its snapshot went with it
    assert cache.match([bytes([0]), bytes([1]), bytes([2])]) == entries[:2]
    with pytest.raises(RuntimeError, match="only 2 blocks available"):
        bm.allocate(3)


def test_snapshots_are_taken_back_from_evictable_entries_only():
    bm, cache = manager(num_blocks=4, num_snapshots=1)
    b = bm.allocate(2)
    e = [cache.insert(bytes([i]), x, i) for i, x in enumerate(b)]
    assert bm.attach_snapshot(bm.alloc_snapshot(), e[0])
    assert bm.alloc_snapshot() is None  # e[0]'s block is in use: its snapshot stays
    bm.release(b)
    sid = bm.alloc_snapshot()
    assert sid is not None and e[0].snapshot is None and cache.counters.evicted_snapshots == 1
    assert not bm.attach_snapshot(sid, None)  # no entry to own it: back to the free list
    assert bm.leaks() == []


def test_slots_and_leak_report():
    bm, _ = manager(num_slots=2)
    s = bm.alloc_slot(), bm.alloc_slot()
    with pytest.raises(RuntimeError, match="no free state slot"):
        bm.alloc_slot()
    bm.allocate(1)
    bm.alloc_snapshot()
    leaks = bm.leaks()
    assert any("blocks still referenced: [0]" in x for x in leaks) and any(
        "slots in use: [0, 1]" in x for x in leaks
    )
    assert any("never attached" in x for x in leaks)
    bm.free_slot(s[0])
    with pytest.raises(RuntimeError, match="freed twice"):
        bm.free_slot(s[0])


def test_admission_messages_in_bytes():
    bm, _ = manager(num_blocks=8, bytes_per_block=3 << 20, bytes_per_slot=1 << 30)
    assert "needs up to 9 blocks of 16 tokens = 27.00 MiB" in bm.refusal(9)
    assert bm.refusal(8) is None
    bm.allocate(5)
    msg = bm.shortfall(4, reserved_hits=0)
    assert (
        msg.startswith("needs 4 new blocks + 1 slot = 1.01 GiB")
        and "3 blocks = 9.00 MiB (9,437,184 B) available" in msg
    )
    assert bm.shortfall(3, 0) is None and bm.shortfall(3, reserved_hits=1) is not None
    assert fmt_bytes(512) == "512 B"
