"""The two routed-expert paths of ``moe.routed_experts`` agree: the per-row gather (no more
(token, choice) rows than experts: small-batch decode) and the grouped ``ragged_dot``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax import init_params, moe, preset


@pytest.mark.parametrize("layer", [0, 3])  # a hash layer and a top-k layer
def test_gathered_experts_equal_ragged(layer):
    cfg = preset("tiny")
    p = init_params(cfg, jax.random.PRNGKey(1))["layers"][layer]["ffn"]
    rng = np.random.RandomState(layer)
    x = jnp.asarray(rng.standard_normal((1, 16, cfg.hidden_size)), jnp.float32)  # 16·k rows > E: ragged
    tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (1, 16)), jnp.int32)
    assert 16 * cfg.num_experts_per_tok > cfg.n_routed_experts >= 2 * cfg.num_experts_per_tok
    many = moe.moe(x, tokens, p, layer, cfg)
    few = moe.moe(x[:, :2], tokens[:, :2], p, layer, cfg)  # 2·k rows <= E: gathered
    np.testing.assert_allclose(np.asarray(few), np.asarray(many[:, :2]), rtol=1e-5, atol=1e-5)
