"""MTP speculative decoding on random tiny configs: window 16, CSA 4, HCA 8, so a rejected
draft lands on live ring rows and crosses compressor blocks within a few tokens.

Each speculative engine is compared with a non-speculative engine over the same weights and
requests (same runner sizes, ``speculative_tokens=0``): greedy tokens equal and logprobs equal
to float32 rounding. Drafts come from the tiny model's own (random) MTP block, and from
``OracleDrafts`` (the true continuation, corrupted at chosen positions) so that long accepted
prefixes happen too. Sampled requests: a seeded request emits the same tokens with and without
drafts (verification samples with the non-speculative path's own randomness), and over many
seeds the emitted tokens follow the same distribution (a chi-square test of homogeneity).

The whole file runs in ``make test-slow`` (about 10 minutes on 2 cores; the demo's tests in
test_speculative.py cover the same paths in ``make test``). Its pytest process has twice died
of a segmentation fault inside XLA:CPU during a speculative step of these tiny programs, after
several tests had run in the same process; a fresh process passed each test. Root cause not
found yet (issue 20's closing note).
"""

import functools
import random

import jax
import numpy as np
import pytest
from scipy.stats import chi2_contingency
from spec_utils import OracleDrafts, pattern
from test_e2e_demo import Limited

from dsv4_jax.config import preset
from dsv4_jax.engine import EngineConfig, LLMEngine
from dsv4_jax.engine.runner.model_runner import JaxModelRunner
from dsv4_jax.engine.sampling_params import SamplingParams
from dsv4_jax.model.params import init_params

pytestmark = pytest.mark.slow

BT = 16
K = 3


@functools.cache
def model(vocab: int = 512, seed: int = 0):
    cfg = preset("tiny").replace(vocab_size=vocab, num_nextn_predict_layers=1)
    return cfg, init_params(cfg, jax.random.PRNGKey(seed))


@functools.cache
def runner(k: int, vocab: int = 512, max_batch: int = 4):
    cfg, params = model(vocab)
    return JaxModelRunner(
        cfg,
        params,
        num_slots=max_batch,
        num_blocks=max_batch * 24,
        block_tokens=BT,
        max_blocks_per_seq=24,
        num_snapshots=16,
        max_batch=max_batch,
        max_tokens_per_step=64,
        kv_format="bf16",
        eos_token_id=1,
        dtype=np.float32,
        speculative_tokens=k,
    )


def engine(r, strategy="recompute", depth=0, **limits):
    r = Limited(r, **limits) if limits else r
    cfg = EngineConfig(
        block_tokens=BT,
        swa_strategy=strategy,
        checkpoint_interval=2 * BT,
        num_snapshots=r.limits.num_snapshots,
        max_batch=r.limits.max_batch,
        speculative_tokens=depth,
        spec_full_batch=1 << 20,  # every draft at every load: the tests are about exactness
        spec_off_batch=1 << 21,
    )
    return LLMEngine(r, cfg)


def prompts(n, lengths, seed, vocab=512):
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(lengths[i % len(lengths)])] for i in range(n)]


def run(e, reqs, params):
    """Submit every request at once; returns each request's (tokens, logprobs)."""
    rids = [e.add_request(p, sp) for p, sp in zip(reqs, params)]
    while e.has_unfinished():
        e.step()
    out = []
    for r in rids:
        req = e.get_request(r)
        out.append((req.output_token_ids, [lp for lp, _ in req.logprobs or []]))
    return out


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=0)


def assert_same(got, want, tol=1e-4):
    for (gt, glp), (wt, wlp) in zip(got, want):
        assert gt == wt
        assert max(abs(a - b) for a, b in zip(glp, wlp)) <= tol


