"""Prefix caching under the three SWA strategies (SERVING.md §1.6), content addressing, and
mutation tests showing that the FakeRunner rejects the classic wrong plans.

Limits (fake_runner.make_limits): block_tokens 16, window 16, num_layers 3, so a recompute
replay is window·num_layers = 48 tokens.
"""

import random

import pytest
from fake_runner import ContractError, make_engine, reference_generate

from dsv4_jax import SamplingParams
from dsv4_jax.engine import prefix_cache
from dsv4_jax.engine.prefix_cache import ROOT_KEY, chain_key, extend_keys
from dsv4_jax.engine.scheduler import Scheduler

V = 1000
SP = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def toks(n, seed):
    r = random.Random(seed)
    return [r.randrange(2, V) for _ in range(n)]


def run(engine, p, sp=SP):
    rid = engine.add_request(p, sp)
    while engine.has_unfinished():
        engine.step()
    return engine.get_request(rid).output_token_ids


def cold(p, sp=SP):
    engine, _ = make_engine("recompute", cache=False)
    return run(engine, p, sp)


# ----------------------------------------------------------------------------- keys
def test_chain_keys_cover_the_whole_history():
    x, y, z = toks(16, 1), toks(16, 2), toks(16, 3)
    kx, ky = chain_key(ROOT_KEY, x), chain_key(ROOT_KEY, y)
    assert chain_key(kx, z) != chain_key(ky, z)  # same last block, different history
    assert chain_key(kx, z) == chain_key(chain_key(ROOT_KEY, list(x)), tuple(z))
    seq = x + y + z + toks(5, 4)
    keys = extend_keys([], seq, 16, 1)
    extend_keys(keys, seq, 16, 3)  # incremental == all at once
    assert keys == extend_keys([], seq, 16, 3) == [kx, chain_key(kx, y), chain_key(chain_key(kx, y), z)]
    with pytest.raises(ValueError, match="not complete"):
        extend_keys([], seq, 16, 4)


def test_two_histories_with_an_identical_last_block_never_share():
    x, y, z = toks(16, 1), toks(16, 2), toks(16, 3)
    engine, _ = make_engine("full")
    run(engine, x + z + toks(20, 4))
    b = y + z + toks(20, 5)
    assert run(engine, b) == reference_generate(b, 6, V) == cold(b)
    assert engine.stats()["prefix_cache_hit_tokens"] == 0


