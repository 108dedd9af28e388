"""MXFP4 grouped matmul kernels (Pallas, interpret mode) against their references
(ARCHITECTURE.md §6, §8).

Bounds, relative to max |reference|: f32 activations 1e-5 (dequantized weights are exact,
only accumulation order differs); bf16 activations 1e-5 for the f32 down projection and
8e-3 (one bf16 ulp) for the fused gate/up, whose output is rounded to bf16.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import mxfp4
from pallas_kernels.mxfp4_matmul import kernel as K
from pallas_kernels.mxfp4_matmul import reference as R

E, D, F = 8, 128, 64
TUNE = dict(block_m=16, block_n=32, block_k=64, interpret=True)


def _weights(seed, shape, scale=1.0):
    rng = np.random.default_rng(seed)
    return mxfp4.quantize(jnp.asarray(rng.standard_normal(shape).astype(np.float32) * scale))


W1, W3, W2 = _weights(1, (E, F, D)), _weights(3, (E, F, D)), _weights(2, (E, D, F))


def _close(out, ref, rel):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, atol=rel * np.abs(ref).max(), rtol=0)


# Empty experts, a group longer than a tile, single-row groups, padding rows at the end
# (M > sum of sizes), and M smaller than one tile.
@pytest.mark.parametrize("sizes,m", [([3, 0, 17, 1, 0, 0, 5, 2], 32), ([0, 0, 0, 2, 0, 1, 0, 0], 5)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_grouped_matmul(sizes, m, dtype):
    x = jnp.asarray(np.random.default_rng(m).standard_normal((m, D)), dtype)
    sizes = jnp.asarray(sizes, jnp.int32)
    out = K.mxfp4_grouped_matmul(x, W1, sizes, **TUNE)
    ref = R.mxfp4_grouped_matmul_reference(x, W1, sizes)
    assert out.shape == (m, F) and out.dtype == jnp.float32
    _close(out, ref, 1e-5)
    assert np.all(np.asarray(out)[int(sizes.sum()) :] == 0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_swiglu_clamps(dtype):
    m = 24
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((m, D)) * 2.0, dtype)  # |x@w| reaches well past the limit
    sizes = jnp.asarray([4, 4, 0, 9, 1, 0, 3, 0], jnp.int32)
    rw = jnp.asarray(rng.random(m).astype(np.float32))
    out = K.mxfp4_swiglu(x, W1, W3, sizes, rw, limit=10.0, **TUNE)
    ref = R.mxfp4_swiglu_reference(x, W1, W3, sizes, rw, limit=10.0)
    assert out.dtype == dtype
    _close(out, ref, 1e-5 if dtype == jnp.float32 else 8e-3)
    gate = np.asarray(R.mxfp4_grouped_matmul_reference(x, W1, sizes))
    assert gate.max() > 10 and gate.min() < -10  # both clamp branches are exercised
    unclamped = R.swiglu_clamped(gate, np.asarray(R.mxfp4_grouped_matmul_reference(x, W3, sizes)), 1e9)
    assert np.abs(np.asarray(ref, np.float32) - np.asarray(unclamped * rw[:, None])).max() > 1.0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_moe_experts(dtype):
    n, k = 7, 2
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.standard_normal((n, D)), dtype)
    idx = jnp.asarray(np.stack([rng.permutation(E)[:k] for _ in range(n)]), jnp.int32)
    w = jnp.asarray(rng.random((n, k)).astype(np.float32))
    out = K.moe_experts(x, idx, w, W1, W2, W3, limit=10.0, **TUNE)
    ref = R.moe_experts_reference(x, idx, w, W1, W2, W3, limit=10.0)
    _close(out, ref, 1e-5 if dtype == jnp.float32 else 1e-2)


def test_tile_schedule_covers_every_row_once():
    sizes = jnp.asarray([3, 0, 17, 1, 0, 0, 5, 2], jnp.int32)
    meta = np.asarray(K.tile_schedule(sizes, 40, 16, 4))
    covered = np.zeros(40, int)
    for g, r0, r1, ks in meta.T:
        covered[r0:r1] += 1
        if r1 > r0:
            assert r1 - r0 <= 16 and ((ks == 4 and r1 <= 28) or (ks == 0 and r0 >= 28))
            if ks:  # a tile never straddles two experts
                assert np.all(np.repeat(np.arange(8), np.asarray(sizes))[r0:r1] == g)
    np.testing.assert_array_equal(covered, 1)


def test_validation_names_the_argument():
    x = jnp.ones((4, D))
    with pytest.raises(ValueError, match="group_sizes"):
        K.mxfp4_grouped_matmul(x, W1, jnp.ones((3,), jnp.int32), **TUNE)
    with pytest.raises(ValueError, match="x: in dim"):
        R.mxfp4_grouped_matmul_reference(jnp.ones((4, 64)), W1, jnp.ones((E,), jnp.int32))
    with pytest.raises(ValueError, match="block_k"):
        K.mxfp4_grouped_matmul(x, W1, jnp.ones((E,), jnp.int32), block_k=48, interpret=True)
    with pytest.raises(ValueError, match="row_weights"):
        K.mxfp4_swiglu(x, W1, W3, jnp.ones((E,), jnp.int32), jnp.ones((3,)), limit=10.0, **TUNE)
    with pytest.raises(ValueError, match="w1/w3/w2"):
        R.moe_experts_reference(x, jnp.zeros((4, 2), jnp.int32), jnp.ones((4, 2)), W1, W1, W3, limit=10.0)
