"""Sampler checks on CPU against numpy references: greedy, each filter's distribution,
penalties, logprobs, per-request reproducibility, padding, penalty-table scatters, one trace.

Distribution tests draw one request many times in a single call: N rows with the same
seed and sample_index 0..N-1 are N independent draws (that is the reproducibility
contract), so the empirical frequency of every token must sit within 5σ of the numpy
reference, and tokens the reference filters out must never appear. Seeds are fixed, so
the tests are deterministic.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax.engine.runner.sampling import (
    SamplingArrays,
    apply_penalties,
    reset_rows,
    row_uniforms,
    sample,
    sampling_arrays,
    update_counts,
)
from dsv4_jax.engine.sampling_params import SamplingParams

V = 16
N_DRAWS = 20_000
_sample = jax.jit(sample, static_argnames="num_logprobs")


def run(logits, params, seeds=None, indices=None, counts=None, mask=None, num_logprobs=0, pad_to=None):
    logits = np.asarray(logits, np.float32)
    B = len(params)
    pad_to = pad_to or B
    if logits.shape[0] < pad_to:
        logits = np.concatenate([logits, np.zeros((pad_to - B, logits.shape[1]), np.float32)])
    sa = sampling_arrays(params, seeds or [0] * B, indices or [0] * B, pad_to)
    counts = np.zeros(logits.shape, np.int32) if counts is None else counts
    mask = np.zeros(logits.shape, bool) if mask is None else mask
    return jax.tree.map(np.asarray, _sample(logits, sa, counts, mask, num_logprobs=num_logprobs))


def ref_probs(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """The spec in numpy: softmax(x/T) → top-k → renormalise → top-p → min-p → renormalise."""
    x = np.asarray(logits, np.float64) / temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros(len(p), bool)
    keep[order[: top_k if top_k > 0 else len(p)]] = True
    q = np.where(keep, p, 0) / p[keep].sum()
    if top_p < 1:
        before = np.cumsum(q[order]) - q[order]
        keep[order[before >= top_p]] = False
    keep &= p >= min_p * p.max()
    return np.where(keep, p, 0) / p[keep].sum()


def assert_matches(tokens, expected):
    freq = np.bincount(tokens, minlength=len(expected)) / len(tokens)
    assert np.all(freq[expected == 0] == 0), f"filtered-out token drawn: {freq=} {expected=}"
    sigma = np.sqrt(expected * (1 - expected) / len(tokens))
    np.testing.assert_array_less(np.abs(freq - expected), 5 * sigma + 1e-12)


LOGITS = np.random.default_rng(0).normal(0, 1.5, V).astype(np.float32)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"temperature": 0.6},
        {"temperature": 1.7},
        {"top_k": 4},
        {"top_p": 0.55},
        {"min_p": 0.13},
        {"temperature": 0.8, "top_k": 6, "top_p": 0.7, "min_p": 0.05},
        {"temperature": 1.3, "top_k": 10, "top_p": 0.9, "min_p": 0.2},
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "plain",
)
def test_filters_match_reference_distribution(kw):
    expected = ref_probs(LOGITS, **kw)
    params = [SamplingParams(**kw)] * N_DRAWS
    out = run(np.broadcast_to(LOGITS, (N_DRAWS, V)), params, [1234] * N_DRAWS, list(range(N_DRAWS)))
    assert_matches(out.tokens, expected)


def test_reference_cuts_are_nontrivial():
    """Each filter case above actually removes tokens (else it tests nothing)."""
    for kw in [{"top_k": 4}, {"top_p": 0.55}, {"min_p": 0.13}]:
        assert 1 < np.count_nonzero(ref_probs(LOGITS, **kw)) < V - 2, kw
    # top-p is measured on the top-k-renormalised distribution: order matters here.
    assert np.count_nonzero(ref_probs(LOGITS, top_k=3, top_p=0.7)) < np.count_nonzero(
        ref_probs(LOGITS, top_p=0.7)
    )


def test_filters_never_empty_the_distribution():
    """Degenerate settings (top_p = 0 or min_p > 1 built by hand, top_k = 1) keep the argmax."""
    logits = np.random.default_rng(7).normal(size=(3, V)).astype(np.float32)
    sa = sampling_arrays([SamplingParams()] * 3, [1, 2, 3], [0, 0, 0], 3)
    sa = sa._replace(top_p=np.array([0.0, 1.0, 1.0], np.float32), min_p=np.array([0.0, 2.0, 0.0], np.float32))
    sa = sa._replace(top_k=np.array([0, 0, 1], np.int32))
    z = np.zeros((3, V), np.int32)
    out = _sample(logits, sa, z, z > 0, num_logprobs=0)
    np.testing.assert_array_equal(np.asarray(out.tokens), logits.argmax(-1))


def test_greedy_is_argmax_in_mixed_batch():
    logits = np.random.default_rng(1).normal(size=(6, 50)).astype(np.float32)
    logits[2, 7] = logits[2].max()  # a tie: argmax takes the first index
    params = [SamplingParams(temperature=0.0 if i % 2 == 0 else 1.0, top_k=3) for i in range(6)]
    out = run(logits, params, list(range(6)), [5] * 6)
    np.testing.assert_array_equal(out.tokens[::2], logits[::2].argmax(-1))
    all_greedy = run(logits, [SamplingParams(temperature=0.0)] * 6)  # the lax.cond fast path
    np.testing.assert_array_equal(all_greedy.tokens, logits.argmax(-1))


def test_penalties_match_reference():
    rng = np.random.default_rng(2)
    B, Vp = 4, 40
    logits = rng.normal(0, 3, (B, Vp)).astype(np.float32)
    counts = rng.integers(0, 3, (B, Vp)).astype(np.int32) * (rng.random((B, Vp)) < 0.3)
    mask = rng.random((B, Vp)) < 0.3
    params = [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(frequency_penalty=0.7),
        SamplingParams(presence_penalty=-0.5),
        SamplingParams(repetition_penalty=0.8, frequency_penalty=-0.3, presence_penalty=1.1),
    ]
    r = np.array([p.repetition_penalty for p in params])[:, None]
    f = np.array([p.frequency_penalty for p in params])[:, None]
    pres = np.array([p.presence_penalty for p in params])[:, None]
    seen = mask | (counts > 0)
    want = np.where(seen, np.where(logits > 0, logits / r, logits * r), logits)
    want = want - f * counts - pres * (counts > 0)
    sa = sampling_arrays(params, [0] * B, [0] * B, B)
    got = apply_penalties(jnp.asarray(logits), sa, jnp.asarray(counts), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
    # Greedy picks the argmax of the penalised logits; logprobs stay on the raw ones.
    greedy = [SamplingParams(temperature=0.0, **_penalty_kw(p)) for p in params]
    out = run(logits, greedy, counts=counts, mask=mask, num_logprobs=2)
    np.testing.assert_array_equal(out.tokens, want.argmax(-1))
    assert np.any(out.tokens != logits.argmax(-1))  # the penalties changed some choice
    raw_lp = jax.nn.log_softmax(logits, axis=-1)
    np.testing.assert_allclose(
        out.logprob, np.take_along_axis(raw_lp, out.tokens[:, None], -1)[:, 0], atol=1e-5
    )


def _penalty_kw(p):
    return {
        "repetition_penalty": p.repetition_penalty,
        "frequency_penalty": p.frequency_penalty,
        "presence_penalty": p.presence_penalty,
    }


def test_logprobs_raw_distribution_and_top_n_order():
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, (5, 30)).astype(np.float32)
    params = [SamplingParams(temperature=0.5, top_k=3, repetition_penalty=1.5)] * 5
    out = run(logits, params, [9] * 5, [0, 1, 2, 3, 4], mask=np.ones(logits.shape, bool), num_logprobs=4)
    raw = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
    np.testing.assert_allclose(out.logprob, raw[np.arange(5), out.tokens], atol=1e-5)
    np.testing.assert_array_equal(out.top_ids, np.argsort(-raw, axis=-1)[:, :4])
    np.testing.assert_allclose(out.top_logprobs, -np.sort(-raw, axis=-1)[:, :4], atol=1e-5)
    assert np.all(np.diff(out.top_logprobs, axis=-1) <= 0)
    none = run(logits, params, num_logprobs=0)
    assert none.top_ids.shape == (5, 0) and none.top_logprobs.shape == (5, 0)


def test_reproducible_across_batch_composition_and_position():
    """The same (seed, sample_index) gives the same token wherever the row sits, whoever
    its neighbours are (different params, batch size, padding)."""
    rng = np.random.default_rng(4)
    row = rng.normal(0, 0.3, V).astype(np.float32)  # high entropy: draws vary a lot
    req = SamplingParams(temperature=0.9, top_p=0.95, seed=77)
    alone = [run(row[None], [req], [77], [i]).tokens[0] for i in range(32)]
    assert len(set(alone)) > 4
    B = 40
    for trial in range(2):
        pos = rng.permutation(B)[:32]  # where the 32 draws of the request sit
        logits = rng.normal(0, 2, (B, V)).astype(np.float32)
        params = [
            SamplingParams(temperature=float(rng.uniform(0, 2)), top_k=int(rng.integers(0, 5)))
            for _ in range(B)
        ]
        seeds, indices = list(rng.integers(0, 2**40, B)), list(rng.integers(0, 100, B))
        for i, b in enumerate(pos):
            logits[b], params[b], seeds[b], indices[b] = row, req, 77, i
        out = run(logits, params, [int(s) for s in seeds], [int(j) for j in indices], pad_to=B + 8 * trial)
        np.testing.assert_array_equal(out.tokens[pos], alone)


def test_seed_key_derivation():
    """The row key is fold_in(key(seed), sample_index); the seed's high word matters."""
    seeds = [5, 2**40 + 5, 2**63 - 1]
    sa = sampling_arrays([SamplingParams()] * 3, seeds, [3, 3, 3], 3)
    got = np.asarray(row_uniforms(sa))
    key = jax.random.key(5, impl="threefry2x32")
    assert got[0] == jax.random.uniform(jax.random.fold_in(key, 3), (), jnp.float32)
    assert len(set(got.tolist())) == 3
    np.testing.assert_array_equal(sa.seed[1], [2**8, 5])


