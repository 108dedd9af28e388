"""Continuous batching: which sequences run this step, with which tokens, in which state.

**Each step** (``schedule``), under a token budget (``max_tokens_per_step``) and a batch limit:

1. *Decodes first*, oldest first: one token each. A decode that needs a new block and finds
   none preempts the newest running sequence (by recompute: its blocks and slot are freed,
   it goes back to the head of the queue with its outputs kept; SERVING.md §5 item 10: run
   out of blocks, never out of memory). If the newest is itself, it yields.
2. *Prefill chunks* of running sequences, oldest first, as far as the budget goes.
3. *Admissions*, strict FCFS: the head of the queue gets a slot, its prefix-cache hit and fresh
   blocks for the rest of its prompt plus the first decode, then a first chunk. If the head
   does not fit, nobody behind it jumps the queue, so long prompts cannot starve.

**Prefix hits and the SWA strategies** (SERVING.md §1.6; ``_resume_point``). A prompt of n
tokens looks up the chain keys of its first ``⌊(n−1)/bt⌋`` blocks (never the block holding
the last token: its logits must be computed) and shares the longest cached run: H = k·bt
tokens whose compressed entries come from the cache. The SWA windows and compressor tails at
H are rebuilt according to the strategy:

* ``full`` / ``checkpoint``: restore the newest snapshot at C ≤ H (C = H under ``full``,
  since every cached block carries one) and replay ``[C, H)`` with ``cached_until = H``.
* ``recompute``: a fresh slot with ``state_start = R = H − window·num_layers`` (rounded down
  to a block boundary, clamped at 0) replays ``[R, H)``. Layer l's window at H depends only
  on layer l−1's outputs over the previous ``window`` positions, and every compressed entry
  before H comes from the cache, so after ``window·num_layers`` positions every layer's
  window and tail is exact: the continuation equals a cold run (unlike a one-window replay).
  ``full``/``checkpoint`` use the same bounded replay when it starts later than their newest
  snapshot (a snapshot that was taken back, or none yet).

Snapshots are saved where a chunk ends on the strategy's grid (every block for ``full``,
every ``checkpoint_interval`` for ``checkpoint``): the chunk is cut there when the block that
ends there has no snapshot yet. Replay chunks end at H, so no work straddles ``cached_until``.

**Why shared blocks are never written (no copy-on-write needed).** Hits are whole blocks, and
a block becomes a cache entry only once complete, i.e. after the step that wrote its last
position. A sequence writes positions from ``max(start, cached_until)`` on; every block there
was allocated fresh for it (refcount 1, not cached): the replay below H writes no compressed
entry, and the first block at or after H is one of the fresh blocks allocated on admission.
So the only blocks ever written are exclusively owned, and a block's content never changes
once its key is published.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import time

from dsv4_jax.engine.block_manager import BlockManager
from dsv4_jax.engine.prefix_cache import CacheEntry, PrefixCache, extend_keys
from dsv4_jax.engine.profiles import EngineConfig
from dsv4_jax.engine.request import RequestStatus, Sequence
from dsv4_jax.engine.runner_api import RunnerLimits, SeqWork
from dsv4_jax.intmath import cdiv


@dataclasses.dataclass
class Scheduled:
    seq: Sequence
    work: SeqWork
    end: int  # positions [0, end) are in the state once the step ran (drafts never are)
    snapshot: int | None  # snapshot id the runner saves at ``end``
    decode: bool  # one generated token (not a prefill chunk or a recompute of outputs)


def _seq_key(s: Sequence) -> int:
    return s.seq_id


class Scheduler:
    def __init__(
        self,
        limits: RunnerLimits,
        config: EngineConfig,
        block_manager: BlockManager,
        cache: PrefixCache | None,
        max_model_len: int,
    ):
        self.limits = limits
        self.config = config
        self.bm = block_manager
        self.cache = cache
        self.bt = limits.block_tokens
        self.max_model_len = max_model_len
        self.strategy = config.swa_strategy
        self.interval = config.snapshot_interval if (cache is not None and limits.num_snapshots > 0) else None
        self.replay_tokens = limits.window * limits.num_layers  # recompute replay length
        self.max_running = min(limits.num_slots, limits.max_batch, limits.max_tokens_per_step)
        self.waiting: list[Sequence] = []  # sorted by seq_id (FCFS; preempted ones rejoin in order)
        self.running: list[Sequence] = []  # sorted by seq_id
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queue changes
    def add(self, seq: Sequence) -> None:
        seq.request.status = RequestStatus.WAITING
        bisect.insort(self.waiting, seq, key=_seq_key)

    def abort(self, seq: Sequence) -> None:
        """Cancel: frees its blocks, slot and queue place at once (between steps)."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.running:
            self.running.remove(seq)
            self._free_state(seq)

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free_state(seq)

    def _free_state(self, seq: Sequence) -> None:
        self.bm.release(seq.block_ids)
        seq.block_ids = []
        if seq.slot is not None:
            self.bm.free_slot(seq.slot)
            seq.slot = None

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: drop the device state, keep tokens and outputs. Its complete
        blocks stay in the prefix cache (evictable), so resuming usually hits them."""
        self.running.remove(seq)
        self._free_state(seq)
        seq.num_computed = seq.num_registered = seq.cached_until = seq.state_start = 0
        seq.restore_snapshot, seq.fresh = None, True
        seq.drafts, seq.num_new = [], 1
        seq.request.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)

    # ------------------------------------------------------------------ one step
    def schedule(self) -> list[Scheduled]:
        out: list[Scheduled] = []
        budget, batch = self.limits.max_tokens_per_step, self.limits.max_batch
        taken: set[int] = set()
        preempted = False
        # MTP drafts: how many each sequence proposes for the next step, from the load now
        want = min(
            self.limits.max_draft_tokens, self.config.draft_depth(len(self.running) + len(self.waiting))
        )

        def take(seq: Sequence, drafts: int = 0) -> None:
            nonlocal budget, batch
            sc = self._chunk(seq, budget, drafts, want)
            out.append(sc)
            taken.add(seq.seq_id)
            budget -= len(sc.work.tokens)
            batch -= 1
            if seq.request.metrics.first_scheduled is None:
                seq.request.metrics.first_scheduled = time.monotonic()

        for seq in list(self.running):  # 1. decodes
            if not (budget and batch):
                break
            if seq.slot is None or not seq.is_decoding:
                continue
            k = self._drafts(seq, budget)
            if k and cdiv(len(seq.tokens) + k, self.bt) - len(seq.block_ids) > self.bm.available_blocks(
                self.limits.slot_shard(seq.slot)
            ):
                k = 0  # drafts never preempt anyone
            if not self._grow(seq, len(seq.tokens) + k, taken):
                preempted = True
                continue
            take(seq, k)
        for seq in list(self.running):  # 2. prefill chunks of admitted sequences
            if not (budget and batch):
                break
            if seq.seq_id not in taken and seq.slot is not None and not seq.is_decoding:
                take(seq)
        while self.waiting and budget and batch and not preempted and len(self.running) < self.max_running:
            seq = self.waiting[0]  # 3. admissions, strict FCFS
            reason = self._admit(seq)
            if reason is not None:
                seq.wait_reason = reason
                break
            self.waiting.pop(0)
            bisect.insort(self.running, seq, key=_seq_key)
            seq.request.status = RequestStatus.RUNNING
            take(seq)
        return out

    def _grow(self, seq: Sequence, end: int, taken: set[int]) -> bool:
        """Blocks to cover positions < ``end``, preempting the newest unscheduled sequences if
        the pool is short. False if ``seq`` itself had to yield."""
        need = cdiv(end, self.bt) - len(seq.block_ids)
        shard = self.limits.slot_shard(seq.slot)
        while need > self.bm.available_blocks(shard):
            # Only a sequence on the same shard frees blocks ``seq`` can use.
            victim = next(
                s
                for s in reversed(self.running)
                if s.seq_id not in taken and self.limits.slot_shard(s.slot) == shard
            )
            self._preempt(victim)
            if victim is seq:
                return False
        if need > 0:
            seq.block_ids += self.bm.allocate(need, shard)
        return True

    def _drafts(self, seq: Sequence, budget: int) -> int:
        """How many of ``seq``'s pending MTP drafts its decode verifies: all that fit the token
        budget, the context limit (a draft's position must exist) and ``max_tokens`` (a step
        emits at most drafts + 1 tokens)."""
        req = seq.request
        if not _may_draft(req):
            return 0
        room = min(
            budget - seq.num_remaining,
            self.max_model_len - len(seq.tokens),
            req.sampling.max_tokens - len(req.output_token_ids) - 1,
        )
        return max(0, min(len(seq.drafts), room))

    def _chunk(self, seq: Sequence, budget: int, drafts: int = 0, want: int = 0) -> Scheduled:
        """The next work of ``seq``: up to ``budget`` tokens, cut at the hit point during a
        replay and at the first snapshot boundary that needs a snapshot; a decode carries its
        first ``drafts`` pending drafts (verified after its known tokens) and asks for ``want``
        new ones."""
        s = seq.num_computed
        end = min(len(seq.tokens), s + budget)
        if s < seq.cached_until:
            end = min(end, seq.cached_until)
        snap = None
        if self.interval:
            # A bounded replay's windows are exact only from state_start + window·num_layers:
            # no snapshot before that.
            first = seq.state_start + self.replay_tokens if seq.state_start else 0
            b = (max(s, first - 1) // self.interval + 1) * self.interval
            while b <= end:
                if self._wants_snapshot(seq, b):
                    snap = self.bm.alloc_snapshot()
                    if snap is not None:
                        end = b
                    break
                b += self.interval
        req = seq.request
        replay = s < seq.cached_until
        sample = end == len(seq.tokens)
        drafts = seq.drafts[:drafts] if sample else []
        work = SeqWork(
            seq_id=seq.seq_id,
            slot=seq.slot,
            block_ids=list(seq.block_ids),
            tokens=seq.tokens[s:end] + drafts,
            start=s,
            sample=sample,
            sampling=req.sampling,
            sample_index=len(req.output_token_ids),
            seed=req.seed,
            prompt_len=seq.prompt_len,
            state_start=seq.state_start if replay else 0,
            cached_until=seq.cached_until if replay else 0,
            restore_snapshot=seq.restore_snapshot if seq.fresh else None,
            save_snapshot=snap,
            fresh=seq.fresh,
            prior_tokens=seq.tokens[:s] if seq.fresh and s > 0 else None,
            num_drafts=len(drafts),
            # drafts past max_tokens would never be emitted (this step emits at least one token)
            want_drafts=min(want, max(0, req.sampling.max_tokens - len(req.output_token_ids) - 2))
            if sample and _may_draft(req)
            else 0,
            next_token=None if sample else seq.tokens[end],
            constraint=req.constraint if sample else None,
        )
        return Scheduled(seq, work, end, snap, seq.is_decoding)

    def _key(self, seq: Sequence, index: int) -> bytes:
        return extend_keys(seq.block_keys, seq.tokens, self.bt, index + 1)[index]

    def _wants_snapshot(self, seq: Sequence, boundary: int) -> bool:
        e = self.cache.get(self._key(seq, boundary // self.bt - 1))
        return e is None or e.snapshot is None

    # ------------------------------------------------------------------ admission and hits
    def _admit(self, seq: Sequence) -> str | None:
        """Take a slot and blocks for ``seq`` and set its resume point; or say why it waits."""
        n = len(seq.tokens)
        total = cdiv(min(n + 1, self.max_model_len), self.bt)  # the prompt + the first decode position
        hits: list[CacheEntry] = []
        # prompt logprobs need every prompt position's logits: no hit until they are all computed
        scoring = seq.request.sampling.prompt_logprobs is not None and not seq.request.output_token_ids
        if self.cache is not None and not scoring:
            k = (n - 1) // self.bt  # never the block holding the last token
            hits = self.cache.match(extend_keys(seq.block_keys, seq.tokens, self.bt, k)[:k])
        shard, hits, reason = self._place(hits, total)
        if reason is not None:
            return reason
        seq.block_ids = self.bm.share(hits) + self.bm.allocate(total - len(hits), shard)
        seq.slot = self.bm.alloc_slot(shard)
        hit = len(hits) * self.bt
        seq.num_computed, seq.state_start, seq.restore_snapshot = self._resume_point(hits, hit)
        seq.cached_until, seq.num_registered, seq.fresh, seq.wait_reason = hit, len(hits), True, ""
        if self.cache is not None:
            c = self.cache.counters
            c.queries += 1
            c.query_tokens += n
            c.hits += bool(hits)
            c.hit_tokens += hit
            c.hit_blocks += len(hits)
            c.recompute_tokens += hit - seq.num_computed
            c.restored_snapshots += seq.restore_snapshot is not None
        return None

    def _place(self, hits: list[CacheEntry], total: int) -> tuple[int, list[CacheEntry], str | None]:
        """The sequence shard to admit a request on, the cache hits it can use there, and why
        it must wait (None if it fits). A shard can only use the hits whose blocks live on it,
        from block 0 on; among the shards that fit, the longest usable hit wins, then the most
        available blocks (spreading load). With one shard: shard 0 and every hit."""
        best, why = None, None
        for k in range(self.limits.num_seq_shards):
            usable = list(itertools.takewhile(lambda e, k=k: self.limits.block_shard(e.block_id) == k, hits))
            reserved = sum(1 for e in usable if self.bm.refcount(e.block_id) == 0)
            reason = self.bm.shortfall(total - len(usable), reserved, k)
            if reason is not None:
                why = why or reason
                continue
            rank = (len(usable), self.bm.available_blocks(k) - reserved)
            if best is None or rank > best[0]:
                best = (rank, k, usable)
        return (best[1], best[2], None) if best else (0, [], why)

    def _resume_point(self, hits: list[CacheEntry], hit: int) -> tuple[int, int, int | None]:
        """(first position to feed, state_start, snapshot to restore) for a hit of ``hit`` tokens."""
        if hit == 0:
            return 0, 0, None
        bounded = max(0, hit - self.replay_tokens) // self.bt * self.bt  # recompute's R
        if self.strategy == "recompute" or not self.interval:
            return bounded, bounded, None
        for i in range(len(hits) - 1, -1, -1):
            if hits[i].snapshot is not None:
                at = (i + 1) * self.bt
                return (bounded, bounded, None) if bounded > at else (at, 0, hits[i].snapshot)
        return bounded, bounded, None

    # ------------------------------------------------------------------ after the runner ran
    def commit(self, scheduled: list[Scheduled]) -> None:
        """Advance each scheduled sequence; publish its newly complete blocks (and snapshots)."""
        for sc in scheduled:
            seq = sc.seq
            seq.num_computed = sc.end
            seq.fresh, seq.restore_snapshot = False, None
            if self.cache is None:
                continue
            full = seq.num_computed // self.bt
            if full > seq.num_registered:
                extend_keys(seq.block_keys, seq.tokens, self.bt, full)
                for i in range(seq.num_registered, full):
                    # None if another sequence published the same content first: this block then
                    # stays private to ``seq`` and is freed with it.
                    self.cache.insert(seq.block_keys[i], seq.block_ids[i], i)
                seq.num_registered = full
            if sc.snapshot is not None:
                entry = self.cache.get(seq.block_keys[sc.end // self.bt - 1])
                self.cache.counters.saved_snapshots += self.bm.attach_snapshot(sc.snapshot, entry)


def _may_draft(req) -> bool:
    """MTP drafts for this request: not under a grammar (a draft's mask would need the grammar
    advanced by unverified tokens) nor with prompt logprobs (its chunks take the plain path)."""
    return req.constraint is None and req.sampling.prompt_logprobs is None
