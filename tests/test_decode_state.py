"""The incremental state path (ARCHITECTURE.md §5.5) against the full forward.

Every state starts NaN-poisoned (pools, rings and tails), so any read of a slot the
sequence did not write itself turns the logits into NaN.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from state_utils import block_table, cache, run, step_fn
from test_parity import assert_close, setup

from dsv4_jax.intmath import cdiv
from dsv4_jax.model import state as kvc
from dsv4_jax.model.transformer import ModelOptions


def full_logits(name, tokens):
    _, params, fwd, _ = setup(name)
    return np.asarray(fwd(params, tokens[None], np.arange(len(tokens))[None]))[0]


# One cache shape per config, so the jitted steps are shared across tests.
CACHES = {
    "tiny": dict(slots=4, blocks=12, max_blocks=3, block_tokens=32),
    "tiny-pro": dict(slots=4, blocks=8, max_blocks=2, block_tokens=64),
    "tiny-shipped": dict(slots=2, blocks=6, max_blocks=3, block_tokens=128),
}


def cc_for(name, **kw):
    return cache(setup(name)[0], **{**CACHES[name], **kw})


@pytest.mark.parametrize(
    "name, length, prefill",
    [
        ("tiny", 60, 1),  # decode every position; window 16, CSA 4, HCA 8
        ("tiny", 60, 23),  # prefill mid-block, then decode across 4/8/16 boundaries
        ("tiny-pro", 70, 17),  # HCA-first pattern, ratio 16
        ("tiny-shipped", 300, 1),  # shipped ratios 4 / 128, window 128 crossed twice
        ("tiny-shipped", 300, 91),
    ],
)
def test_prefill_then_decode_equals_full_forward(name, length, prefill):
    cfg, params, _, _ = setup(name)
    tokens = np.random.RandomState(length + prefill).randint(0, cfg.vocab_size, length)
    cc = cc_for(name)
    state = kvc.init_state(cfg, cc, poison=True)
    blocks = [5, 1, 4][: cdiv(length, cc.block_tokens)]  # scattered, non-contiguous block ids
    got, _ = run(cfg, cc, params, state, tokens, [prefill] + [1] * (length - prefill), 1, blocks)
    assert_close(got, full_logits(name, tokens))


def test_chunked_prefill_at_arbitrary_boundaries():
    cfg, params, _, _ = setup("tiny-shipped")
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, 300)
    cc = cc_for("tiny-shipped")
    one, s1 = run(cfg, cc, params, kvc.init_state(cfg, cc, poison=True), tokens, [300], 0, [0, 1, 2])
    chunked, s2 = run(
        cfg, cc, params, kvc.init_state(cfg, cc, poison=True), tokens, [37, 91, 50, 122], 0, [0, 1, 2]
    )
    np.testing.assert_allclose(chunked, one, atol=2e-4 * max(1, np.abs(one).max()))
    assert_close(chunked, full_logits("tiny-shipped", tokens))
    # the state itself agrees: rings, written pool entries and tails
    for layer, (a, b) in enumerate(zip(s1.layers, s2.layers)):
        np.testing.assert_allclose(a.window[0], b.window[0], atol=1e-4)
        for key in ("cmp", "idx"):
            if getattr(a, key, None) is not None:
                pa, pb = getattr(a, key), getattr(b, key)
                n = 300 // cfg.compress_ratio(layer)
                ea = np.asarray(pa[:3]).reshape(-1, pa.shape[-1])[:n]
                eb = np.asarray(pb[:3]).reshape(-1, pb.shape[-1])[:n]
                np.testing.assert_allclose(ea, eb, atol=1e-4)
        for key in ("tail", "itail"):
            if getattr(a, key, None) is not None:
                ta, tb = getattr(a, key), getattr(b, key)
                np.testing.assert_array_equal(np.isfinite(ta.g[0]), np.isfinite(tb.g[0]))
                np.testing.assert_allclose(np.asarray(ta.k[0]), np.asarray(tb.k[0]), atol=1e-4)


def _batch_run(params, cfg, cc, seqs, lens, steps, slots, bt, state):
    """Ragged prefill of len(lens) rows (+ a padding row), then joint decode steps."""
    step = step_fn(cfg, cc)
    b, t = len(lens) + 1, 32
    tok = np.zeros((b, t), np.int64)
    for i, n in enumerate(lens):
        tok[i, :n] = seqs[i][:n]
    slots = np.array(list(slots) + [cc.num_slots], np.int32)  # padding row: no slot
    bt = np.concatenate([bt, np.zeros((1, bt.shape[1]), np.int32)])
    lg, state = step(
        params,
        tok,
        np.broadcast_to(np.arange(t), (b, t)),
        state,
        kvc.StepMeta(slots, bt, np.array(list(lens) + [0], np.int32)),
    )
    got = [[np.asarray(lg[i, :n])] for i, n in enumerate(lens)]
    for s in range(steps):
        pos = np.array([[n + s] for n in lens] + [[0]])
        tok1 = np.array([[seqs[i][n + s]] for i, n in enumerate(lens)] + [[0]])
        lg, state = step(
            params, tok1, pos, state, kvc.StepMeta(slots, bt, np.array([1] * len(lens) + [0], np.int32))
        )
        for i in range(len(lens)):
            got[i].append(np.asarray(lg[i]))
    return [np.concatenate(g) for g in got], state


def test_batch_of_different_lengths_has_no_leakage():
    """Three sequences (and a padding row) share one batch: ragged prefill, then joint decode."""
    cfg, params, _, _ = setup("tiny")
    cc = cc_for("tiny")
    rng = np.random.RandomState(3)
    lens, steps = [9, 30, 17], 12
    seqs = [rng.randint(0, cfg.vocab_size, n + steps) for n in lens]
    bt = np.stack([block_table(b, 3) for b in [[4, 7, 1], [0, 2, 9], [11, 5, 3]]])
    got, _ = _batch_run(
        params, cfg, cc, seqs, lens, steps, [3, 0, 2], bt, kvc.init_state(cfg, cc, poison=True)
    )
    for i in range(3):
        assert_close(got[i], full_logits("tiny", seqs[i]))


def test_padding_rows_write_nothing():
    """Rows with zero valid tokens (a padded bucket) leave the state untouched."""
    cfg, params, _, _ = setup("tiny")
    cc = cc_for("tiny")
    state = kvc.init_state(cfg, cc)
    before = jax.tree.map(np.asarray, state)
    seqs = [np.ones(40, np.int64)] * 3
    bt = np.stack([block_table([0, 1, 2], 3)] * 3)
    _, after = _batch_run(params, cfg, cc, seqs, [0, 0, 0], 0, [3, 0, 2], bt, state)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_greedy_generation_matches_hf_cache():
    cfg, params, _, model = setup("tiny")
    prompt = np.random.RandomState(9).randint(0, cfg.vocab_size, 21)
    with torch.no_grad():
        hf = model.generate(
            torch.from_numpy(prompt[None]),
            max_new_tokens=64,
            do_sample=False,
            use_cache=True,
            min_new_tokens=64,
        )
    want = hf[0, len(prompt) :].numpy()
    cc = cc_for("tiny")
    state = kvc.init_state(cfg, cc, poison=True)
    # min_new_tokens keeps HF from picking EOS: so do we (the same greedy rule on the same logits)
    eos = model.generation_config.eos_token_id
    pick = lambda lg: int(np.argmax(np.where(np.arange(lg.shape[-1]) == eos, -np.inf, lg[-1])))
    lg, state = run(cfg, cc, params, state, prompt, [21], 0, [2, 6, 3])
    out = [pick(lg)]
    for p in range(21, 21 + 63):
        lg, state = run(cfg, cc, params, state, np.array([out[-1]]), [1], 0, [2, 6, 3], start=p)
        out.append(pick(lg))
    np.testing.assert_array_equal(out, want)


def test_fp8_storage_is_lossless_for_qat_rounded_rows():
    """With the QAT simulation on, rows are already FP8/FP4-rounded: FP8 main + FP4 indexer
    storage then holds them exactly (as does dense bf16, which has room for both grids), and
    the logits equal dense bf16 storage."""
    cfg, params, _, _ = setup("tiny")
    opts = ModelOptions(sim_quant=True)
    tokens = np.random.RandomState(4).randint(0, cfg.vocab_size, 40)
    chunks = [13] + [1] * 27
    outs = {}
    for fmt in ("bf16", "fp8-fp4"):
        cc = cc_for("tiny", fmt=fmt, dtype=jnp.bfloat16)
        outs[fmt], _ = run(
            cfg, cc, params, kvc.init_state(cfg, cc, poison=True), tokens, chunks, 1, [1, 4], opts
        )
    np.testing.assert_allclose(outs["fp8-fp4"], outs["bf16"], atol=2e-4 * np.abs(outs["bf16"]).max())


@pytest.mark.slow  # CI time: the lossless test above covers FP8 rows in make test
def test_fp8_storage_runs_and_stays_close():
    cfg, params, _, _ = setup("tiny")
    tokens = np.random.RandomState(5).randint(0, cfg.vocab_size, 40)
    cc = cc_for("tiny", fmt="fp8")
    state = kvc.init_state(cfg, cc, poison=True)
    got, state = run(cfg, cc, params, state, tokens, [11] + [1] * 29, 0, [1, 4])
    assert np.all(np.isfinite(got))
    window = state.layers[1].window
    assert window.nope.dtype == jnp.uint8 and window.rope.dtype == jnp.uint16  # bits at rest (kv_cache)
    window = kvc.logical(window)
    assert window.nope.dtype == jnp.float8_e4m3fn and window.rope.dtype == jnp.bfloat16
    full = full_logits("tiny", tokens)
    cos = (got * full).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(full, axis=-1)
    assert cos.mean() > 0.9


def test_recompute_replay_rebuilds_exact_state_from_cached_entries():
    """SWA ``recompute`` on a prefix hit (SERVING.md §1.6): sequence B shares A's first H tokens.
    B's fresh slot replays only [H − W·L, H) over A's cached blocks (never rewriting them);
    its continuation must equal B's full forward."""
    cfg, params, _, _ = setup("tiny")
    cc = cc_for("tiny", max_blocks=5)  # block_tokens 32
    h = 128  # 4 cached blocks
    r = h - cfg.sliding_window * cfg.num_hidden_layers  # 128 - 16*6 = 32
    rng = np.random.RandomState(11)
    prefix = rng.randint(0, cfg.vocab_size, h)
    a = np.concatenate([prefix, rng.randint(0, cfg.vocab_size, 5)])
    b = np.concatenate([prefix, rng.randint(0, cfg.vocab_size, 9)])
    state = kvc.init_state(cfg, cc, poison=True)
    _, state = run(cfg, cc, params, state, a, [64, 64, 5], 0, [7, 3, 9, 1, 11])
    shared = [7, 3, 9, 1]
    before = [
        np.asarray(x)[shared] for x in jax.tree.leaves([getattr(lay, "cmp", None) for lay in state.layers])
    ]
    n = h - r
    tok = np.zeros((1, 128), np.int64)
    tok[0, :n] = b[r:h]
    bt = block_table(shared + [10], 5)[None]
    meta = kvc.StepMeta(
        np.array([2], np.int32), bt, np.array([n], np.int32), np.array([r], np.int32), np.array([h], np.int32)
    )
    _, state = step_fn(cfg, cc)(params, tok, np.arange(r, r + 128)[None], state, meta)
    after = [
        np.asarray(x)[shared] for x in jax.tree.leaves([getattr(lay, "cmp", None) for lay in state.layers])
    ]
    for x, y in zip(before, after):  # the shared blocks are never rewritten
        np.testing.assert_array_equal(x, y)
    got, _ = run(cfg, cc, params, state, b[h:], [1] * 9, 2, shared + [10], start=h)
    assert_close(got, full_logits("tiny", b)[h:])
