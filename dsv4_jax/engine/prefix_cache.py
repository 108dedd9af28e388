"""Content-addressed prefix cache over pool blocks (SERVING.md §1.6, §5 item 5).

**Keys cover the whole history.** Block i of a sequence (positions ``[i·bt, (i+1)·bt)``) is
keyed by ``key_i = H(key_{i-1}, tokens of block i)``, so the key names every token from
position 0 to the block's end. A block's compressed entries depend on all of those tokens
(every layer above the first mixes the whole history into its compressor input), and so does
an SWA snapshot taken at its end. Two histories that end in the same block tokens therefore
get different keys and never share state: AMD ATOM's corrupted outputs came from a window
ring that was *not* addressed this way (ATOM #1417). ``H`` is BLAKE2b-128 over the previous
key and the block's token ids as int64, so an accidental collision is out of reach.

**Entries.** A cache entry is one complete block: its key, its pool block id, its index in
the sequence, and optionally the id of an SWA snapshot (windows + compressor tails of the
sequence at the block's end, ``runner_api.SeqWork.save_snapshot``). A snapshot is only
valid for the exact history its block's key names, which is why it hangs off the entry and
is freed with it.

**Lifetime.** Reference counts live in ``BlockManager``. An entry whose block nobody
references is *evictable*: it stays in an LRU (least recently released first) and keeps
serving hits until the block pool needs its block. Sequences release their blocks last to
first, so a chain's tail is evicted before its head and the longest-shared heads survive.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import heapq
import itertools
from array import array
from collections.abc import Callable
from collections.abc import Sequence as Seq

ROOT_KEY = b"\x00" * 16  # the key "before" block 0


def chain_key(prev: bytes, block_tokens: Seq[int]) -> bytes:
    """Key of a block given the key of the block before it (``ROOT_KEY`` for block 0)."""
    h = hashlib.blake2b(prev, digest_size=16)
    h.update(array("q", block_tokens).tobytes())
    return h.digest()


def extend_keys(keys: list[bytes], tokens: Seq[int], block_tokens: int, upto: int) -> list[bytes]:
    """Extend ``keys`` (keys of tokens' first blocks) in place to the first ``upto`` blocks."""
    if upto * block_tokens > len(tokens):
        raise ValueError(
            f"block {upto - 1} is not complete: {len(tokens)} tokens, block_tokens={block_tokens}"
        )
    prev = keys[-1] if keys else ROOT_KEY
    for i in range(len(keys), upto):
        prev = chain_key(prev, tokens[i * block_tokens : (i + 1) * block_tokens])
        keys.append(prev)
    return keys


@dataclasses.dataclass(eq=False)
class CacheEntry:
    key: bytes
    block_id: int
    index: int  # block index in the sequence: the entry covers [index·bt, (index+1)·bt)
    snapshot: int | None = None  # SWA snapshot id at the block's end (position (index+1)·bt)


@dataclasses.dataclass
class CacheCounters:
    """Cumulative counters (for ``engine.stats()`` and Prometheus later)."""

    queries: int = 0  # admissions that looked the prompt up
    query_tokens: int = 0  # tokens those admissions asked for
    hits: int = 0  # admissions that reused at least one block
    hit_tokens: int = 0  # tokens whose compressed entries came from the cache
    hit_blocks: int = 0
    recompute_tokens: int = 0  # tokens replayed because of the SWA strategy (hit − resume point)
    restored_snapshots: int = 0
    saved_snapshots: int = 0
    evicted_blocks: int = 0
    evicted_snapshots: int = 0  # snapshots taken back from evictable entries to save newer ones


class PrefixCache:
    """Key → entry map plus the LRU of evictable entries. Knows nothing of refcounts itself:
    ``BlockManager`` tells it when a cached block becomes unused (``release``) or used (``use``)."""

    def __init__(self, block_shard: Callable[[int], int] | None = None):
        """``block_shard``: the sequence shard a block id lives on (``RunnerLimits.block_shard``);
        a data-parallel runner can only give a sequence blocks of its own shard, so evictions are
        asked for per shard. None: one shard."""
        self._shard_of = block_shard or (lambda b: 0)
        self._by_key: dict[bytes, CacheEntry] = {}
        self._by_block: dict[int, CacheEntry] = {}
        # One LRU per shard (least recently released first); entries carry a release stamp so
        # "least recently released over all shards" is still defined.
        self._lru: dict[int, collections.OrderedDict[int, tuple[int, CacheEntry]]] = collections.defaultdict(
            collections.OrderedDict
        )
        self._clock = itertools.count()
        self.counters = CacheCounters()

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, key: bytes) -> CacheEntry | None:
        return self._by_key.get(key)

    def entry_of(self, block_id: int) -> CacheEntry | None:
        return self._by_block.get(block_id)

    def is_cached(self, block_id: int) -> bool:
        return block_id in self._by_block

    def match(self, keys: Seq[bytes]) -> list[CacheEntry]:
        """Entries of the longest run of ``keys`` from block 0 that are all cached."""
        out = []
        for k in keys:
            e = self._by_key.get(k)
            if e is None:
                break
            out.append(e)
        return out

    @property
    def num_evictable(self) -> int:
        return sum(len(d) for d in self._lru.values())

    def num_evictable_in(self, shard: int) -> int:
        d = self._lru.get(shard)
        return len(d) if d else 0

    def is_evictable(self, block_id: int) -> bool:
        d = self._lru.get(self._shard_of(block_id))
        return bool(d) and block_id in d

    def snapshot_ids(self) -> list[int]:
        return [e.snapshot for e in self._by_key.values() if e.snapshot is not None]

    # ------------------------------------------------------------------ updates
    def insert(self, key: bytes, block_id: int, index: int) -> CacheEntry | None:
        """Register a complete block (held by its writer, so not evictable yet). Returns None
        when the key is already cached (another sequence computed the same content)."""
        if key in self._by_key:
            return None
        if block_id in self._by_block:
            raise RuntimeError(f"block {block_id} is already cached under another key")
        e = CacheEntry(key, block_id, index)
        self._by_key[key] = e
        self._by_block[block_id] = e
        return e

    def release(self, block_id: int) -> None:
        """The cached block's refcount fell to 0: it becomes evictable (most recent last)."""
        self._lru[self._shard_of(block_id)][block_id] = (next(self._clock), self._by_block[block_id])

    def use(self, block_id: int) -> None:
        """A sequence took a reference to an evictable cached block."""
        d = self._lru.get(self._shard_of(block_id))
        if d:
            d.pop(block_id, None)

    def evict(self, shard: int | None = None) -> CacheEntry:
        """Drop the least recently released entry (of ``shard``, or of any shard); the caller
        frees its block and snapshot."""
        if shard is None:
            shard = min((d for d in self._lru.items() if d[1]), key=lambda d: next(iter(d[1].values()))[0])[0]
        _, (_, e) = self._lru[shard].popitem(last=False)
        del self._by_key[e.key]
        del self._by_block[e.block_id]
        self.counters.evicted_blocks += 1
        return e

    def steal_snapshot(self) -> int | None:
        """Detach the snapshot of the least recently released entry that has one (its block
        stays cached for the compressed entries; a later hit there replays from an older
        snapshot or bounded recompute). None if no evictable entry holds a snapshot. Snapshots
        are not tied to a shard (the runner copies a slot across shards), so any shard's will do."""
        for _, e in heapq.merge(*(d.values() for d in self._lru.values()), key=lambda x: x[0]):
            if e.snapshot is not None:
                sid, e.snapshot = e.snapshot, None
                self.counters.evicted_snapshots += 1
                return sid
        return None