@pytest.mark.parametrize("strategy", ["full", "checkpoint", "recompute"])
def test_tiny_greedy_with_the_mtp_and_with_oracle_drafts_equals_no_drafts(strategy):
    # a shared 70-token prefix: the second and third requests hit it (4 blocks of 16)
    base = prompts(1, [70], 1)[0]
    reqs = [
        base,
        base[:66] + prompts(1, [9], 2)[0],
        base[:40] + prompts(1, [30], 3)[0],
        prompts(1, [5], 4)[0],
    ]
    params = [greedy(24)] * len(reqs)

    def serve(e):  # the first request alone, so the others hit its published blocks
        return run(e, reqs[:1], params[:1]) + run(e, reqs[1:], params[1:])

    want = serve(engine(runner(0), strategy))
    e = engine(runner(K), strategy, depth=K)
    assert_same(serve(e), want)
    assert e.stats()["spec_draft_tokens"] > 0 and e.stats()["prefix_cache_hit_tokens"] > 0
    truth = {i: list(p) + t for i, (p, (t, _)) in enumerate(zip(reqs, want))}
    e = engine(OracleDrafts(runner(K), truth, pattern(7)), strategy, depth=K)
    assert_same(serve(e), want)
    s = e.stats()
    assert 0 < s["spec_accepted_tokens"] < s["spec_draft_tokens"]
    assert e.block_manager.leaks() == []


def test_tiny_chunked_prefill_and_preemption_with_drafts_equal_no_drafts():
    reqs = prompts(4, [90, 23, 75, 40], 5)
    params = [greedy(40)] * len(reqs)
    want = run(engine(runner(0)), reqs, params)
    truth = {i: list(p) + t for i, (p, (t, _)) in enumerate(zip(reqs, want))}
    e = engine(OracleDrafts(runner(K), truth, pattern(8)), depth=K, num_blocks=16)
    assert_same(run(e, reqs, params), want)
    assert e.stats()["preemptions"] > 0 and e.stats()["spec_accepted_tokens"] > 0
    assert e.block_manager.leaks() == []


# ----------------------------------------------------------------------------- sampling
V = 16  # a small vocabulary: the draft distribution's mass is large enough to test


def sampled(seed, **kw):
    return SamplingParams(max_tokens=4, temperature=1.0, seed=seed, ignore_eos=True, **kw)


def test_seeded_sampled_requests_emit_the_same_tokens_at_every_draft_depth():
    reqs = prompts(8, [6, 11], 9, vocab=V)
    params = [
        sampled(s, top_p=0.9 if s % 2 else 1.0, repetition_penalty=1.2 if s % 3 else 1.0) for s in range(8)
    ]
    want = run(engine(runner(0, V, 8)), reqs, params)
    e = engine(runner(K, V, 8), depth=K)
    got = run(e, reqs, params)
    assert [t for t, _ in got] == [t for t, _ in want]
    assert 0 < e.stats()["spec_accepted_tokens"] < e.stats()["spec_draft_tokens"]


def test_sampled_tokens_follow_the_distribution_of_sampling_without_drafts():
    """Chi-square test of homogeneity between the tokens emitted with drafts (seeds 0..N-1) and
    without (seeds N..2N-1, so the two samples are independent), at output positions 1-3 (the
    first comes from the prefill, before any draft); one prompt, so every request draws from
    the same distributions. The drafts are the oracle's (the same-seed continuation, wrong
    about a third of the time), so that acceptance and rejection both happen often; the
    random MTP block of this tiny model is rarely right. Significance level 0.001 per
    position (three tests: family-wise < 0.003); the seeds are fixed, so the outcome is
    deterministic, not flaky."""
    n = 256
    prompt = prompts(1, [7], 10, vocab=V)[0]
    same_seeds = run(engine(runner(0, V, 64)), [prompt] * n, [sampled(s) for s in range(n)])
    truth = {i: list(prompt) + t for i, (t, _) in enumerate(same_seeds)}
    e = engine(OracleDrafts(runner(K, V, 64), truth, pattern(12)), depth=K)
    spec = run(e, [prompt] * n, [sampled(s) for s in range(n)])
    assert [t for t, _ in spec] == [t for t, _ in same_seeds]  # same seed: the same tokens
    s = e.stats()
    assert 0.3 * s["spec_draft_tokens"] < s["spec_accepted_tokens"] < s["spec_draft_tokens"]
    plain = run(engine(runner(0, V, 64)), [prompt] * n, [sampled(n + s) for s in range(n)])
    for pos in (1, 2, 3):
        a = np.bincount([t[pos] for t, _ in spec], minlength=V)
        b = np.bincount([t[pos] for t, _ in plain], minlength=V)
        keep = (a + b) > 0
        p = chi2_contingency(np.stack([a[keep], b[keep]])).pvalue
        assert p > 1e-3, f"position {pos}: p = {p:.2g}"
