"""End-to-end parity: the JAX forward equals the HF port in float32 (live oracle).

Tolerance (HF_ORACLE.md §8.9): max |Δlogits| <= 2e-4 · max(1, max|logits|), and equal
argmax at every position. Weights are random at unit scale with non-degenerate
buffers (``init_params``). Each case also checks, from the HF side, that no exact tie
sits at a top-k boundary of the lightning indexer, which would make any two correct
implementations disagree.
"""

import functools

import jax
import numpy as np
import pytest
import torch

from dsv4_jax.bench.hf_port import hf_logits, hf_model
from dsv4_jax.config import preset
from dsv4_jax.model.params import init_params
from dsv4_jax.model.transformer import forward


@functools.cache
def setup(name: str, seed: int = 0):
    cfg = preset(name)
    params = init_params(cfg, jax.random.PRNGKey(seed))
    fwd = jax.jit(lambda p, t, q: forward(p, t, q, cfg=cfg)[0])
    return cfg, params, fwd, hf_model(cfg, params)


def assert_close(got, want):
    got, want = np.asarray(got), np.asarray(want)
    tol = 2e-4 * max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert err <= tol, f"max |Δlogits| = {err:.3g} > {tol:.3g}"
    agree = (got.argmax(-1) == want.argmax(-1)).mean()
    assert agree == 1.0, f"argmax agreement {agree:.3f}"


def assert_no_topk_boundary_ties(model, cfg, tokens):
    """Capture every CSA layer's raw index scores and check the k-th/(k+1)-th gap."""
    scores = []
    hooks = [
        layer.self_attn.compressor.indexer.scorer.register_forward_hook(lambda m, a, out: scores.append(out))
        for layer in model.model.layers
        if hasattr(getattr(layer.self_attn, "compressor", None), "indexer")
    ]
    try:
        hf_logits(model, tokens)
    finally:
        for h in hooks:
            h.remove()
    assert scores, "no CSA layer ran"
    m = cfg.compress_rate_csa
    for s in scores:
        s = s.numpy()  # [B,T,C]
        for t in range(s.shape[1]):
            visible = (t + 1) // m
            if visible <= cfg.index_topk:
                continue  # every visible entry is picked: no boundary
            v = np.sort(s[:, t, :visible], axis=-1)[:, ::-1]
            gap = v[:, cfg.index_topk - 1] - v[:, cfg.index_topk]
            assert np.all(gap > 1e-5 * np.maximum(1.0, np.abs(v[:, 0]))), f"top-k tie at query {t}"


# (config, tokens, seed of the random tokens). A seed whose scores tie at the indexer's top-k
# boundary would let the two implementations legitimately pick different entries, so each
# seed is one the tie guard below accepts under init_params(PRNGKey(0)) (300 tokens: seed 300
# ties at query 234, 2e-6 apart).
CASES = [
    ("tiny", 41, 41),
    ("tiny", 70, 70),  # window 16, CSA 4, HCA 8, YaRN
    ("tiny-pro", 37, 37),
    ("tiny-pro", 100, 100),  # Pro's pattern: HCA first, 3 hash layers
    ("tiny-shipped", 60, 60),
    ("tiny-shipped", 300, 301),  # shipped ratios 4/128, window 128: > 2x128 tokens
]


@pytest.mark.parametrize("name, length, seed", CASES)
def test_logits_match_hf(name, length, seed):
    cfg, params, fwd, model = setup(name)
    tokens = np.random.RandomState(seed).randint(0, cfg.vocab_size, (2, length))
    positions = np.broadcast_to(np.arange(length), tokens.shape)
    want = hf_logits(model, tokens)
    assert_close(fwd(params, tokens, positions), want)
    assert_no_topk_boundary_ties(model, cfg, tokens)


def test_shipped_ratios_produce_hca_entries():
    """The 300-token case really exercises HCA: its compressor emits 2 entries."""
    cfg, _, _, model = setup("tiny-shipped")
    seen = []
    layer = next(l for i, l in enumerate(model.model.layers) if cfg.attn_kind(i) == "hca")
    h = layer.self_attn.compressor.register_forward_hook(lambda m, a, out: seen.append(out[0].shape[2]))
    try:
        hf_logits(model, np.zeros((1, 300), np.int64))
    finally:
        h.remove()
    assert seen == [2]


def test_batch_rows_are_independent():
    cfg, params, fwd, _ = setup("tiny")
    rng = np.random.RandomState(5)
    tokens = rng.randint(0, cfg.vocab_size, (3, 33))
    positions = np.broadcast_to(np.arange(33), tokens.shape)
    full = np.asarray(fwd(params, tokens, positions))
    solo = np.asarray(fwd(params, tokens[1:2], positions[1:2]))
    np.testing.assert_allclose(full[1:2], solo, atol=2e-5)


def test_a_broken_component_is_caught():
    """Sanity check of the harness itself: perturb one weight and parity must fail."""
    cfg, params, fwd, model = setup("tiny")
    tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, (1, 41))
    positions = np.arange(41)[None]
    bad = jax.tree.map(lambda x: x, params)
    bad["layers"][2]["attn"]["compressor"]["ape"] = bad["layers"][2]["attn"]["compressor"]["ape"] * 1.01
    with pytest.raises(AssertionError):
        assert_close(fwd(bad, tokens, positions), hf_logits(model, tokens))
    assert torch.get_num_threads() >= 1
