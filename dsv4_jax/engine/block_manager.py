"""Host-side pools of the device state: pool blocks, state slots and SWA snapshots.

The runner allocates three fixed stores once (``RunnerLimits``); this class hands out their
indices. Sizes are counted in the runner's units, and the byte cost of each unit comes from the
state accounting (``kv_accounting.kv_bytes`` via ``RunnerLimits.bytes_per_block`` /
``bytes_per_slot``), so admission control can say in bytes why a request waits or is refused.

* **Blocks**: one logical block = ``block_tokens`` native positions in *every* layer's pools
  (CSA main rows, CSA indexer keys, HCA rows; SERVING.md fact 2), so one block id and one
  refcount cover all layouts of those positions. Free list + refcount per block. A block whose
  refcount falls to 0 goes back to the free list, or, if it is a prefix-cache entry, to the
  cache's LRU, where it keeps serving hits until ``allocate`` needs it (free list first, so
  uncached blocks are always reused before cached ones).
* **Slots**: per running sequence, the SWA windows of every layer plus the compressor tails
  (fixed size, ``bytes_per_slot``).
* **Snapshots**: saved copies of a slot at a block boundary (``full`` / ``checkpoint`` SWA
  strategies), each owned by the prefix-cache entry of the block that ends there; the same
  size as a slot.

Write safety: a sequence only writes a block it holds alone (refcount 1) that is not a cache
entry (``is_exclusive``); ``scheduler.py`` explains why that holds without copy-on-write.
"""

from __future__ import annotations

import collections

from dsv4_jax.engine.prefix_cache import CacheEntry, PrefixCache
from dsv4_jax.engine.runner_api import RunnerLimits


def fmt_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit} ({n:,} B)"
    return f"{n:,} B"