def test_different_seeds_give_different_samples():
    row = np.zeros(V, np.float32)  # uniform distribution over 16 tokens
    a = run(np.tile(row, (64, 1)), [SamplingParams()] * 64, [1] * 64, list(range(64))).tokens
    b = run(np.tile(row, (64, 1)), [SamplingParams()] * 64, [2] * 64, list(range(64))).tokens
    assert np.mean(a != b) > 0.7


def test_padded_rows_and_extremes_stay_finite():
    logits = np.random.default_rng(5).normal(0, 30, (3, V)).astype(np.float32)
    logits[1, :5] = -np.inf  # masked vocab entries
    params = [
        SamplingParams(temperature=1e-8, top_p=0.5),
        SamplingParams(temperature=50.0, min_p=1.0),
        SamplingParams(top_k=10_000, repetition_penalty=2.0),
    ]
    out = run(logits, params, [1, 2, 3], [0, 0, 0], mask=np.ones((8, V), bool), num_logprobs=3, pad_to=8)
    for leaf in out:
        assert np.all(np.isfinite(leaf)), out
    assert out.tokens[0] == logits[0].argmax() and out.tokens[1] == logits[1].argmax()
    sa = sampling_arrays(params, [1, 2, 3], [0, 0, 0], 8)
    assert np.all(sa.temperature[3:] == 0) and np.all(sa.repetition_penalty[3:] == 1)
    with pytest.raises(ValueError, match="do not fit"):
        sampling_arrays(params, [1, 2, 3], [0, 0, 0], 2)


