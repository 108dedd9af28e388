"""Pools split over sequence shards (``RunnerLimits.num_seq_shards``), host side only.

A data-parallel runner keeps each sequence's pools on its slot's shard, so the block manager
must hand a sequence only blocks of that shard, evict cache entries per shard, place a prefix
hit on the shard that holds it, and refuse what one shard cannot hold. ``FakeRunner`` checks
the shard of every block of every work (a ``ContractError`` otherwise), so the engine runs
below would fail on any cross-shard block.
"""

import random

import pytest
from fake_runner import drain, make_engine, make_limits, outputs, reference_generate

from dsv4_jax.engine.block_manager import BlockManager
from dsv4_jax.engine.prefix_cache import PrefixCache
from dsv4_jax.engine.sampling_params import SamplingParams

V = 1000
GREEDY = dict(temperature=0.0, ignore_eos=True)


def prompt(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(2, V) for _ in range(n)]


def test_limits_must_split_evenly():
    with pytest.raises(ValueError, match="split evenly over num_seq_shards=3"):
        make_limits(num_slots=4, num_blocks=12, num_seq_shards=3)
    lim = make_limits(num_slots=4, num_blocks=12, num_seq_shards=2)
    assert (lim.slot_shard(1), lim.slot_shard(2), lim.block_shard(5), lim.block_shard(6)) == (0, 1, 0, 1)


def test_allocation_and_eviction_stay_on_the_asked_shard():
    lim = make_limits(num_slots=4, num_blocks=8, num_seq_shards=2, num_snapshots=2)
    cache = PrefixCache(lim.block_shard)
    bm = BlockManager(lim, cache)
    assert bm.alloc_slot(1) == 2 and bm.alloc_slot(0) == 0
    a = bm.allocate(4, shard=0)
    assert a == [0, 1, 2, 3] and bm.available_blocks(0) == 0 and bm.available_blocks(1) == 4
    with pytest.raises(RuntimeError, match="on shard 0"):
        bm.allocate(1, shard=0)
    entries = [cache.insert(bytes([i]), b, i) for i, b in enumerate(a)]
    sid = bm.alloc_snapshot()
    bm.attach_snapshot(sid, entries[1])
    bm.release(a)  # all four become evictable cache entries of shard 0
    assert cache.num_evictable_in(0) == 4 and cache.num_evictable_in(1) == 0
    assert bm.allocate(4, shard=1) == [4, 5, 6, 7]  # shard 1's free list; shard 0's cache untouched
    assert len(cache) == 4
    assert bm.allocate(1, shard=0) == [3]  # the LRU of shard 0: the chain's tail first
    assert bm.shortfall(4, 0, shard=1).endswith("0 blocks = 0 B available on sequence shard 1")
    bm.release([3, 4, 5, 6, 7])
    bm.free_slot(0)
    bm.free_slot(2)
    assert bm.drop_cached() == 3 and bm.leaks() == []


def test_cache_evicts_least_recently_released_over_all_shards_when_no_shard_is_asked():
    lim = make_limits(num_slots=2, num_blocks=4, num_seq_shards=2)
    cache = PrefixCache(lim.block_shard)
    for k, b in enumerate((3, 0, 2)):
        cache.insert(bytes([k]), b, 0)
        cache.release(b)
    assert [cache.evict().block_id for _ in range(3)] == [3, 0, 2]


def test_a_prefix_hit_is_taken_on_the_shard_that_holds_it():
    engine, runner = make_engine("recompute", num_slots=4, num_blocks=32, max_batch=2, num_seq_shards=2)
    base = prompt(70, 1)
    other = engine.add_request(prompt(40, 9), SamplingParams(max_tokens=4, **GREEDY))  # shard 0 (tie)
    first = engine.add_request(base, SamplingParams(max_tokens=4, **GREEDY))  # shard 1: more blocks free
    drain(engine)
    slots = {w.seq_id: w.slot for p in runner.plans for w in p.works}
    assert [engine.limits.slot_shard(slots[engine._seqs[r].seq_id]) for r in (other, first)] == [0, 1]
    # Both shards now have equal room; only the cached blocks of ``base`` make shard 1 the pick.
    engine.add_request(base[:50] + prompt(20, 2), SamplingParams(max_tokens=4, **GREEDY))
    drain(engine)
    assert engine.limits.slot_shard(runner.plans[-1].works[0].slot) == 1
    assert engine.stats()["prefix_cache_hit_blocks"] == 3  # 48 of the 50 shared tokens
    assert outputs(engine, [first]) == [reference_generate(base, 4, V, eos=None)]
    assert engine.block_manager.leaks() == []


def test_requests_beyond_one_shard_are_refused_naming_the_shards():
    engine, _ = make_engine("recompute", num_slots=2, num_blocks=8, max_blocks_per_seq=8, num_seq_shards=2)
    from dsv4_jax.engine.llm_engine import RequestRefused

    with pytest.raises(RequestRefused, match="one of 2 sequence shards, each holding 4 blocks"):
        engine.add_request(prompt(60, 3), SamplingParams(max_tokens=20))  # 80 tokens = 5 blocks of 16


@pytest.mark.parametrize("strategy", ["recompute", "checkpoint", "full"])
def test_random_stress_on_four_shards(strategy):
    """Shared prefixes, preemption and cancellations with the pool split four ways: every
    output equals the reference, the fake runner saw no cross-shard block, nothing leaks."""
    rng = random.Random(strategy)
    engine, _ = make_engine(
        strategy,
        num_blocks=40,
        num_slots=8,
        max_batch=4,
        num_snapshots=8,
        max_tokens_per_step=48,
        num_seq_shards=4,
        interval=32,
    )
    bases = [prompt(100, 200 + i) for i in range(3)]
    live, aborted = {}, set()
    for step in range(2000):
        if step < 250 and rng.random() < 0.3:
            p = rng.choice(bases)[: rng.randrange(1, 100)] + prompt(rng.randrange(0, 20), rng.random())
            sp = SamplingParams(
                max_tokens=rng.randrange(1, 30),
                temperature=rng.choice([0.0, 0.7]),
                seed=rng.randrange(100),
                ignore_eos=True,
            )
            live[engine.add_request(p, sp)] = (p, sp)
        if live and rng.random() < 0.04:
            rid = rng.choice(sorted(live))
            if engine.abort(rid):
                aborted.add(rid)
        engine.step()
        if step >= 250 and not engine.has_unfinished():
            break
    assert not engine.has_unfinished()
    for rid, (p, sp) in live.items():
        if rid in aborted:
            continue
        want = reference_generate(p, sp.max_tokens, V, eos=None, temperature=sp.temperature, seed=sp.seed)
        assert engine.get_request(rid).output_token_ids == want, rid
    st = engine.stats()
    assert st["prefix_cache_hits"] > 5 and st["preemptions"] > 0
    assert engine.block_manager.leaks() == []