class BlockManager:
    def __init__(self, limits: RunnerLimits, cache: PrefixCache | None = None):
        self.limits = limits
        self.cache = cache
        self._ref = [0] * limits.num_blocks
        self._free_blocks = collections.deque(range(limits.num_blocks))
        self._free_slots = collections.deque(range(limits.num_slots))
        self._free_snapshots = collections.deque(range(limits.num_snapshots))
        self._pending_snapshots: set[int] = set()  # saved this step, not yet attached to an entry

    # ------------------------------------------------------------------ blocks
    @property
    def num_free_blocks(self) -> int:
        """Blocks on the free list (not counting evictable cache entries)."""
        return len(self._free_blocks)

    @property
    def num_available_blocks(self) -> int:
        """Blocks ``allocate`` can hand out now: free ones plus evictable cache entries."""
        return len(self._free_blocks) + (self.cache.num_evictable if self.cache else 0)

    def refcount(self, block_id: int) -> int:
        return self._ref[block_id]

    def is_exclusive(self, block_id: int) -> bool:
        """True if a sequence holding this block may write it."""
        return self._ref[block_id] == 1 and not (self.cache and self.cache.is_cached(block_id))

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh blocks (refcount 1), evicting least-recently-used cache entries if needed."""
        if n > self.num_available_blocks:
            raise RuntimeError(f"allocate({n}): only {self.num_available_blocks} blocks available")
        out = []
        for _ in range(n):
            if self._free_blocks:
                b = self._free_blocks.popleft()
            else:
                e = self.cache.evict()
                if e.snapshot is not None:
                    self.free_snapshot(e.snapshot)
                b = e.block_id
            self._ref[b] = 1
            out.append(b)
        return out

    def share(self, entries: list[CacheEntry]) -> list[int]:
        """Take a reference to each cached block of a prefix hit; returns their block ids."""
        for e in entries:
            if self._ref[e.block_id] == 0:
                self.cache.use(e.block_id)
            self._ref[e.block_id] += 1
        return [e.block_id for e in entries]

    def release(self, block_ids: list[int]) -> None:
        """Drop one reference to each block, last block first (so a cached chain's tail is
        evicted before its head)."""
        for b in reversed(block_ids):
            if self._ref[b] <= 0:
                raise RuntimeError(f"release of block {b} with refcount {self._ref[b]}")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if self.cache is not None and self.cache.is_cached(b):
                    self.cache.release(b)
                else:
                    self._free_blocks.append(b)

    # ------------------------------------------------------------------ slots
    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def alloc_slot(self) -> int:
        if not self._free_slots:
            raise RuntimeError("no free state slot")
        return self._free_slots.popleft()

    def free_slot(self, slot: int) -> None:
        if slot in self._free_slots:
            raise RuntimeError(f"slot {slot} freed twice")
        self._free_slots.append(slot)

    # ------------------------------------------------------------------ snapshots
    @property
    def num_free_snapshots(self) -> int:
        return len(self._free_snapshots)

    def alloc_snapshot(self) -> int | None:
        """A snapshot id to save into, taking one back from an evictable cache entry if the
        store is full; None if every snapshot belongs to a block in use."""
        if self._free_snapshots:
            sid = self._free_snapshots.popleft()
        elif self.cache is not None and (sid := self.cache.steal_snapshot()) is not None:
            pass
        else:
            return None
        self._pending_snapshots.add(sid)
        return sid

    def attach_snapshot(self, sid: int, entry: CacheEntry | None) -> bool:
        """Give a just-saved snapshot to the cache entry of the block it ends; frees it if
        the entry already has one (or there is no entry)."""
        self._pending_snapshots.discard(sid)
        if entry is not None and entry.snapshot is None:
            entry.snapshot = sid
            return True
        self._free_snapshots.append(sid)
        return False

    def free_snapshot(self, sid: int) -> None:
        self._pending_snapshots.discard(sid)
        self._free_snapshots.append(sid)

    # ------------------------------------------------------------------ bytes / admission
    def bytes_of(self, blocks: int = 0, slots: int = 0) -> int:
        return blocks * self.limits.bytes_per_block + slots * self.limits.bytes_per_slot

    def refusal(self, worst_blocks: int) -> str | None:
        """Why a request whose state can grow to ``worst_blocks`` blocks can never run (the
        whole pool could not hold it even alone), or None."""
        lim = self.limits
        if worst_blocks > lim.num_blocks:
            return (f"needs up to {worst_blocks} blocks of {lim.block_tokens} tokens = "
                    f"{fmt_bytes(self.bytes_of(worst_blocks))} of KV state, but the block pool holds "
                    f"{lim.num_blocks} blocks = {fmt_bytes(self.bytes_of(lim.num_blocks))}")  # fmt: skip
        return None

    def shortfall(self, new_blocks: int, reserved_hits: int) -> str | None:
        """Why ``new_blocks`` fresh blocks and a slot cannot be taken now (the request queues),
        or None. ``reserved_hits``: evictable blocks the request is about to share, which
        therefore do not count as available."""
        if not self._free_slots:
            return f"all {self.limits.num_slots} state slots are in use"
        avail = self.num_available_blocks - reserved_hits
        if new_blocks > avail:
            return (f"needs {new_blocks} new blocks + 1 slot = "
                    f"{fmt_bytes(self.bytes_of(new_blocks, 1))}; {avail} blocks = "
                    f"{fmt_bytes(self.bytes_of(avail))} available")  # fmt: skip
        return None

    # ------------------------------------------------------------------ reset / checks
    def drop_cached(self) -> int:
        """Evict every unused cache entry (blocks and snapshots back to the free lists)."""
        n = 0
        while self.cache is not None and self.cache.num_evictable:
            e = self.cache.evict()
            if e.snapshot is not None:
                self.free_snapshot(e.snapshot)
            self._free_blocks.append(e.block_id)
            n += 1
        return n

    def leaks(self) -> list[str]:
        """What is not back in a free pool or an evictable cache entry (empty when idle)."""
        out = []
        held = [b for b, r in enumerate(self._ref) if r]
        if held:
            out.append(f"blocks still referenced: {held}")
        free = set(self._free_blocks)
        evictable = {b for b in range(self.limits.num_blocks) if self.cache and self.cache.is_evictable(b)}
        if len(free) != len(self._free_blocks) or free & evictable:
            out.append("a block is listed twice in the free list / LRU")
        if len(free) + len(evictable) != self.limits.num_blocks:
            out.append(
                f"{self.limits.num_blocks - len(free) - len(evictable)} blocks neither free nor evictable"
            )
        if len(self._free_slots) != self.limits.num_slots:
            out.append(f"slots in use: {sorted(set(range(self.limits.num_slots)) - set(self._free_slots))}")
        attached = self.cache.snapshot_ids() if self.cache else []
        if self._pending_snapshots:
            out.append(f"snapshots saved but never attached: {sorted(self._pending_snapshots)}")
        if sorted(list(self._free_snapshots) + attached) != list(range(self.limits.num_snapshots)):
            out.append("snapshot ids lost or duplicated between the free list and cache entries")
        return out
