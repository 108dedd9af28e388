"""A deterministic ``ModelRunner`` that enforces the runner contract (runner_api.py).

The fake "model": the token sampled after position p is a hash of the *entire* history
``tokens[0..p]`` (greedy), or of (history, seed, sample_index) when temperature > 0. The
history is not taken from the plan: it is reconstructed from the fake's own state, which
mirrors the real one:

* ``slots[s]``: the history the slot's windows/tails stand for, and from which position
  that window is exact (a recompute replay from R is exact only from R + window·num_layers);
* ``blocks[b]``: the history up to the last position written into block b (its compressed
  entries summarise everything before them, as in the real model);
* ``snapshots[n]``: the history at the boundary where the snapshot was saved.

So a plan that restores the wrong snapshot, reads a block written for another history,
or continues a slot from the wrong position produces different tokens, and the test
comparing with a cold run fails. On top of that, contract violations raise
``ContractError`` at once: a chunk that does not continue its slot, a fresh slot starting
mid-sequence without ``state_start``, a snapshot restored at another position or
another history, a snapshot saved off a boundary (or off the strategy's grid), a write into a
block that is shared or published in the prefix cache (checked against the engine's block
manager), a rewrite below ``cached_until``, a read of a block that does not hold this
history, a sample or snapshot from a window rebuilt by a replay shorter than window·num_layers,
and a step over the token budget or batch limit.

MTP speculative decoding (``make_engine(speculative_tokens=k)``): a work's trailing
``num_drafts`` tokens are drafts. They must be covered by blocks and never enter the fake's
state; each is verified against the fake token at its place (for sampled requests the draw
with the same seed and sample index, as the real runner couples them), the accepted ones and
one more are emitted, and the fake proposes ``want_drafts`` new ones: the true continuation,
wrong wherever ``draft_is_wrong`` says, so acceptance lengths of every size occur.
"""

from __future__ import annotations

import dataclasses

from dsv4_jax.engine.runner_api import RunnerLimits, SampleOut, SeqWork, StepPlan
from dsv4_jax.intmath import cdiv


class ContractError(AssertionError):
    pass


def require(cond, msg):
    if not cond:
        raise ContractError(msg)


def fake_token(history, vocab, temperature=0.0, seed=0, sample_index=0) -> int:
    key = tuple(history) if temperature == 0 else (tuple(history), seed, sample_index)
    return hash(key) % vocab


def fake_logprobs(token, n, vocab) -> tuple[float, list[tuple[int, float]]]:
    """(chosen logprob, top ``n`` alternatives) the fake reports for ``token``, as the real
    runner shapes them; they depend on the token, so a logprob shown against the wrong token
    is caught."""
    lp = -(1 + token % 7) / 8
    return lp, [((token + k) % vocab, lp - k) for k in range(n)]


def reference_generate(prompt, max_tokens, vocab, eos=None, temperature=0.0, seed=0):
    """The fake model run alone, without any state: what every engine run must reproduce."""
    hist, out = list(prompt), []
    for i in range(max_tokens):
        t = fake_token(hist, vocab, temperature, seed, i)
        out.append(t)
        hist.append(t)
        if t == eos:
            break
    return out


def draft_is_wrong(seq_id: int, position: int) -> bool:
    """The fake drafter's mistakes: about a third of its drafts, by a fixed hash."""
    return hash((seq_id, position, 7919)) % 3 == 0  # ints only: no per-process hash seed


def make_limits(**kw) -> RunnerLimits:
    base = {
        "num_slots": 4,
        "num_blocks": 64,
        "block_tokens": 16,
        "max_blocks_per_seq": 32,
        "num_snapshots": 32,
        "max_batch": 4,
        "max_tokens_per_step": 64,
        "window": 16,
        "num_layers": 3,
        "vocab_size": 1000,
        "eos_token_id": 1,
        "bytes_per_block": 1000,
        "bytes_per_slot": 5000,
    }
    base.update(kw)
    return RunnerLimits(**base)


@dataclasses.dataclass
class SlotState:
    seq_id: int
    hist: list[int]
    exact_from: int  # samples and snapshots need len(hist) >= exact_from


