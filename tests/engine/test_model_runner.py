"""The device-side runner (``engine/model_runner.py``) on the demo checkpoint, driven by plans."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax.checkpoint import load_checkpoint
from dsv4_jax.engine.runner.model_runner import JaxModelRunner
from dsv4_jax.engine.runner_api import SeqWork, StepPlan
from dsv4_jax.engine.sampling_params import SamplingParams
from dsv4_jax.model.transformer import forward

GREEDY = SamplingParams(temperature=0.0, max_tokens=64)


@functools.cache
def demo():
    return load_checkpoint("checkpoints/demo", jnp.float32)


def make_runner(**kw):
    cfg, params = demo()
    args = dict(
        num_slots=4,
        num_blocks=12,
        block_tokens=128,
        max_blocks_per_seq=3,
        num_snapshots=2,
        max_batch=4,
        max_tokens_per_step=256,
        dtype=jnp.float32,
    )
    return JaxModelRunner(cfg, params, **{**args, **kw})


@functools.cache
def _full_forward():
    cfg, params = demo()
    return jax.jit(lambda t: forward(params, t, jnp.arange(PAD)[None], cfg=cfg)[0])


PAD = 256


def greedy_reference(prompt, n):
    """Greedy tokens from the full forward (no state); the causal model ignores right padding."""
    seq = list(prompt)
    for _ in range(n):
        tok = np.zeros((1, PAD), np.int32)
        tok[0, : len(seq)] = seq
        seq.append(int(np.argmax(np.asarray(_full_forward()(tok))[0, len(seq) - 1])))
    return seq[len(prompt) :]


def generate(runner, seqs, n, sampling=GREEDY, first_step_extra=()):
    """Prefill every sequence in one step, then decode them together; returns tokens per seq."""
    works = [
        SeqWork(
            seq_id=i,
            slot=s["slot"],
            block_ids=s["blocks"],
            tokens=list(s["prompt"]),
            start=0,
            sample=True,
            sampling=s.get("sampling", sampling),
            seed=s.get("seed", 0),
            prompt_len=len(s["prompt"]),
            fresh=True,
        )
        for i, s in enumerate(seqs)
    ]
    out = runner.execute(StepPlan(works + list(first_step_extra)))
    toks = {i: [out[i].token] for i in range(len(seqs))}
    for k in range(1, n):
        plan = [
            SeqWork(
                seq_id=i,
                slot=s["slot"],
                block_ids=s["blocks"],
                tokens=[toks[i][-1]],
                start=len(s["prompt"]) + k - 1,
                sample=True,
                sampling=s.get("sampling", sampling),
                seed=s.get("seed", 0),
                sample_index=k,
                prompt_len=len(s["prompt"]),
            )
            for i, s in enumerate(seqs)
        ]
        out = runner.execute(StepPlan(plan))
        for i, seq in toks.items():
            seq.append(out[i].token)
    return toks


def test_batched_greedy_equals_the_model_alone_and_does_not_recompile():
    cfg, _ = demo()
    rng = np.random.RandomState(0)
    seqs = [
        dict(prompt=rng.randint(2, cfg.vocab_size, 37), slot=3, blocks=[5, 9]),
        dict(prompt=rng.randint(2, cfg.vocab_size, 150), slot=0, blocks=[1, 2]),
    ]
    runner = make_runner()
    got = generate(runner, seqs, 12)
    for i, s in enumerate(seqs):
        assert got[i] == greedy_reference(s["prompt"], 12)
    warm = runner.compilations
    generate(
        runner,
        [
            dict(prompt=rng.randint(2, cfg.vocab_size, 60), slot=1, blocks=[7]),
            dict(prompt=rng.randint(2, cfg.vocab_size, 180), slot=2, blocks=[3, 4]),
        ],
        6,
    )
    assert runner.compilations == warm  # same buckets: steady state compiles nothing


def test_precompile_covers_every_shape_the_runner_dispatches():
    """``step_shapes`` lists every (batch, tokens) under the limits (prefill chunks grouped by
    length bucket, at most the token budget's worth of chunks per bucket); after
    ``precompile`` a mixed prefill (two buckets) and batched decodes trace nothing new, and
    the compiled steps report their temporaries."""
    cfg, _ = demo()
    runner = make_runner(num_slots=2, max_batch=2, max_tokens_per_step=16, num_blocks=6)
    assert runner.step_shapes() == [(1, 1), (2, 1), (1, 8), (2, 8), (1, 16)]
    wide = make_runner(max_batch=4, max_tokens_per_step=64)
    assert wide.step_shapes() == [
        (1, 1),
        (2, 1),
        (4, 1),
        *((b, t) for t in (8, 16, 32) for b in (1, 2, 4)),
        (1, 64),
    ]
    out = runner.precompile(logprobs=False)
    assert out["compiled"] == 5 and out["temp_bytes"] > 0
    before = runner.compilations
    rng = np.random.RandomState(1)
    seqs = [
        dict(prompt=rng.randint(2, cfg.vocab_size, 5), slot=0, blocks=[0]),
        dict(prompt=rng.randint(2, cfg.vocab_size, 11), slot=1, blocks=[3]),
    ]
    got = generate(runner, seqs, 4)
    assert runner.compilations == before
    assert got[0] == greedy_reference(seqs[0]["prompt"], 4)


def test_snapshot_restore_resumes_a_shared_prefix_exactly():
    """SWA ``full``/``checkpoint``: save the slot at a block boundary, restore it into another
    slot for a sequence sharing that prefix, and continue from the boundary."""
    cfg, _ = demo()
    rng = np.random.RandomState(1)
    prefix = list(rng.randint(2, cfg.vocab_size, 128))
    b = prefix + list(rng.randint(2, cfg.vocab_size, 21))
    runner = make_runner()
    runner.execute(
        StepPlan(
            [
                SeqWork(
                    seq_id=0,
                    slot=1,
                    block_ids=[4],
                    tokens=prefix,
                    start=0,
                    sample=False,
                    prompt_len=128,
                    fresh=True,
                    save_snapshot=1,
                )
            ]
        )
    )
    out = runner.execute(
        StepPlan(
            [
                SeqWork(
                    seq_id=1,
                    slot=3,
                    block_ids=[4, 8],
                    tokens=b[128:],
                    start=128,
                    sample=True,
                    sampling=GREEDY,
                    prompt_len=len(b),
                    fresh=True,
                    restore_snapshot=1,
                    prior_tokens=prefix,
                )
            ]
        )
    )
    assert out[1].token == greedy_reference(b, 1)[0]


@pytest.mark.slow  # CI time: make test-slow
def test_seeded_sampling_is_reproducible_across_batches():
    cfg, _ = demo()
    rng = np.random.RandomState(2)
    p = dict(
        prompt=rng.randint(2, cfg.vocab_size, 30),
        slot=0,
        blocks=[0],
        seed=1234,
        sampling=SamplingParams(temperature=0.9, top_p=0.9, max_tokens=8),
    )
    alone = generate(make_runner(), [p], 8)[0]
    other = dict(
        prompt=rng.randint(2, cfg.vocab_size, 60),
        slot=2,
        blocks=[6],
        seed=99,
        sampling=SamplingParams(temperature=1.0, max_tokens=8),
    )
    together = generate(make_runner(), [other, {**p, "slot": 1, "blocks": [3]}], 8)[1]
    assert alone == together
    assert generate(make_runner(), [{**p, "seed": 4321}], 8)[0] != alone


def test_repetition_penalty_sees_prompt_and_outputs():
    """A huge repetition penalty forbids every token already in the prompt or the output."""
    cfg, _ = demo()
    prompt = list(np.random.RandomState(3).randint(2, cfg.vocab_size, 40))
    sp = SamplingParams(temperature=0.0, repetition_penalty=1e6, max_tokens=20)
    got = generate(make_runner(), [dict(prompt=prompt, slot=0, blocks=[2], sampling=sp)], 20)[0]
    assert not set(got) & set(prompt)
    assert len(set(got)) == len(got)
    plain = generate(make_runner(), [dict(prompt=prompt, slot=0, blocks=[2])], 20)[0]
    assert set(plain) & set(prompt) or len(set(plain)) < len(plain)  # the penalty changed something


def test_logprobs_are_returned_when_asked():
    cfg, _ = demo()
    sp = SamplingParams(temperature=0.0, logprobs=3, max_tokens=2)
    prompt = list(np.random.RandomState(4).randint(2, cfg.vocab_size, 16))
    runner = make_runner()
    out = runner.execute(
        StepPlan(
            [
                SeqWork(
                    seq_id=0,
                    slot=0,
                    block_ids=[0],
                    tokens=prompt,
                    start=0,
                    sample=True,
                    sampling=sp,
                    prompt_len=16,
                    fresh=True,
                )
            ]
        )
    )[0]
    assert len(out.top_logprobs) == 3 and out.top_logprobs[0][0] == out.token
    assert abs(out.top_logprobs[0][1] - out.logprob) < 1e-6 and out.logprob <= 0
