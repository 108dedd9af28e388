"""MTP speculative decoding end to end on the demo checkpoint (engine/runner/speculative.py).

Speculative serving must emit exactly the tokens serving without it emits. Each engine run
here is compared with the request generated alone on the state path (``test_e2e_demo.alone``:
one prefill, then one decode at a time, no drafts), in float32 where that is exact.

The demo's own MTP head decides which drafts a run sees, so on its own it exercises only
the acceptance pattern it happens to produce. ``OracleDrafts`` replaces the runner's drafts
with the request's true continuation, corrupted at chosen draft positions, so every test
sees accepted prefixes of every length, rejections at every position, and full acceptances
with a bonus token, across chunked prefill, prefix hits, preemption and mixed batches.
The planted-bug tests then show the checks fail when a rejected draft leaves a trace.
"""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from spec_utils import OracleDrafts, pattern
from test_e2e_demo import BT, MODES, alone, check_alone, demo, toks

from dsv4_jax import LLM, SamplingParams
from dsv4_jax.engine import EngineConfig, LLMEngine
from dsv4_jax.engine.runner.model_runner import JaxModelRunner
from dsv4_jax.model import attention_state, compressor
from dsv4_jax.model.transformer import ModelOptions

K = 3
DEMO = "checkpoints/demo"


def runner_args(mode="f32", k=K) -> dict:
    """The runner the demo tests share (test_e2e_demo's sizes), verifying up to ``k`` drafts."""
    dtype, fmt, qat, kernels, storage, _ = MODES[mode]
    cfg, params = demo(dtype, storage)
    return dict(
        cfg=cfg,
        params=params,
        num_slots=4,
        num_blocks=24,
        block_tokens=BT,
        max_blocks_per_seq=8,
        num_snapshots=8,
        max_batch=4,
        max_tokens_per_step=256,
        kv_format=fmt,
        eos_token_id=cfg.eos_token_id,
        dtype=dtype,
        opts=ModelOptions(sim_quant=qat, kernels=kernels),
        speculative_tokens=k,
    )


@functools.cache
def spec_runner(mode="f32", k=K):
    return JaxModelRunner(**runner_args(mode, k))


def spec_engine(truth, bad, mode="f32", strategy="recompute", cache=True, depth=K, **limits):
    r = OracleDrafts(spec_runner(mode), truth, bad, **limits)
    cfg = EngineConfig(
        block_tokens=BT,
        swa_strategy=strategy,
        checkpoint_interval=2 * BT,
        enable_prefix_cache=cache,
        num_snapshots=r.limits.num_snapshots,
        speculative_tokens=depth,
        spec_full_batch=8,
        spec_off_batch=16,
    )
    return LLMEngine(r, cfg)


def truths(mode, requests):
    """seq_id (in submission order) -> prompt + its tokens alone."""
    return {i: list(p) + alone(mode, tuple(p), n)[0] for i, (p, n) in enumerate(requests)}


def drive(e, arrivals):
    """``test_e2e_demo.drive`` with each token's logprob: {prompt: (tokens, logprobs)}."""
    rids = {}
    for step in range(10_000):
        for p, n in arrivals.get(step, []):
            sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=0)
            rids[tuple(p)] = e.add_request(p, sp)
        if step > max(arrivals) and not e.has_unfinished():
            break
        e.step()
    return {p: Got(e.get_request(r)) for p, r in rids.items()}


class Got(list):
    """A request's tokens (a list, as ``check_alone`` takes them) with their logprobs."""

    def __init__(self, req):
        super().__init__(req.output_token_ids)
        self.logprobs = [lp for lp, _ in req.logprobs]


def check_logprobs(got: Got, prompt, n, tol=1e-4):
    """In float32 a token's logprob is the alone run's to XLA's cross-shape rounding (< 1e-5):
    a trace of a rejected draft in the state moves it further long before it flips a token."""
    want = alone("f32", tuple(prompt), n)[2]
    err = max(abs(a - b) for a, b in zip(got.logprobs, want))
    assert err <= tol, f"logprob differs from the request alone by {err:.3g}"


def run_checked(mode, arrivals, bad, **kw):
    """Drive an oracle-draft engine over ``arrivals`` and check every request against alone;
    returns the engine."""
    reqs = [r for step in sorted(arrivals) for r in arrivals[step]]
    e = spec_engine(truths(mode, reqs), bad, mode, **kw)
    got = drive(e, arrivals)
    for p, n in reqs:
        check_alone(mode, got[tuple(p)], p, n)
        if mode == "f32":
            check_logprobs(got[tuple(p)], p, n)
    s = e.stats()
    assert 0 < s["spec_accepted_tokens"] < s["spec_draft_tokens"], s  # acceptances and rejections
    assert e.block_manager.leaks() == []
    return e


def test_mixed_batches_with_accepted_and_rejected_drafts_equal_each_request_alone():
    # prefill chunks, verify rows and plain decodes in the same steps; prompts past the window
    arrivals = {0: [(toks(7, 1), 30), (toks(150, 2), 24)], 2: [(toks(300, 3), 12)], 5: [(toks(40, 4), 30)]}
    e = run_checked("f32", arrivals, pattern(1))
    per_pos = e.spec_counters["accepted_per_position"]
    assert len(per_pos) == K and all(n > 0 for n in per_pos)  # every draft position was accepted sometimes