def test_penalty_table_scatters():
    num_slots, Vt = 4, 10
    counts = jnp.ones((num_slots, Vt), jnp.int32)
    mask = jnp.ones((num_slots, Vt), bool)
    counts, mask = reset_rows(counts, mask, jnp.array([2, 0, 3]), jnp.array([True, False, True]))
    np.testing.assert_array_equal(np.asarray(counts).sum(-1), [Vt, Vt, 0, 0])
    np.testing.assert_array_equal(np.asarray(mask).sum(-1), [Vt, Vt, 0, 0])
    slots = jnp.array([2, 2, 2, 3, 3, 2, 3])
    tokens = jnp.array([1, 4, 4, 4, 7, 9, 0])
    is_prompt = jnp.array([True, True, False, False, False, False, True])
    valid = jnp.array([True, True, True, True, True, True, False])
    counts, mask = update_counts(counts, mask, slots, tokens, is_prompt, valid)
    c, m = np.asarray(counts), np.asarray(mask)
    assert c[2, 4] == 1 and c[2, 9] == 1 and c[2].sum() == 2
    assert c[3, 4] == 1 and c[3, 7] == 1 and c[3].sum() == 2  # invalid (3, 0) dropped
    np.testing.assert_array_equal(np.flatnonzero(m[2]), [1, 4])
    assert not m[3].any()
    counts, _ = update_counts(
        counts, mask, jnp.array([2, 2]), jnp.array([9, 9]), jnp.zeros(2, bool), jnp.ones(2, bool)
    )
    assert np.asarray(counts)[2, 9] == 3  # repeats accumulate


