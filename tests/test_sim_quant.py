"""The optional simulation of the reference's FP8/FP4 rounding (ARCHITECTURE.md §2)."""

import jax
import jax.numpy as jnp
import numpy as np
from test_parity import setup

from dsv4_jax.model import attention, compressor, ops
from dsv4_jax.model.transformer import ModelOptions, forward


def test_sim_quant_rounds_kv_and_indexer_onto_their_grids():
    cfg, params, _, _ = setup("tiny")
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 24, cfg.hidden_size))
    pos = jnp.arange(24)[None]
    p = params["layers"][1]["attn"]
    kv = attention.project_kv(x, p, pos, cfg, True, sim_quant=True)
    r = cfg.qk_rope_head_dim
    np.testing.assert_array_equal(ops.fp8_sim_nope(kv, r), kv)  # nope dims already FP8
    assert not np.array_equal(attention.project_kv(x, p, pos, cfg, True), kv)
    main = compressor.compress_sequence(x, p["compressor"], 4, cfg, sim_quant=True)
    np.testing.assert_array_equal(ops.fp8_sim_nope(main, r), main)
    keys = compressor.compress_sequence(x, p["indexer"]["compressor"], 4, cfg, indexer=True, sim_quant=True)
    np.testing.assert_array_equal(ops.fp4_sim(keys, 32), keys)  # Hadamard-rotated FP4 keys
    plain = compressor.compress_sequence(x, p["indexer"]["compressor"], 4, cfg, indexer=True)
    # the Hadamard rotation preserves norms up to the FP4 rounding
    np.testing.assert_allclose(jnp.linalg.norm(keys, axis=-1), jnp.linalg.norm(plain, axis=-1), rtol=0.2)


def test_sim_quant_model_stays_close():
    cfg, params, fwd, _ = setup("tiny")
    tokens = np.random.RandomState(2).randint(0, cfg.vocab_size, (1, 48))
    pos = np.arange(48)[None]
    exact = np.asarray(fwd(params, tokens, pos))
    sim = jax.jit(lambda p, t, q: forward(p, t, q, cfg=cfg, opts=ModelOptions(sim_quant=True))[0])
    rounded = np.asarray(sim(params, tokens, pos))
    assert np.all(np.isfinite(rounded)) and not np.allclose(rounded, exact, atol=1e-4)
    # A random tiny model amplifies rounding (top-k picks flip), so bound the drift loosely.
    cos = (rounded * exact).sum(-1) / np.linalg.norm(rounded, axis=-1) / np.linalg.norm(exact, axis=-1)
    assert cos.mean() > 0.9, cos.mean()
