"""Decode lookahead (``engine/lookahead.py``): the runner dispatches the next decode step before
reading back the current one. Host rules (which works may be continued, which match), then
the runner with lookahead on against the runner with it off, on plans that use the lookahead,
waste it, and run a wasted position again: the sampled tokens must be identical."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_model_runner import demo, make_runner

from dsv4_jax.engine.runner.lookahead import Lookahead, continuation
from dsv4_jax.engine.runner_api import SeqWork, StepPlan
from dsv4_jax.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=64)


def _work(**kw):
    args = dict(
        seq_id=7,
        slot=1,
        block_ids=[3, 4],
        tokens=[11],
        start=100,
        sample=True,
        sampling=GREEDY,
        sample_index=5,
        seed=9,
        prompt_len=90,
    )
    return SeqWork(**{**args, **kw})


def test_continuation_only_where_the_lookahead_is_harmless():
    c = continuation(_work(), block_tokens=128)
    assert (c.start, c.sample_index, c.block_ids, c.slot) == (101, 6, [3, 4], 1)
    assert continuation(_work(start=255), 128) is None  # position 256 has no block yet
    assert continuation(_work(start=254), 128) is not None
    assert continuation(_work(sample_index=63), 128) is None  # samples its 64th = max_tokens-th token
    assert continuation(_work(sample_index=62), 128) is not None
    assert continuation(_work(save_snapshot=0), 128).save_snapshot is None  # saved before the lookahead runs
    for bad in (
        dict(sample=False),
        dict(tokens=[1, 2]),
        dict(restore_snapshot=1),
        dict(fresh=True),
        dict(state_start=4),
        dict(cached_until=4),
        dict(prior_tokens=[1]),
        dict(sampling=SamplingParams(repetition_penalty=1.2)),
        dict(sampling=SamplingParams(presence_penalty=0.5)),
        dict(sampling=SamplingParams(frequency_penalty=0.5)),
    ):
        assert continuation(_work(**bad), 128) is None, bad


def _pending():
    ahead = Lookahead()
    ahead.add(
        [continuation(_work(), 128), continuation(_work(seq_id=8, slot=2, block_ids=[5]), 128)], [0, 1], None
    )
    ahead.expect({7: 42, 8: 43})
    return ahead, _work(tokens=[42], start=101, sample_index=6)


def test_a_pending_row_answers_its_sequences_next_decode():
    ahead, nxt = _pending()
    other = _work(seq_id=9, slot=3)
    used, rest = ahead.take([other])  # seq 7 and 8 sit this step out: their rows stay pending
    assert used == [] and rest == [other] and set(ahead.pending) == {7, 8}
    used, rest = ahead.take(
        [nxt, dataclasses.replace(nxt, seq_id=8, slot=2, block_ids=[5, 6], tokens=[43], save_snapshot=3)]
    )
    assert [(w.seq_id, p.row) for w, p in used] == [
        (7, 0),
        (8, 1),
    ] and rest == []  # a block added, a snapshot: fine
    assert ahead.used == 2 and ahead.pending == {}


def test_a_pending_row_is_never_computed_twice():
    for bad in (
        dict(tokens=[5]),
        dict(block_ids=[3, 6]),
        dict(sample_index=7),
        dict(seed=1),
        dict(slot=0),
        dict(sampling=SamplingParams(temperature=0.5)),
        dict(start=100),
    ):
        ahead, nxt = _pending()
        with pytest.raises(RuntimeError, match="would compute position"):
            ahead.take([dataclasses.replace(nxt, **bad)])
    ahead, nxt = _pending()
    fresh = dataclasses.replace(
        nxt, tokens=list(range(9)), start=0, fresh=True
    )  # preempted, back from scratch
    assert ahead.take([fresh]) == ([], [fresh]) and 7 not in ahead.pending and ahead.dropped == 1
    ahead.drop(8)  # finished or aborted (runner.forget)
    assert ahead.pending == {} and ahead.dropped == 2


def _drive(runner, schedule, prompts, saves):
    """Run ``schedule``: per step, the sequences that decode (all prefill at step 0);
    ``saves`` {step: {seq: snapshot}}: decodes that also save an SWA snapshot."""
    seqs = {i: dict(slot=i, blocks=[2 * i, 2 * i + 1], toks=list(p), n=0) for i, p in enumerate(prompts)}
    sampling = {0: GREEDY, 1: SamplingParams(temperature=1.0, seed=3), 2: GREEDY}
    plan = [
        SeqWork(
            seq_id=i,
            slot=s["slot"],
            block_ids=s["blocks"],
            tokens=list(s["toks"]),
            start=0,
            sample=True,
            sampling=sampling[i],
            seed=5,
            prompt_len=len(s["toks"]),
            fresh=True,
        )
        for i, s in seqs.items()
    ]
    got = []
    for k, step in enumerate([None, *schedule]):
        if step is not None:
            plan = [
                SeqWork(
                    seq_id=i,
                    slot=seqs[i]["slot"],
                    block_ids=seqs[i]["blocks"],
                    tokens=seqs[i]["toks"][-1:],
                    start=len(seqs[i]["toks"]) - 1,
                    sample=True,
                    sampling=sampling[i],
                    seed=5,
                    sample_index=seqs[i]["n"],
                    prompt_len=len(prompts[i]),
                    save_snapshot=saves.get(k - 1, {}).get(i),
                )
                for i in step
            ]
        out = runner.execute(StepPlan(plan))
        for i, o in sorted(out.items()):
            seqs[i]["toks"].append(o.token)
            seqs[i]["n"] += 1
        got.append(sorted((i, o.token) for i, o in out.items()))
    return got


@pytest.mark.slow  # CI time: make test-slow
def test_runner_with_lookahead_samples_what_it_samples_without():
    cfg, _ = demo()
    rng = np.random.RandomState(4)
    prompts = [rng.randint(2, cfg.vocab_size, n) for n in (30, 61, 125)]
    # seq 1 sits out step 2 (its lookahead row waits for it); seq 0 stops after step 4 (its row is
    # never taken); seq 2's third decode (position 127, the end of its first block) also saves a
    # snapshot, as the `full` strategy does, and crosses into its second block.
    schedule = [(0, 1, 2), (0, 1, 2), (0, 2), (1, 2), (0, 1, 2), (1, 2), (1, 2), (2,), (1, 2)]
    saves = {2: {2: 1}}
    on = make_runner(dtype=jnp.float32)
    off = make_runner(dtype=jnp.float32, lookahead=False)
    want = _drive(off, schedule, prompts, saves)
    got = _drive(on, schedule, prompts, saves)
    assert got == want
    assert off.ahead.used == 0 and on.ahead.used >= 15 and 0 in on.ahead.pending
    for a, b in zip(jax.tree.leaves(on.snapshots), jax.tree.leaves(off.snapshots)):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        if a.dtype.kind == "f":
            np.testing.assert_allclose(a[1], b[1], rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(a[1], b[1])
    assert any(np.asarray(x)[1].any() for x in jax.tree.leaves(on.snapshots))  # snapshot 1 was written
