"""Decode lookahead (``engine/lookahead.py``): the runner dispatches the next decode step before
reading back the current one. Host rules (which works may be continued, which match), then
the runner with lookahead on against the runner with it off, on plans that use the lookahead,
waste it, and run a wasted position again: the sampled tokens must be identical."""

import dataclasses

import jax.numpy as jnp
import numpy as np
from test_model_runner import demo, make_runner

from dsv4_jax.engine.lookahead import Lookahead, continuation, match
from dsv4_jax.engine.runner_api import SamplingParams, SeqWork, StepPlan

GREEDY = SamplingParams(temperature=0.0, max_tokens=64)


def _work(**kw):
    args = dict(seq_id=7, slot=1, block_ids=[3, 4], tokens=[11], start=100, sample=True, sampling=GREEDY,
                sample_index=5, seed=9, prompt_len=90)
    return SeqWork(**{**args, **kw})


def test_continuation_only_where_the_lookahead_is_harmless():
    c = continuation(_work(), block_tokens=128)
    assert (c.start, c.sample_index, c.block_ids, c.slot) == (101, 6, [3, 4], 1)
    assert continuation(_work(start=255), 128) is None  # position 256 has no block yet
    assert continuation(_work(start=254), 128) is not None
    assert continuation(_work(sample_index=63), 128) is None  # samples its 64th = max_tokens-th token
    assert continuation(_work(sample_index=62), 128) is not None
    for bad in (dict(sample=False), dict(tokens=[1, 2]), dict(save_snapshot=0), dict(restore_snapshot=1),
                dict(fresh=True), dict(state_start=4), dict(cached_until=4), dict(prior_tokens=[1]),
                dict(sampling=SamplingParams(repetition_penalty=1.2)), dict(sampling=SamplingParams(presence_penalty=0.5)),
                dict(sampling=SamplingParams(frequency_penalty=0.5))):
        assert continuation(_work(**bad), 128) is None, bad


def test_match_needs_the_sampled_token_and_the_same_work():
    ahead = Lookahead([continuation(_work(), 128), continuation(_work(seq_id=8, slot=2, block_ids=[5]), 128)],
                      {7: 0, 8: 1}, res=None)
    nxt = _work(tokens=[42], start=101, sample_index=6)
    assert match(ahead, [nxt]) == ([], [nxt])  # input token not read back yet
    ahead.expect({7: 42, 8: 43})
    other = _work(seq_id=9, slot=3)
    used, rest = match(ahead, [other, nxt, dataclasses.replace(nxt, seq_id=8, slot=2, block_ids=[5], tokens=[1])])
    assert [w.seq_id for w in used] == [7] and [w.seq_id for w in rest] == [9, 8]  # 8: another token
    assert match(ahead, [dataclasses.replace(nxt, block_ids=[3, 4, 6])])[0]  # a block added after: fine
    for bad in (dict(block_ids=[3, 6]), dict(start=102), dict(sample_index=7), dict(seed=1), dict(slot=0),
                dict(sampling=SamplingParams(temperature=0.5)), dict(save_snapshot=1)):
        assert match(ahead, [dataclasses.replace(nxt, **bad)])[0] == [], bad
    assert match(None, [nxt]) == ([], [nxt])


def _drive(runner, schedule, prompts):
    """Run ``schedule``: per step, the sequences that decode (all prefill at step 0)."""
    seqs = {i: dict(slot=i, blocks=[2 * i, 2 * i + 1], toks=list(p), n=0) for i, p in enumerate(prompts)}
    sampling = {0: GREEDY, 1: SamplingParams(temperature=1.0, seed=3), 2: GREEDY}
    plan = [SeqWork(seq_id=i, slot=s["slot"], block_ids=s["blocks"], tokens=list(s["toks"]), start=0, sample=True,
                    sampling=sampling[i], seed=5, prompt_len=len(s["toks"]), fresh=True) for i, s in seqs.items()]
    got = []
    for step in [None, *schedule]:
        if step is not None:
            plan = [SeqWork(seq_id=i, slot=seqs[i]["slot"], block_ids=seqs[i]["blocks"], tokens=seqs[i]["toks"][-1:],
                            start=len(seqs[i]["toks"]) - 1, sample=True, sampling=sampling[i], seed=5,
                            sample_index=seqs[i]["n"], prompt_len=len(prompts[i])) for i in step]
        out = runner.execute(StepPlan(plan))
        for i, o in sorted(out.items()):
            seqs[i]["toks"].append(o.token)
            seqs[i]["n"] += 1
        got.append(sorted((i, o.token) for i, o in out.items()))
    return got


def test_runner_with_lookahead_samples_what_it_samples_without():
    cfg, _ = demo()
    rng = np.random.RandomState(4)
    prompts = [rng.randint(2, cfg.vocab_size, n) for n in (30, 61, 125)]
    # seq 2 reaches position 127 (the last of its first block... it has two) and keeps going;
    # seq 1 skips a step (its lookahead is wasted, then that position runs again); seq 0 stops.
    schedule = [(0, 1, 2), (0, 1, 2), (0, 2), (1, 2), (0, 1, 2), (1, 2), (1, 2), (2,), (1, 2)]
    on = make_runner(dtype=jnp.float32)
    off = make_runner(dtype=jnp.float32, lookahead=False)
    want = _drive(off, schedule, prompts)
    got = _drive(on, schedule, prompts)
    assert got == want
    assert off.lookahead_used == 0 and on.lookahead_used >= 10 and on.lookahead_wasted >= 3