def test_one_trace_for_any_parameter_mix():
    traces = []

    def counted(*args, **kw):
        traces.append(1)
        return sample(*args, **kw)

    fn = jax.jit(counted, static_argnames="num_logprobs")
    logits = np.random.default_rng(6).normal(size=(4, V)).astype(np.float32)
    z = np.zeros((4, V), np.int32)
    for params in (
        [SamplingParams(temperature=0.0)] * 4,
        [SamplingParams(top_k=3, top_p=0.5, min_p=0.1, seed=1)] * 4,
        [SamplingParams(repetition_penalty=1.2), SamplingParams(temperature=0.0)] * 2,
    ):
        sa = sampling_arrays(params, [2**50, 1, 2, 3], [0, 1, 2, 3], 4)
        fn(logits, sa, z, z > 0, num_logprobs=2)
    assert len(traces) == 1
    assert isinstance(sa, SamplingArrays)


# ----------------------------------------------------------------------------- bias and grammar masks
def pack_mask(allowed: np.ndarray) -> np.ndarray:
    """bool[B,V] → i32[B,W]: bit t % 32 of word t // 32, llguidance's layout."""
    B, v = allowed.shape
    bits = np.zeros((B, -(-v // 32) * 32), np.uint8)
    bits[:, :v] = allowed
    return np.packbits(bits.reshape(B, -1, 32), axis=-1, bitorder="little").view(np.int32).reshape(B, -1)


def run_masked(logits, params, allowed, seeds=None, indices=None):
    B = len(params)
    sa = sampling_arrays(params, seeds or [0] * B, indices or [0] * B, B, allow=pack_mask(allowed))
    z = np.zeros(np.shape(logits), np.int32)
    return jax.tree.map(
        np.asarray, _sample(np.asarray(logits, np.float32), sa, z, z.astype(bool), num_logprobs=0)
    )


def test_bitmask_unpacks_to_exactly_the_allowed_tokens():
    from dsv4_jax.engine.runner.sampling import allowed as unpack

    rng = np.random.default_rng(0)
    for v in (16, 33, 1024, 1006):
        a = rng.random((3, v)) < 0.3
        np.testing.assert_array_equal(np.asarray(unpack(jnp.asarray(pack_mask(a)), v)), a)


def test_masked_sampling_draws_only_allowed_tokens_in_proportion():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=V).astype(np.float32) * 2
    allowed = rng.random(V) < 0.4
    allowed[np.argmax(logits)] = False  # the free argmax is forbidden
    params = [SamplingParams(temperature=0.8, top_p=0.9)] * N_DRAWS
    out = run_masked(
        np.tile(logits, (N_DRAWS, 1)),
        params,
        np.tile(allowed, (N_DRAWS, 1)),
        [5] * N_DRAWS,
        list(range(N_DRAWS)),
    )
    assert set(out.tokens.tolist()) <= set(np.flatnonzero(allowed).tolist())
    assert_matches(out.tokens, ref_probs(np.where(allowed, logits, -np.inf), 0.8, top_p=0.9))
    greedy = run_masked(logits[None], [SamplingParams(temperature=0.0)], allowed[None])
    assert greedy.tokens[0] == np.flatnonzero(allowed)[np.argmax(logits[allowed])]
    # logprobs stay the raw model's
    np.testing.assert_allclose(
        greedy.logprob[0], logits[greedy.tokens[0]] - np.logaddexp.reduce(logits), rtol=1e-5
    )


def test_logit_bias_is_added_to_its_row_only():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(3, V)).astype(np.float32)
    params = [
        SamplingParams(temperature=0.0, logit_bias=((3, 100.0),)),
        SamplingParams(temperature=0.0, logit_bias=((int(np.argmax(logits[1])), -100.0), (0, 0.5))),
        SamplingParams(temperature=0.0),
    ]
    out = run(logits, params)
    biased = logits[1].copy()
    biased[np.argmax(logits[1])] -= 100
    biased[0] += 0.5
    assert out.tokens.tolist() == [3, int(np.argmax(biased)), int(np.argmax(logits[2]))]
    # the padded bias width is fixed: every mix of biases shares one program
    sa = sampling_arrays(params, [0] * 3, [0] * 3, 4)
    assert sa.bias_ids.shape == (4, SamplingParams.MAX_LOGIT_BIAS)
    assert sampling_arrays([SamplingParams()], [0], [0], 1).bias_ids.shape == (1, 0)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(logit_bias=((5, 101.0),)), "outside"),
        (dict(logit_bias=((5, 1.0), (5, 2.0))), "twice"),
        (dict(logit_bias=tuple((i, 1.0) for i in range(301))), "at most 300"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(prompt_logprobs=21), "prompt_logprobs"),
    ],
)
def test_sampling_params_refuse_bad_bias_and_scoring_values(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)
    SamplingParams(max_tokens=0, prompt_logprobs=0)  # scoring only is fine