# checkpoint / recompute in make test-slow (CI time); full covers the hit with drafts in make test
@pytest.mark.parametrize(
    "strategy",
    [
        "full",
        pytest.param("checkpoint", marks=pytest.mark.slow),
        pytest.param("recompute", marks=pytest.mark.slow),
    ],
)
def test_prefix_hits_with_drafts_equal_the_cold_run(strategy):
    a = toks(700, 10)
    long_hit = a[:650] + toks(30, 11)
    short_hit = a[:200] + toks(20, 12)
    reqs = [(a, 16), (long_hit, 16), (short_hit, 16)]
    e = spec_engine(truths("f32", reqs), pattern(2), strategy=strategy)
    for i, (p, n) in enumerate(reqs):
        before = e.stats()["prefix_cache_hit_tokens"]
        got = drive(e, {0: [(p, n)]})[tuple(p)]
        check_alone("f32", got, p, n)
        check_logprobs(got, p, n)
        if i:
            assert e.stats()["prefix_cache_hit_tokens"] - before == (640, 128)[i - 1]
    assert e.stats()["spec_accepted_tokens"] > 0
    assert e.block_manager.leaks() == []


def test_chunked_prefill_and_preemption_with_drafts_do_not_change_outputs():
    reqs = [(toks(n, 20 + n), 60) for n in (200, 230, 180)]
    e = spec_engine(truths("f32", reqs), pattern(3), num_blocks=7, max_tokens_per_step=128)
    got = drive(e, {0: reqs})
    assert e.stats()["preemptions"] > 0
    for p, n in reqs:
        check_alone("f32", got[tuple(p)], p, n)
        check_logprobs(got[tuple(p)], p, n)
    assert e.block_manager.leaks() == []


@pytest.mark.slow
def test_fp8_rows_and_qat_with_drafts_equal_each_request_alone():
    arrivals = {0: [(toks(150, 40), 24), (toks(20, 41), 24)], 3: [(toks(260, 42), 16)]}
    run_checked("default", arrivals, pattern(4))


# ----------------------------------------------------------------------------- planted bugs
_compress_chunk = compressor.compress_chunk


def _keep_rejected_ring_rows(lengths, commit):
    # the first two drafts' rows enter the ring (the first alone would be harmless: it overwrites
    # position n − W, just out of the next query's window; the second overwrites n + 1 − W)
    return jnp.minimum(commit + 2, lengths)


def _keep_rejected_tail_rows(*args, commit=None, **kw):
    return _compress_chunk(*args, commit=None, **kw)  # the tail is cut after the drafts


@pytest.mark.slow  # CI time (make test must stay under 25 min): in make test-slow
@pytest.mark.parametrize("plant", ["ring", "tail"])
def test_a_rejected_token_left_in_the_ring_or_a_tail_is_caught(monkeypatch, plant):
    """The checks above would catch a rollback bug: plant one and they fail."""
    if plant == "ring":
        monkeypatch.setattr(attention_state, "ring_rows", _keep_rejected_ring_rows)
    else:
        monkeypatch.setattr(compressor, "compress_chunk", _keep_rejected_tail_rows)
    runner = JaxModelRunner(**runner_args())  # traced with the bug
    reqs = [(toks(150, 50), 40), (toks(135, 51), 40)]
    e = LLMEngine(
        OracleDrafts(runner, truths("f32", reqs), pattern(5)),
        EngineConfig(block_tokens=BT, swa_strategy="recompute", speculative_tokens=K),
    )
    got = drive(e, {0: reqs})
    assert e.stats()["spec_draft_tokens"] > e.stats()["spec_accepted_tokens"] > 0
    caught = 0
    for p, n in reqs:
        try:
            check_alone("f32", got[tuple(p)], p, n)
            check_logprobs(got[tuple(p)], p, n)
        except AssertionError:
            caught += 1
    assert caught, f"the planted {plant} bug went unnoticed"


# ----------------------------------------------------------------------------- the MTP's own drafts
@functools.cache
def llm(k):
    return LLM(
        DEMO,
        profile="chat",
        max_batch=4,
        num_blocks=32,
        num_snapshots=8,
        max_model_len=1024,
        max_tokens_per_step=256,
        dtype="float32",
        kv_format="bf16",
        qat=False,
        speculative_tokens=k,
        spec_full_batch=8,
        spec_off_batch=16,
    )


def test_the_mtp_drafts_greedy_and_seeded_sampled_requests_emit_the_tokens_of_k0():
    prompts = ["def main(argv):\n    ", "import os\n", [0, 41, 609, 296]]
    params = [
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=0.8, top_p=0.95, seed=7, ignore_eos=True),
        SamplingParams(
            max_tokens=24, temperature=1.0, top_k=20, seed=11, repetition_penalty=1.3, ignore_eos=True
        ),
    ]
    want = [o.token_ids for o in llm(0).generate(prompts, params)]
    outs = llm(K).generate(prompts, params)
    assert [o.token_ids for o in outs] == want
    drafted = sum(o.metrics.draft_tokens for o in outs)
    assert drafted > 0 and all(o.metrics.accepted_tokens <= o.metrics.draft_tokens for o in outs)
    assert llm(K).engine.runner.compilations > 0
    np.testing.assert_array_equal(
        [len(o.token_ids) for o in outs], [24, 24, 24]
    )  # a step emitting several tokens never overshoots max_tokens
