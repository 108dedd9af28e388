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

Shards: a data-parallel runner (``RunnerLimits.num_seq_shards`` > 1) splits slots and blocks
into equal contiguous ranges, one per sequence shard, and a sequence's pools live on its slot's
shard, so every block it uses must come from that shard's range. Each shard therefore has its
own free lists (and the prefix cache evicts per shard); with one shard this is the plain pool.

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
        S, nb, ns = limits.num_seq_shards, limits.blocks_per_shard, limits.slots_per_shard
        self._free_blocks = [collections.deque(range(k * nb, (k + 1) * nb)) for k in range(S)]
        self._free_slots = [collections.deque(range(k * ns, (k + 1) * ns)) for k in range(S)]
        self._free_snapshots = collections.deque(range(limits.num_snapshots))
        self._pending_snapshots: set[int] = set()  # saved this step, not yet attached to an entry

    # ------------------------------------------------------------------ blocks
    @property
    def num_shards(self) -> int:
        return self.limits.num_seq_shards

    @property
    def num_free_blocks(self) -> int:
        """Blocks on the free lists (not counting evictable cache entries)."""
        return sum(len(q) for q in self._free_blocks)

    @property
    def num_available_blocks(self) -> int:
        """Blocks ``allocate`` can hand out now over all shards: free ones plus evictable cache entries."""
        return self.num_free_blocks + (self.cache.num_evictable if self.cache else 0)

    def available_blocks(self, shard: int) -> int:
        """Blocks ``allocate(n, shard)`` can hand out now."""
        return len(self._free_blocks[shard]) + (self.cache.num_evictable_in(shard) if self.cache else 0)

    def refcount(self, block_id: int) -> int:
        return self._ref[block_id]

    def is_exclusive(self, block_id: int) -> bool:
        """True if a sequence holding this block may write it."""
        return self._ref[block_id] == 1 and not (self.cache and self.cache.is_cached(block_id))

    def allocate(self, n: int, shard: int = 0) -> list[int]:
        """``n`` fresh blocks (refcount 1) of ``shard``, evicting least-recently-used cache
        entries of that shard if needed."""
        if n > self.available_blocks(shard):
            raise RuntimeError(
                f"allocate({n}) on shard {shard}: only {self.available_blocks(shard)} blocks available"
            )
        free = self._free_blocks[shard]
        out = []
        for _ in range(n):
            if free:
                b = free.popleft()
            else:
                e = self.cache.evict(shard)
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
                    self._free_blocks[self.limits.block_shard(b)].append(b)

    # ------------------------------------------------------------------ slots
    @property
    def num_free_slots(self) -> int:
        return sum(len(q) for q in self._free_slots)

    def free_slots_in(self, shard: int) -> int:
        return len(self._free_slots[shard])

    def alloc_slot(self, shard: int = 0) -> int:
        if not self._free_slots[shard]:
            raise RuntimeError(f"no free state slot on shard {shard}")
        return self._free_slots[shard].popleft()

    def free_slot(self, slot: int) -> None:
        q = self._free_slots[self.limits.slot_shard(slot)]
        if slot in q:
            raise RuntimeError(f"slot {slot} freed twice")
        q.append(slot)

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
        whole pool, or one shard's part of it, could not hold it even alone), or None."""
        lim = self.limits
        cap = lim.blocks_per_shard
        if worst_blocks > cap:
            where = (
                "the block pool holds"
                if lim.num_seq_shards == 1
                else (
                    f"a sequence's blocks must sit on one of {lim.num_seq_shards} sequence shards, each holding"
                )
            )
            return (
                f"needs up to {worst_blocks} blocks of {lim.block_tokens} tokens = "
                f"{fmt_bytes(self.bytes_of(worst_blocks))} of KV state, but {where} "
                f"{cap} blocks = {fmt_bytes(self.bytes_of(cap))}"
            )
        return None

    def shortfall(self, new_blocks: int, reserved_hits: int, shard: int = 0) -> str | None:
        """Why ``new_blocks`` fresh blocks and a slot of ``shard`` cannot be taken now (the
        request queues), or None. ``reserved_hits``: evictable blocks the request is about to
        share, which therefore do not count as available."""
        on = f" on sequence shard {shard}" if self.num_shards > 1 else ""
        if not self._free_slots[shard]:
            return f"all {self.limits.slots_per_shard} state slots{on} are in use"
        avail = self.available_blocks(shard) - reserved_hits
        if new_blocks > avail:
            return (
                f"needs {new_blocks} new blocks + 1 slot = "
                f"{fmt_bytes(self.bytes_of(new_blocks, 1))}; {avail} blocks = "
                f"{fmt_bytes(self.bytes_of(avail))} available{on}"
            )
        return None

    # ------------------------------------------------------------------ reset / checks
    def drop_cached(self) -> int:
        """Evict every unused cache entry (blocks and snapshots back to the free lists)."""
        n = 0
        while self.cache is not None and self.cache.num_evictable:
            e = self.cache.evict()
            if e.snapshot is not None:
                self.free_snapshot(e.snapshot)
            self._free_blocks[self.limits.block_shard(e.block_id)].append(e.block_id)
            n += 1
        return n

    def leaks(self) -> list[str]:
        """What is not back in a free pool or an evictable cache entry (empty when idle)."""
        out = []
        held = [b for b, r in enumerate(self._ref) if r]
        if held:
            out.append(f"blocks still referenced: {held}")
        free = {b for q in self._free_blocks for b in q}
        evictable = {b for b in range(self.limits.num_blocks) if self.cache and self.cache.is_evictable(b)}
        if len(free) != self.num_free_blocks or free & evictable:
            out.append("a block is listed twice in the free list / LRU")
        lim = self.limits
        if any(lim.block_shard(b) != k for k, q in enumerate(self._free_blocks) for b in q) or any(
            lim.slot_shard(s) != k for k, q in enumerate(self._free_slots) for s in q
        ):
            out.append("a block or slot is on another shard's free list")
        if len(free) + len(evictable) != self.limits.num_blocks:
            out.append(
                f"{self.limits.num_blocks - len(free) - len(evictable)} blocks neither free nor evictable"
            )
        if self.num_free_slots != self.limits.num_slots:
            free_slots = {s for q in self._free_slots for s in q}
            out.append(f"slots in use: {sorted(set(range(self.limits.num_slots)) - free_slots)}")
        attached = self.cache.snapshot_ids() if self.cache else []
        if self._pending_snapshots:
            out.append(f"snapshots saved but never attached: {sorted(self._pending_snapshots)}")
        if sorted(list(self._free_snapshots) + attached) != list(range(self.limits.num_snapshots)):
            out.append("snapshot ids lost or duplicated between the free list and cache entries")
        return out
