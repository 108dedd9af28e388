"""The demo's training pieces (``dsv4_jax.train``): the indexer KL hook, the loss, the weight
rounding the checkpoint applies, and the needle data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax.checkpoint import load_tokenizer
from dsv4_jax.config import preset
from dsv4_jax.model.params import init_params
from dsv4_jax.model.transformer import forward
from dsv4_jax.quant import QuantizedWeight
from dsv4_jax.train import data
from dsv4_jax.train import loss as L

DEMO = "checkpoints/demo"


@pytest.fixture(scope="module")
def tiny():
    cfg = preset("tiny")
    return cfg, init_params(cfg, jax.random.PRNGKey(0))


def _csa_layers(cfg):
    return [i for i in range(cfg.num_hidden_layers) if cfg.attn_kind(i) == "csa"]


def test_taps_leave_the_forward_unchanged_and_expose_each_csa_layer(tiny):
    cfg, params = tiny
    assert _csa_layers(cfg), "the tiny preset has a CSA layer"
    t = 40
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, t), 0, cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(t), (2, t))
    plain, _ = forward(params, tokens, pos, cfg=cfg)
    taps = []
    tapped, _ = forward(params, tokens, pos, cfg=cfg, taps=taps)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(tapped))
    assert len(taps) == len(_csa_layers(cfg))
    ratio = taps[0]["ratio"]
    assert taps[0]["scores"].shape == (2, t, t // ratio)
    assert taps[0]["entries"].shape[:2] == (2, t // ratio)


def test_indexer_kl_is_zero_at_the_target_and_positive_elsewhere():
    rng = np.random.RandomState(0)
    b, t, h, k, c, ratio = 1, 16, 2, 8, 4, 4
    q = jnp.asarray(rng.standard_normal((b, t, h, k)), jnp.float32)
    entries = jnp.asarray(rng.standard_normal((b, c, k)), jnp.float32)
    pos = jnp.arange(t)[None]
    # The target: Σ_h softmax over the visible entries, normalised; as log-scores it is exact.
    logits = jnp.einsum("bthk,bck->bthc", q, entries) * k**-0.5
    visible = jnp.arange(c)[None, None, :] < ((pos + 1) // ratio)[..., None]
    p = jax.nn.softmax(jnp.where(visible[:, :, None], logits, -jnp.inf), -1)
    p = jnp.nan_to_num(p).sum(2)
    target = jnp.log(jnp.maximum(p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30), 1e-30))
    tap = {"q": q, "entries": entries, "ratio": ratio}
    assert float(L.indexer_kl({**tap, "scores": target}, pos)) == pytest.approx(0.0, abs=1e-5)
    assert float(L.indexer_kl({**tap, "scores": jnp.zeros((b, t, c))}, pos)) > 1e-3


def test_indexer_kl_trains_only_the_indexer(tiny):
    cfg, params = tiny
    trainable, frozen = L.split(params)
    formats = L.storage_formats(cfg)
    lf = L.make_loss(cfg, frozen, formats, kl_weight=1.0)
    t = 33
    toks = jax.random.randint(jax.random.PRNGKey(2), (1, t + 1), 0, cfg.vocab_size)
    zeros = jnp.zeros((1, t))
    # With both CE masks zero only the KL remains: its gradient reaches the indexer alone.
    g = jax.grad(lambda tr: lf(tr, toks, zeros, zeros, zeros)[0])(trainable)
    layer = _csa_layers(cfg)[0]
    gl = g["layers"][layer]["attn"]
    assert float(optax_norm(gl["indexer"])) > 0
    others = {k: v for k, v in gl.items() if k != "indexer"}
    assert float(optax_norm(others)) == 0.0
    assert float(optax_norm(g["embed"])) == 0.0


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


@pytest.mark.parametrize(
    "fmt,block,shape", [("fp8", (128, 128), (256, 384)), ("mxfp4", (1, 32), (2, 64, 128))]
)
def test_fake_quant_is_what_the_checkpoint_stores(fmt, block, shape):
    w = np.random.RandomState(0).standard_normal(shape).astype(np.float32) * 0.05
    want = QuantizedWeight.quantize(w, fmt, block).dequantize(np.float32)
    got = L.fake_quant(jnp.asarray(w), (fmt, block))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # Straight-through: the gradient of the rounding is the identity.
    g = jax.grad(lambda x: jnp.sum(L.fake_quant(x, (fmt, block)) * 3.0))(jnp.asarray(w))
    np.testing.assert_array_equal(np.asarray(g), np.full(shape, 3.0, np.float32))


@pytest.fixture(scope="module")
def corpus():
    tok = load_tokenizer(DEMO)
    return data.Corpus.build(tok), tok


def test_needle_sample_places_one_needle_at_the_depth(corpus):
    c, tok = corpus
    v = int(c.values[3])
    for depth in (0.0, 0.5, 1.0):
        seq, vi = c.needle_sample(np.random.RandomState(0), 1024, depth, v, split="eval")
        assert len(seq) == 1024 and seq[vi] == v
        assert list(seq[vi - len(c.needle) : vi]) == list(c.needle)
        assert list(seq[-len(c.question) :]) == list(c.question)
        hay = 1024 - len(c.needle) - 2 - len(c.question)
        assert vi - len(c.needle) == round(depth * hay)
    assert tok.decode(list(c.question)) == data.QUESTION
    assert len(set(c.values.tolist())) == data.NUM_VALUES
    assert all(tok.encode(tok.decode([int(x)])).ids == [int(x)] for x in c.values)


def test_train_batch_is_deterministic_and_masks_the_answer(corpus):
    c, _ = corpus
    a = data.train_batch(c, np.random.RandomState(5), 4, 256, 1.0)
    b = data.train_batch(c, np.random.RandomState(5), 4, 256, 1.0)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    toks, text, answer, source = a
    assert toks.shape == (4, 257) and answer[:, -1].tolist() == [1.0] * 4 and answer[:, :-1].sum() == 0
    assert set(toks[:, -1].tolist()) <= set(c.values.tolist())
    assert (text[:, -1] == 0).all() and (text.sum(1) == 256 - 2).all()
    # The source mask marks the needle's value (the one answer ends the row, past the inputs).
    assert (source.sum(1) == 1).all()
    for b in range(4):
        assert toks[b, np.argmax(source[b])] == toks[b, -1]


def test_train_batch_keeps_questions_beyond_the_window(corpus):
    c, _ = corpus
    rng = np.random.RandomState(1)
    far = rows = 0
    for _ in range(10):
        toks, _, answer, source = data.train_batch(c, rng, 4, 512, 1.0, 3, 0.0, 140)
        for b in range(4):
            asked = np.nonzero(answer[b])[0] + 1  # token index of each answer
            src = np.nonzero(source[b])[0]
            assert (toks[b, asked] == toks[b, src[0]]).all()  # every answer is the needle's value
            assert list(src) == [src[0], *[a for a in asked if a < 512]]  # earlier answers are sources
            gaps = np.diff([src[0], *asked])
            rows += 1
            far += bool(gaps.min() > 140 + len(c.question))
    # A share P_FAR of the rows keeps every question min_gap tokens on; the others may not.
    assert 0.6 * rows <= far < rows


def _hint_tap(q_to: int | None):
    """A CSA tap with C=8 entries of ratio 4 over 32 tokens; the queries equal entry ``q_to``
    scaled up (all heads), or are random."""
    rng = np.random.RandomState(0)
    b, t, h, k, c = 1, 32, 2, 16, 8
    entries = rng.standard_normal((b, c, k)).astype(np.float32)
    if q_to is None:
        q = rng.standard_normal((b, t, h, k)).astype(np.float32)
    else:
        q = np.broadcast_to(entries[:, q_to][:, None, None, :] * 8.0, (b, t, h, k)).copy()
    return {"q": jnp.asarray(q), "entries": jnp.asarray(entries), "ratio": 4, "scores": None}


def test_retrieval_hint_rewards_attention_on_the_needles_entries():
    pos = jnp.arange(32)[None]
    source = np.zeros((1, 32), np.float32)
    source[0, 9] = 1.0  # the value sits in block 2: entries 2 and 3 (overlap) hold it
    answer = np.zeros((1, 32), np.float32)
    answer[0, 30] = 1.0  # sees entries 0..6
    on = float(L.retrieval_hint(_hint_tap(3), pos, jnp.asarray(answer), jnp.asarray(source)))
    off = float(L.retrieval_hint(_hint_tap(5), pos, jnp.asarray(answer), jnp.asarray(source)))
    rand = float(L.retrieval_hint(_hint_tap(None), pos, jnp.asarray(answer), jnp.asarray(source)))
    assert on < 0.05 and off > 3.0 and 0.3 < rand < 3.0
    # An answer that sees no entry holding the value contributes nothing.
    early = np.zeros((1, 32), np.float32)
    early[0, 10] = 1.0  # sees entries 0..1 only
    assert float(L.retrieval_hint(_hint_tap(5), pos, jnp.asarray(early), jnp.asarray(source))) == 0.0


@pytest.mark.slow  # CI time: make test-slow
def test_retrieval_hint_trains_the_main_attention_not_the_indexer(tiny):
    cfg, params = tiny
    trainable, frozen = L.split(params)
    lf = L.make_loss(cfg, frozen, L.storage_formats(cfg), kl_weight=0.0, hint_weight=1.0)
    t = 64
    toks = jax.random.randint(jax.random.PRNGKey(3), (1, t + 1), 0, cfg.vocab_size)
    zeros = jnp.zeros((1, t))
    answer = zeros.at[0, t - 1].set(1.0)
    source = zeros.at[0, 5].set(1.0)
    (total, m), g = jax.value_and_grad(lambda tr: lf(tr, toks, zeros, answer, source), has_aux=True)(
        trainable
    )
    assert float(m["hint"]) > 0 and float(total) == pytest.approx(
        float(m["hint"]) + float(m["answer"]), rel=1e-5
    )
    attn = g["layers"][_csa_layers(cfg)[0]]["attn"]
    assert float(optax_norm(attn["wq_b"])) > 0 and float(optax_norm(attn["compressor"])) > 0
    assert float(optax_norm(attn["indexer"])) == 0.0
