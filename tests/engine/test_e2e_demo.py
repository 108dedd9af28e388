"""End to end on the demo checkpoint: the host engine driving ``JaxModelRunner`` (float32).

Every engine run is compared with each request generated alone, greedily, by the state path
of the model (``state_utils.run``: one prefill, then one decode step at a time, in a fresh
state): the issue's correctness criteria.

Demo model: 3 layers, window 128, so a recompute replay is 384 tokens; blocks of 128 tokens.
One runner is built once and shared: each test puts a fresh ``LLMEngine`` on it, optionally
behind ``Limited`` (a view with a smaller block pool or budget), which is safe because an
engine only reads blocks and snapshots it wrote itself.
"""

import dataclasses
import functools
import random

import jax.numpy as jnp
import numpy as np
import pytest
from state_utils import run as state_run

from dsv4_jax import LLM, SamplingParams
from dsv4_jax import kv_cache as kvc
from dsv4_jax.checkpoint import load_checkpoint
from dsv4_jax.engine import EngineConfig, LLMEngine
from dsv4_jax.engine.model_runner import JaxModelRunner

DEMO = "checkpoints/demo"
BT = 128


@functools.cache
def demo():
    return load_checkpoint(DEMO, jnp.float32)


@functools.cache
def shared_runner():
    cfg, params = demo()
    return JaxModelRunner(cfg, params, num_slots=4, num_blocks=24, block_tokens=BT, max_blocks_per_seq=8,
                          num_snapshots=8, max_batch=4, max_tokens_per_step=256, kv_format="bf16",
                          eos_token_id=cfg.eos_token_id, dtype=jnp.float32)  # fmt: skip


class Limited:
    """The shared runner seen through smaller limits (a prefix of its blocks, a smaller budget)."""

    def __init__(self, runner, **limits):
        self.runner, self.limits = runner, dataclasses.replace(runner.limits, **limits)

    def execute(self, plan):
        return self.runner.execute(plan)

    def forget(self, seq_id):
        self.runner.forget(seq_id)


def engine(strategy="recompute", cache=True, **limits):
    r = Limited(shared_runner(), **limits)
    cfg = EngineConfig(block_tokens=BT, swa_strategy=strategy, checkpoint_interval=2 * BT, enable_prefix_cache=cache,
                       num_snapshots=r.limits.num_snapshots)  # fmt: skip
    return LLMEngine(r, cfg)


@functools.cache
def alone(prompt: tuple, n: int) -> list[int]:
    """Greedy tokens of ``prompt`` generated alone on the state path (no engine, no runner)."""
    cfg, params = demo()
    cc = kvc.CacheConfig(num_slots=1, num_blocks=8, max_blocks_per_seq=8, block_tokens=BT,
                         fmt=kvc.KVFormat.parse("bf16"), dtype=jnp.float32)  # fmt: skip
    state, blocks = kvc.init_state(cfg, cc), list(range(8))
    lg, state = state_run(cfg, cc, params, state, np.array(prompt), [len(prompt)], 0, blocks)
    out = [int(np.argmax(lg[-1]))]
    for k in range(n - 1):
        lg, state = state_run(
            cfg, cc, params, state, np.array(out[-1:]), [1], 0, blocks, start=len(prompt) + k
        )
        out.append(int(np.argmax(lg[-1])))
    return out


def toks(n, seed):
    r = random.Random(seed)
    return [r.randrange(2, 1000) for _ in range(n)]


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def drive(e, arrivals):
    """arrivals: {step: [(prompt, max_tokens)]}; returns {prompt tuple: tokens}."""
    rids = {}
    for step in range(10_000):
        for p, n in arrivals.get(step, []):
            rids[tuple(p)] = (e.add_request(p, greedy(n)), n)
        if step > max(arrivals) and not e.has_unfinished():
            break
        e.step()
    return {p: e.get_request(r).output_token_ids for p, (r, n) in rids.items()}


def test_mixed_lengths_arriving_at_different_steps_equal_each_request_alone():
    arrivals = {0: [(toks(7, 1), 20), (toks(150, 2), 8)], 2: [(toks(300, 3), 10)], 5: [(toks(40, 4), 25)]}
    used = shared_runner().ahead.used
    got = drive(engine(), arrivals)
    for step in arrivals.values():
        for p, n in step:
            assert got[tuple(p)] == alone(tuple(p), n)
    # the decode lookahead (engine/lookahead.py) answered most decodes while arrivals changed
    # the batch; outputs are still each request's alone
    assert shared_runner().ahead.used - used > 20


@pytest.mark.parametrize("strategy", ["full", "checkpoint", "recompute"])
def test_prefix_hits_equal_the_cold_run(strategy):
    a = toks(700, 10)
    long_hit = a[:650] + toks(30, 11)  # H = 640 > window·layers = 384, ending mid-block (650)
    short_hit = a[:200] + toks(20, 12)  # H = 128 < 384 (recompute replays from 0)
    e = engine(strategy)
    assert drive(e, {0: [(a, 4)]})[tuple(a)] == alone(tuple(a), 4)
    for b, hit in ((long_hit, 640), (short_hit, 128)):
        before = e.stats()["prefix_cache_hit_tokens"]
        assert drive(e, {0: [(b, 6)]})[tuple(b)] == alone(tuple(b), 6)
        assert e.stats()["prefix_cache_hit_tokens"] - before == hit
    assert e.block_manager.leaks() == []


def test_snapshots_saved_by_decodes_under_the_lookahead_serve_a_later_hit():
    # `full` saves a snapshot at every block end, here at position 255, reached while decoding
    # (a decode the lookahead computed); a later prompt extending those outputs restores it.
    a = toks(250, 30)
    e = engine("full")
    out = drive(e, {0: [(a, 12)]})[tuple(a)]
    assert out == alone(tuple(a), 12)
    b = a + out[:8] + toks(5, 31)  # 263 tokens: blocks 0-1 (256 positions) are cached with their snapshot
    before = e.stats()["prefix_cache_hit_tokens"]
    assert drive(e, {0: [(b, 6)]})[tuple(b)] == alone(tuple(b), 6)
    assert e.stats()["prefix_cache_hit_tokens"] - before == 256
    assert e.block_manager.leaks() == []


def test_preemption_and_resumption_do_not_change_outputs():
    ps = [toks(n, 20 + n) for n in (200, 230, 180)]
    e = engine("recompute", num_blocks=7, max_tokens_per_step=128)
    got = drive(e, {0: [(p, 90) for p in ps]})
    assert e.stats()["preemptions"] > 0
    for p in ps:
        assert got[tuple(p)] == alone(tuple(p), 90)
    assert e.block_manager.leaks() == []


def test_llm_api_on_the_demo_checkpoint_streams_what_it_generates():
    llm = LLM(DEMO, profile="chat", max_batch=4, num_blocks=32, num_snapshots=8, max_model_len=1024,
              max_tokens_per_step=256)  # fmt: skip
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outs = llm.generate(["Hello world", [0, 41, 609, 296]], sp)
    assert [len(o.token_ids) for o in outs] == [12, 12]
    streamed = list(llm.stream("Hello world", sp))
    assert [t for d in streamed for t in d.token_ids] == outs[0].token_ids
    assert "".join(d.text for d in streamed) == outs[0].text