# ----------------------------------------------------------------------------- the three strategies
# (prompt A, prompt B sharing `shared` tokens with A) → hit H = largest block boundary <= shared
CASES = {
    "mid-block hit, H=96 > window·layers": (150, 100, 96),
    "long hit, H=240 (5 replay lengths)": (300, 250, 240),
    "short hit, H=32 < window·layers": (60, 40, 32),
}
# strategy → {case: (restored snapshot position or None, replay start or None, recompute tokens)}
EXPECT = {
    "full": {96: (96, None, 0), 240: (240, None, 0), 32: (32, None, 0)},
    "checkpoint": {96: (64, None, 32), 240: (192, None, 48), 32: (None, None, 32)},  # interval 64
    "recompute": {96: (None, 48, 48), 240: (None, 192, 48), 32: (None, None, 32)},  # R = H − 48, or 0
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("strategy", ["full", "checkpoint", "recompute"])
def test_prefix_hit_gives_the_cold_run_tokens(strategy, case):
    n_a, shared, hit = CASES[case]
    base = toks(n_a, n_a)
    a, b = base, base[:shared] + toks(n_a - shared + 7, 99)
    engine, runner = make_engine(strategy, interval=64)
    assert run(engine, a) == reference_generate(a, 6, V)
    before = engine.stats()
    assert run(engine, b) == reference_generate(b, 6, V) == cold(b)
    st = engine.stats()
    assert st["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"] == hit
    restored, replay_from, recompute = EXPECT[strategy][hit]
    b_seq = engine._seqs[str(1)].seq_id
    assert st["prefix_cache_recompute_tokens"] == recompute
    assert [p for s, p in runner.restored if s == b_seq] == ([restored] if restored else [])
    assert [(r, c) for s, r, c in runner.replays if s == b_seq] == (
        [(replay_from, hit)] if replay_from else []
    )
    first = next(w for p in runner.plans for w in p.works if w.seq_id == b_seq)
    assert first.fresh and (first.prior_tokens or []) == b[: first.start]
    assert engine.block_manager.leaks() == []


def test_hit_on_the_whole_prompt_recomputes_the_last_block_and_multi_turn_hits_outputs():
    engine, _ = make_engine("full")
    a = toks(150, 7)
    out_a = run(engine, a, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    assert run(engine, a) == reference_generate(a, 6, V)
    assert engine.stats()["prefix_cache_hit_tokens"] == 144  # (150 − 1) // 16 blocks: the last token is fed
    turn2 = a + out_a + toks(10, 8)  # the next turn: history + reply + new message
    h0 = engine.stats()["prefix_cache_hit_tokens"]
    assert run(engine, turn2) == reference_generate(turn2, 6, V)
    assert engine.stats()["prefix_cache_hit_tokens"] - h0 == 176  # blocks written while decoding hit too


def test_full_saves_a_snapshot_at_every_block_end_and_checkpoint_on_its_grid():
    for strategy, interval, want in (("full", None, [16, 32, 48, 64]), ("checkpoint", 32, [32, 64])):
        engine, runner = make_engine(strategy, interval=interval)
        run(
            engine, toks(40, 1), SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
        )  # fed up to 69
        assert [p for _, p in runner.saved] == want
        for plan in runner.plans:  # a prefill chunk ends where its snapshot is saved
            for w in plan.works:
                if w.save_snapshot is not None:
                    assert (w.start + len(w.tokens)) in want


def test_without_a_snapshot_the_hit_falls_back_to_an_exact_bounded_replay():
    # Two snapshots only: the second prompt's saves take them back from the first's entries,
    # so a later hit on the first prompt finds none near H and replays window·layers instead.
    engine, runner = make_engine("checkpoint", interval=32, num_snapshots=2)
    a, c = toks(200, 1), toks(200, 2)
    run(engine, a)
    run(engine, c)
    b = a[:180] + toks(9, 3)
    assert run(engine, b) == reference_generate(b, 6, V)
    b_seq = engine._seqs["2"].seq_id
    assert [(r, h) for s, r, h in runner.replays if s == b_seq] == [(176 - 48, 176)]
    assert engine.stats()["prefix_cache_evicted_snapshots"] > 0


def test_evictable_blocks_keep_serving_hits_and_chains_lose_their_tail_first():
    engine, _ = make_engine("recompute", num_blocks=16)
    a = toks(160, 1)
    run(engine, a)  # 10 complete blocks cached
    assert engine.stats()["blocks_cached"] == 10 and engine.stats()["blocks_available"] == 16
    run(engine, toks(120, 2), SamplingParams(max_tokens=2, temperature=0))  # needs 8 blocks: evicts 2 of a's
    b = a[:150] + toks(3, 4)
    h0 = engine.stats()["prefix_cache_hit_tokens"]
    assert run(engine, b) == reference_generate(b, 6, V)
    assert engine.stats()["prefix_cache_hit_tokens"] - h0 == 16 * 8  # a's head survived, its tail went


# ----------------------------------------------------------------------------- the fake rejects wrong plans
@pytest.mark.parametrize("strategy", ["full", "recompute"])
def test_fake_catches_keys_that_do_not_cover_the_history(monkeypatch, strategy):
    # The ATOM bug: a block keyed by its own tokens only. B's first block equals A's second.
    monkeypatch.setattr(prefix_cache, "chain_key", lambda prev, blk: bytes(str(list(blk)), "ascii"))
    engine, _ = make_engine(strategy)
    x, z = toks(16, 1), toks(16, 2)
    run(engine, x + z + toks(20, 3))
    with pytest.raises(
        ContractError,
        match="does not hold this history|of another history|snapshot at 32 restored for a work at 16",
    ):
        run(engine, z + toks(20, 4))


def test_fake_catches_a_one_window_replay(monkeypatch):
    engine, _ = make_engine("recompute")
    a = toks(150, 1)
    run(engine, a)
    engine.scheduler.replay_tokens = 16  # vLLM's approximate "bounded replay" of one window
    with pytest.raises(ContractError, match="shorter than window·num_layers"):
        run(engine, a[:100] + toks(5, 2))


def test_fake_catches_a_replay_that_rewrites_shared_blocks(monkeypatch):
    orig = Scheduler._chunk

    def forget_cached_until(self, seq, budget, *drafts):
        sc = orig(self, seq, budget, *drafts)
        sc.work.cached_until = 0
        return sc

    monkeypatch.setattr(Scheduler, "_chunk", forget_cached_until)
    engine, _ = make_engine("recompute")
    a = toks(150, 1)
    run(engine, a)
    with pytest.raises(ContractError, match="write into shared or cached block"):
        run(engine, a[:100] + toks(5, 2))


def test_fake_catches_a_snapshot_taken_at_another_history(monkeypatch):
    orig = Scheduler._resume_point

    def wrong_snapshot(self, hits, hit):
        start, ss, snap = orig(self, hits, hit)
        if snap is not None:  # same boundary, other content
            other = [
                e.snapshot
                for e in self.cache._by_key.values()
                if e.index == start // self.bt - 1 and e.snapshot not in (None, snap)
            ]
            snap = other[0]
        return start, ss, snap

    monkeypatch.setattr(Scheduler, "_resume_point", wrong_snapshot)
    engine, _ = make_engine("full")
    a, a2 = toks(100, 1), toks(100, 2)
    run(engine, a)
    run(engine, a2)
    with pytest.raises(ContractError, match="does not hold this history"):
        run(engine, a[:70] + toks(5, 3))


def test_fake_catches_snapshots_off_the_strategy_grid():
    engine, runner = make_engine("checkpoint", interval=32)
    runner.snapshot_interval = 64  # the runner was told another interval than the scheduler uses
    with pytest.raises(ContractError, match="off the 64 grid"):
        run(engine, toks(40, 1))
