"""Primitives of ARCHITECTURE.md §2 and §4 against hand-computed values and the HF port."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hfm

from dsv4_jax.bench.hf_port import hf_config
from dsv4_jax.config import preset
from dsv4_jax.model import mhc as hc
from dsv4_jax.model import ops


def test_rms_norm_matches_formula():
    x = np.random.RandomState(0).randn(3, 5, 16).astype(np.float32)
    w = np.random.RandomState(1).randn(16).astype(np.float32)
    want = w * x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(ops.rms_norm(x, w, 1e-6), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ops.rms_norm(x, None, 1e-6), want / w, rtol=1e-5, atol=1e-6)


def test_rope_is_interleaved_complex_rotation_on_trailing_dims():
    rng = np.random.RandomState(0)
    x = rng.randn(2, 3, 4, 32).astype(np.float32)  # [B,T,H,K], rope dim 8
    pos = np.array([[0, 5, 17], [3, 100, 300]])  # f32 angles, as the reference computes them
    inv = np.array([1.0, 0.3, 0.01, 1e-4], np.float32)
    cos, sin = ops.rope_angles(jnp.asarray(pos), inv)
    y = np.asarray(ops.apply_rope(x, cos[:, :, None], sin[:, :, None]))
    np.testing.assert_array_equal(y[..., :24], x[..., :24])  # nope dims untouched
    z = x[..., 24::2] + 1j * x[..., 25::2]
    rot = z * np.exp(1j * pos[:, :, None, None] * inv.astype(np.float64))
    np.testing.assert_allclose(y[..., 24::2], rot.real, atol=2e-4)
    np.testing.assert_allclose(y[..., 25::2], rot.imag, atol=2e-4)
    back = ops.apply_rope(y, cos[:, :, None], sin[:, :, None], inverse=True)
    np.testing.assert_allclose(back, x, atol=1e-5)


def test_yarn_ramp_for_the_shipped_values():
    c = preset("flash")
    base = 1.0 / (160000.0 ** (np.arange(0, 64, 2) / 64))
    inv = ops.rope_inv_freq(c, compressed=True)
    np.testing.assert_allclose(inv[:16], base[:16], rtol=1e-6)  # i <= 15 unchanged
    np.testing.assert_allclose(inv[25:], base[25:] / 16, rtol=1e-6)  # i >= 25 divided by 16
    assert np.all((inv[16:25] < base[16:25]) & (inv[16:25] > base[16:25] / 16))
    plain = ops.rope_inv_freq(c, compressed=False)  # SWA layers: θ = 10000, no YaRN
    np.testing.assert_allclose(plain, 1.0 / (10000.0 ** (np.arange(0, 64, 2) / 64)), rtol=1e-6)


@pytest.mark.parametrize("name", ["flash", "tiny", "tiny-shipped", "tiny-pro"])
def test_rope_tables_match_hf(name):
    cfg = preset(name)
    rot = hfm.DeepseekV4RotaryEmbedding(hf_config(cfg))
    np.testing.assert_allclose(ops.rope_inv_freq(cfg, False), rot.main_inv_freq.numpy(), rtol=1e-6)
    np.testing.assert_allclose(ops.rope_inv_freq(cfg, True), rot.compress_inv_freq.numpy(), rtol=1e-6)
    assert rot.compress_attention_scaling == 1.0  # no YaRN mscale


def test_rope_application_matches_hf():
    x = torch.randn(2, 3, 7, 64)  # [B,H,T,K]
    pos = torch.tensor([[0, 1, 2, 40, 41, 1000, 4000]] * 2)
    inv = ops.rope_inv_freq(preset("tiny"), True)
    ang = pos[..., None].float() * torch.from_numpy(inv)
    want = hfm.apply_rotary_pos_emb(x, ang.cos(), ang.sin())
    cos, sin = ops.rope_angles(jnp.asarray(pos.numpy()), inv)
    got = ops.apply_rope(jnp.asarray(x.numpy()).transpose(0, 2, 1, 3), cos[:, :, None], sin[:, :, None])
    np.testing.assert_allclose(np.asarray(got).transpose(0, 2, 1, 3), want.numpy(), atol=2e-5)


def test_hadamard_is_orthonormal():
    rng = np.random.RandomState(0)
    q, k = rng.randn(5, 128).astype(np.float32), rng.randn(7, 128).astype(np.float32)
    hq, hk = ops.hadamard(q), ops.hadamard(k)
    np.testing.assert_allclose(hq @ hk.T, q @ k.T, rtol=1e-4, atol=1e-4)  # cancels inside q·k
    np.testing.assert_allclose(ops.hadamard(hq), q, atol=1e-5)
    with pytest.raises(ValueError, match="power of two"):
        ops.hadamard(np.zeros((2, 96), np.float32))


def test_fp4_sim_hand_values():
    x = np.zeros((1, 32), np.float32)
    x[0, :6] = [1.0, 2.9, -6.0, 0.2, 0.3, 4.9]  # amax 6 -> scale 1
    y = np.asarray(ops.fp4_sim(x, 32))
    np.testing.assert_array_equal(y[0, :6], [1.0, 3.0, -6.0, 0.0, 0.5, 4.0])
    x2 = x * 0.25  # amax 1.5 -> scale 2^ceil(log2(0.25)) = 0.25: same grid, scaled
    np.testing.assert_array_equal(np.asarray(ops.fp4_sim(x2, 32)), y * 0.25)


def test_fp8_sim_properties():
    rng = np.random.RandomState(0)
    x = (rng.randn(4, 256) * np.exp(rng.randn(4, 1) * 3)).astype(np.float32)
    y = np.asarray(ops.fp8_sim(x, 128))
    np.testing.assert_array_equal(np.asarray(ops.fp8_sim(y, 128)), y)  # idempotent
    for blk in range(2):
        xb, yb = x[:, blk * 128 : (blk + 1) * 128], y[:, blk * 128 : (blk + 1) * 128]
        s = 2.0 ** np.ceil(np.log2(np.abs(xb).max(-1, keepdims=True) / 448))
        q = yb / s  # representable in e4m3 after the power-of-two scale
        np.testing.assert_array_equal(q.astype(jnp.float8_e4m3fn).astype(np.float32), q)
        assert np.all(np.abs(yb - xb) <= np.abs(xb) * 2**-4 + s * 2**-9)
    row = rng.randn(3, 64).astype(np.float32)
    out = np.asarray(ops.fp8_sim_nope(row, 16))
    np.testing.assert_array_equal(out[:, 48:], row[:, 48:])  # RoPE dims stay exact
    assert not np.array_equal(out[:, :48], row[:, :48])


def test_sinkhorn_is_doubly_stochastic_and_matches_hf():
    cfg = preset("tiny")
    rng = np.random.RandomState(0)
    x = rng.randn(2, 3, 4, cfg.hidden_size).astype(np.float32)
    fn = (rng.randn(24, 4 * cfg.hidden_size) / 20).astype(np.float32)
    base, scale = rng.randn(24).astype(np.float32), (0.5 + rng.rand(3)).astype(np.float32)
    pre, post, comb = (np.asarray(a) for a in hc.hc_weights(jnp.asarray(x), fn, base, scale, cfg))
    np.testing.assert_allclose(comb.sum(-1), 1.0, atol=1e-3)
    np.testing.assert_allclose(comb.sum(-2), 1.0, atol=1e-5)
    mod = hfm.DeepseekV4HyperConnection(hf_config(cfg))
    with torch.no_grad():
        mod.fn.copy_(torch.from_numpy(fn)), mod.base.copy_(torch.from_numpy(base))
        mod.scale.copy_(torch.from_numpy(scale))
        hpost, hcomb, hcollapsed = mod(torch.from_numpy(x))
    np.testing.assert_allclose(post, hpost.numpy(), atol=1e-5)
    np.testing.assert_allclose(comb, hcomb.numpy(), atol=1e-5)
    np.testing.assert_allclose(hc.collapse(jnp.asarray(x), pre), hcollapsed.numpy(), atol=1e-4)
    # the new stream k sums over C's first index: X'_k = post_k z + sum_j C[j,k] X_j
    z = rng.randn(2, 3, cfg.hidden_size).astype(np.float32)
    want = post[..., None] * z[:, :, None] + np.einsum("btjk,btjd->btkd", comb, x)
    np.testing.assert_allclose(hc.expand(jnp.asarray(x), z, post, comb), want, atol=1e-4)