class FakeRunner:
    def __init__(self, limits: RunnerLimits | None = None, snapshot_interval: int | None = None, **kw):
        self.limits = limits or make_limits(**kw)
        self.snapshot_interval = snapshot_interval  # if set, snapshots must sit on this grid
        self.bm = None  # the engine's BlockManager, for the shared-block write check
        self.slots: dict[int, SlotState] = {}
        self.blocks: dict[int, tuple[int, ...]] = {}
        self.snapshots: dict[int, tuple[int, ...]] = {}
        self.plans: list[StepPlan] = []
        self.saved: list[tuple[int, int]] = []  # (seq_id, boundary) of every snapshot save
        self.restored: list[tuple[int, int]] = []  # (seq_id, position)
        self.replays: list[tuple[int, int, int]] = []  # (seq_id, state_start, cached_until)

    def bind(self, engine):
        self.bm = engine.block_manager
        return self

    # ------------------------------------------------------------------ the step
    def execute(self, plan: StepPlan) -> dict[int, SampleOut]:
        L = self.limits
        works = plan.works
        require(0 < len(works) <= L.max_batch, f"{len(works)} works, max_batch={L.max_batch}")
        n = sum(len(w.tokens) for w in works)
        require(n <= L.max_tokens_per_step, f"{n} tokens in a step, budget {L.max_tokens_per_step}")
        require(len({w.seq_id for w in works}) == len(works), "a sequence twice in one step")
        require(len({w.slot for w in works}) == len(works), "a slot twice in one step")
        self.plans.append(plan)
        out = {}
        for w in works:
            toks = self._run(w)
            if toks is not None:
                n = w.sampling.logprobs
                outs = []
                for tok in toks[0]:
                    lp, top = fake_logprobs(tok, n, L.vocab_size) if n is not None else (None, None)
                    outs.append(SampleOut(tok, logprob=lp, top_logprobs=top))
                out[w.seq_id] = dataclasses.replace(outs[-1], accepted=outs[:-1], drafts=toks[1])
        return out

    def _run(self, w: SeqWork) -> tuple[list[int], list[int]] | None:
        """The work's emitted tokens and its new drafts, or None when it does not sample."""
        L, bt = self.limits, self.limits.block_tokens
        end = w.start + w.num_known  # drafts never enter the state
        drafts = w.tokens[w.num_known :]
        require(w.num_known >= 1, "a work without a known token")
        require(
            len(drafts) <= L.max_draft_tokens, f"{len(drafts)} drafts, runner verifies {L.max_draft_tokens}"
        )
        require(not drafts or w.sample, "drafts on a work that does not sample")
        require(w.want_drafts <= L.max_draft_tokens and (w.sample or not w.want_drafts), "bad want_drafts")
        if L.max_draft_tokens and not w.sample:
            require(
                w.next_token is not None, "a chunk that does not sample must name its next token (MTP input)"
            )
        require(len(w.block_ids) <= L.max_blocks_per_seq, "more blocks than max_blocks_per_seq")
        require(
            end + len(drafts) <= len(w.block_ids) * bt,
            f"positions up to {end + len(drafts)} but only {len(w.block_ids)} blocks",
        )
        require(0 <= w.slot < L.num_slots, f"slot {w.slot} out of range")
        off = [b for b in w.block_ids if L.block_shard(b) != L.slot_shard(w.slot)]
        require(
            not off, f"seq {w.seq_id}: slot {w.slot} is on shard {L.slot_shard(w.slot)} but uses blocks {off}"
        )
        require(w.state_start <= w.start, "state_start after start")
        if w.cached_until:
            require(end <= w.cached_until, "a replay chunk straddles cached_until")
        if w.fresh:
            st = self._fresh(w)
        else:
            st = self.slots.get(w.slot)
            require(st is not None and st.seq_id == w.seq_id, f"slot {w.slot} does not hold seq {w.seq_id}")
            require(w.restore_snapshot is None, "restore on a non-fresh work")
            require(
                len(st.hist) == w.start, f"seq {w.seq_id}: slot at {len(st.hist)}, work starts at {w.start}"
            )
        self._check_reads(w.block_ids, st.hist, w.start)
        st.hist.extend(w.tokens[: w.num_known])
        self._write(w, st.hist, end)
        if w.save_snapshot is not None:
            require(end % bt == 0, f"snapshot at {end}, not a block boundary")
            if self.snapshot_interval:
                require(
                    end % self.snapshot_interval == 0,
                    f"snapshot at {end}, off the {self.snapshot_interval} grid",
                )
            require(end >= st.exact_from, f"snapshot at {end} of a window exact only from {st.exact_from}")
            self.snapshots[w.save_snapshot] = tuple(st.hist)
            self.saved.append((w.seq_id, end))
        if not w.sample:
            return None
        require(
            end >= st.exact_from,
            f"sample at {end}: replay from {w.state_start or '?'} shorter than window·num_layers",
        )
        sp = w.sampling
        hist, emitted = list(st.hist), []
        for j in range(
            len(drafts) + 1
        ):  # verify: the fake's token at each place, drafts accepted while equal
            emitted.append(fake_token(hist, L.vocab_size, sp.temperature, w.seed, w.sample_index + j))
            hist.append(emitted[-1])
            if j == len(drafts) or emitted[-1] != drafts[j]:
                break
        new = []
        for j in range(w.want_drafts):
            true = fake_token(hist, L.vocab_size, sp.temperature, w.seed, w.sample_index + len(emitted) + j)
            hist.append(true)
            new.append((true + 1) % L.vocab_size if draft_is_wrong(w.seq_id, len(hist) - 1) else true)
        return emitted, new

    def _fresh(self, w: SeqWork) -> SlotState:
        L, bt = self.limits, self.limits.block_tokens
        if w.start:
            require(w.prior_tokens is not None and len(w.prior_tokens) == w.start, "prior_tokens missing")
        if w.restore_snapshot is not None:
            snap = self.snapshots.get(w.restore_snapshot)
            require(snap is not None, f"restore of snapshot {w.restore_snapshot}, never saved")
            if self.bm is not None:
                require(w.restore_snapshot not in self.bm._free_snapshots, "restore of a freed snapshot")
            require(len(snap) == w.start, f"snapshot at {len(snap)} restored for a work at {w.start}")
            require(w.state_start == 0, "state_start with a restored snapshot")
            st = SlotState(w.seq_id, list(snap), 0)
            self.restored.append((w.seq_id, w.start))
        elif w.start == 0:
            st = SlotState(w.seq_id, [], 0)
        else:  # recompute replay: history before state_start only via the cached compressed entries
            require(
                w.state_start == w.start, f"fresh slot starts at {w.start} without a snapshot or state_start"
            )
            require(w.start % bt == 0, "state_start off a block boundary")
            prev = self.blocks.get(w.block_ids[w.start // bt - 1])
            require(
                prev is not None and len(prev) == w.start, f"no complete block before state_start {w.start}"
            )
            st = SlotState(w.seq_id, list(prev), w.start + L.window * L.num_layers)
            self.replays.append((w.seq_id, w.state_start, w.cached_until))
        self.slots[w.slot] = st
        return st

    def _check_reads(self, block_ids, hist, upto):
        """Every block below ``upto`` must hold exactly this history (its compressed entries
        are read by every later position)."""
        bt = self.limits.block_tokens
        for i in range(cdiv(upto, bt)):
            e = min((i + 1) * bt, upto)
            got = self.blocks.get(block_ids[i])
            require(
                got is not None and len(got) >= e and got[:e] == tuple(hist[:e]),
                f"block {block_ids[i]} (index {i}) does not hold this history",
            )

    def _write(self, w: SeqWork, hist, end):
        bt = self.limits.block_tokens
        lo = max(w.start, w.cached_until)
        for i in range(w.start // bt, cdiv(end, bt)):
            a, b = max(i * bt, w.start), min((i + 1) * bt, end)
            bid = w.block_ids[i]
            if b <= lo:  # below cached_until: read the cached entries, write nothing
                got = self.blocks.get(bid)
                require(
                    got is not None and len(got) >= b and got[:b] == tuple(hist[:b]),
                    f"replay over block {bid}: cached entries of another history",
                )
                continue
            require(a >= lo, "write below cached_until")
            if self.bm is not None:
                require(
                    self.bm.is_exclusive(bid),
                    f"write into shared or cached block {bid} (refcount {self.bm.refcount(bid)})",
                )
            self.blocks[bid] = tuple(hist[:b])


# ----------------------------------------------------------------------------- engine helpers
def make_engine(
    strategy="recompute",
    *,
    cache=True,
    interval=None,
    tokenizer=None,
    max_model_len=None,
    speculative_tokens=0,
    **limit_kw,
):
    """An LLMEngine over a FakeRunner bound to its block manager (limits: ``make_limits``);
    ``speculative_tokens``: MTP drafts per step at every load."""
    from dsv4_jax.engine.llm_engine import LLMEngine
    from dsv4_jax.engine.profiles import EngineConfig

    runner = FakeRunner(**limit_kw, max_draft_tokens=speculative_tokens)
    lim = runner.limits
    cfg = EngineConfig(
        block_tokens=lim.block_tokens,
        swa_strategy=strategy,
        enable_prefix_cache=cache,
        checkpoint_interval=interval or 2 * lim.block_tokens,
        num_snapshots=lim.num_snapshots or (0 if strategy == "recompute" else 1),
        speculative_tokens=speculative_tokens,
        spec_off_batch=1 << 20,
    )
    engine = LLMEngine(runner, cfg, tokenizer, max_model_len=max_model_len)
    runner.bind(engine)
    runner.snapshot_interval = cfg.snapshot_interval
    return engine, runner


def drain(engine, max_steps=5000):
    """Step until idle; returns {request_id: new tokens seen in the deltas, concatenated}."""
    seen: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return seen
        for o in engine.step():
            seen.setdefault(o.request_id, []).extend(o.token_ids)
    raise AssertionError(f"not idle after {max_steps} steps")


def outputs(engine, rids):
    return [engine.get_request(r).output_token_ids for r in rids]


def guard_request_writes(monkeypatch):
    """Make any write into a ``Request`` or its ``RequestMetrics`` from outside ``dsv4_jax.engine``
    raise: callers (``LLM``, the server) must only read the engine's outputs."""
    import sys

    from dsv4_jax.engine.request import Request, RequestMetrics

    def guarded(self, name, value):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if not caller.startswith("dsv4_jax.engine."):
            raise AssertionError(f"{caller} wrote {type(self).__name__}.{name}")
        object.__setattr__(self, name, value)

    for cls in (Request, RequestMetrics):
        monkeypatch.setattr(cls, "__setattr__", guarded)
