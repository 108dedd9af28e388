"""The banded sliding-window segment (``attention.window_segment``) computes what the dense
[B,T,T] mask computes: values and gradients, with T not a multiple of the window, next to
another segment and the sink. (The full forward at lengths past 4 windows takes the banded
path and is checked against the HF port in test_parity.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax.model import attention


def _case(t, window, seed=0):
    r = np.random.RandomState(seed)
    q = jnp.asarray(r.randn(2, t, 3, 8), jnp.float32)
    kv = jnp.asarray(r.randn(2, t, 8), jnp.float32)
    extra = jnp.asarray(r.randn(2, 5, 8), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (2, t))
    emask = jnp.asarray(r.rand(2, t, 5) < 0.5)
    sink = jnp.asarray(r.randn(3), jnp.float32)
    return q, kv, extra, pos, emask, sink


@pytest.mark.parametrize(
    "t,window",
    [
        (70, 16),
        (96, 8),
        pytest.param(64 + 1, 16, marks=pytest.mark.slow),
        pytest.param(129, 16, marks=pytest.mark.slow),
    ],
)
def test_banded_equals_dense(t, window):
    q, kv, extra, pos, emask, sink = _case(t, window)
    seg = attention.window_segment(kv, pos, window)
    assert seg.band == window and seg.mask.shape == (2, t, 2 * window)

    def run(q, kv, banded):
        w = (
            attention.window_segment(kv, pos, window)
            if banded
            else attention.Segment(kv, attention.window_mask(pos, pos, window))
        )
        return attention.attend(q, [w, attention.Segment(extra, emask)], sink)

    dense, banded = run(q, kv, False), run(q, kv, True)
    np.testing.assert_allclose(np.asarray(banded), np.asarray(dense), rtol=1e-5, atol=1e-5)
    # each query sees exactly min(window, pos+1) window rows
    np.testing.assert_array_equal(np.asarray(seg.mask.sum(-1)), np.minimum(window, np.asarray(pos) + 1))

    def loss(q, kv, banded):
        return jnp.sum(run(q, kv, banded) * jnp.cos(jnp.arange(8.0)))

    gd = jax.grad(loss, argnums=(0, 1))(q, kv, False)
    gb = jax.grad(loss, argnums=(0, 1))(q, kv, True)
    for a, b in zip(gb, gd):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_short_sequences_stay_dense():
    _, kv, _, pos, _, _ = _case(40, 16)
    seg = attention.window_segment(kv, pos, 16)
    assert seg.band == 0 and seg.mask.shape == (2, 40, 40)
