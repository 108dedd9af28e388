"""Codecs of pallas_kernels.mxfp4 and pallas_kernels.kv_format, and the in-kernel decoders
of pallas_kernels._common against them (ARCHITECTURE.md §8, §10.1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax.model import ops
from pallas_kernels import _common as cm
from pallas_kernels import kv_format as kf
from pallas_kernels import mxfp4


def _normal(seed, shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale)


def test_nibble_order_and_table():
    codes = np.arange(16, dtype=np.uint8)
    packed = jnp.asarray(codes[0::2] | (codes[1::2] << 4))  # low nibble = even element
    np.testing.assert_array_equal(np.asarray(mxfp4.unpack(packed)), mxfp4.E2M1_VALUES)
    np.testing.assert_array_equal(np.asarray(mxfp4.pack(jnp.asarray(mxfp4.E2M1_VALUES))), np.asarray(packed))


def test_in_kernel_decoders_match_bitcast_decoders():
    every_byte = jnp.arange(256, dtype=jnp.int32).astype(jnp.uint8)
    tile = cm.unpack_fp4_tile(every_byte.reshape(16, 16))
    np.testing.assert_array_equal(np.asarray(tile).reshape(-1), np.asarray(mxfp4.unpack(every_byte)))
    e = jnp.arange(1, 255, dtype=jnp.int32).astype(jnp.uint8)
    np.testing.assert_array_equal(np.asarray(cm.e8m0_to_f32(e)), np.exp2(np.arange(1, 255) - 127.0))
    np.testing.assert_array_equal(np.asarray(mxfp4.e8m0_decode(e)), np.exp2(np.arange(1, 255) - 127.0))
    ml = np.asarray(jnp.asarray([0, 255], jnp.uint8).view(jnp.float8_e8m0fnu).astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(mxfp4.e8m0_decode(jnp.asarray([0, 255], jnp.uint8))), ml)


def test_mxfp4_matches_model_fp4_sim_and_is_idempotent():
    x = _normal(0, (6, 96), 3.0)
    x = x.at[0, :32].set(0.0)  # an all-zero block keeps a valid scale byte
    w = mxfp4.quantize(x)
    assert w.packed.shape == (6, 48) and w.scale.shape == (6, 3) and w.shape == (6, 96)
    assert int(jnp.min(w.scale)) >= 1 and mxfp4.nbytes(w) == 6 * (48 + 3)
    d = mxfp4.dequantize(w)
    np.testing.assert_array_equal(np.asarray(d), np.asarray(ops.fp4_sim(x, 32)))
    np.testing.assert_array_equal(np.asarray(mxfp4.dequantize(mxfp4.quantize(d))), np.asarray(d))
    rel = float(jnp.linalg.norm(d - x) / jnp.linalg.norm(x))
    assert 0.05 < rel < 0.2  # e2m1 with per-32 scales: ~0.115 on Gaussian data (TOOLCHAIN.md §5)


def test_bytes_per_row():
    assert kf.bytes_per_row("bf16", 512) == 1024
    assert kf.bytes_per_row("fp8_ds_mla", 512, 64) == 584
    assert kf.bytes_per_row("indexer_fp8", 128) == 132
    assert kf.bytes_per_row("indexer_fp4", 128) == 68
    assert kf.bytes_per_row("bf16", 128) == 256
    assert kf.bytes_per_row("fp8_ds_mla", 64, 16) == 48 + 32 + 8
    with pytest.raises(ValueError, match="unknown fmt"):
        kf.bytes_per_row("fp6")


@pytest.mark.parametrize("dim,rope", [(512, 64), (64, 16)])
def test_fp8_kv_rows_round_trip(dim, rope):
    x = _normal(1, (5, 3, dim), 2.0).astype(jnp.bfloat16)
    rows = kf.quantize_kv(x, rope)
    nope = dim - rope
    assert rows.nope.shape == (5, 3, nope) and rows.rope.shape == (5, 3, rope)
    assert rows.scale.shape == (5, 3, kf.kv_scale_bytes(nope)) and rows.shape == (5, 3, dim)
    assert kf.nbytes(rows) == 15 * kf.bytes_per_row("fp8_ds_mla", dim, rope)
    nblk = -(-nope // 64)
    assert int(jnp.max(rows.scale[..., nblk:])) == 0  # padding bytes
    d = kf.dequantize_kv(rows, jnp.bfloat16)
    # Same rounding as the model's QAT simulation, and a fixed point of the codec.
    np.testing.assert_array_equal(
        np.asarray(d, np.float32), np.asarray(ops.fp8_sim_nope(x, rope), np.float32)
    )
    np.testing.assert_array_equal(
        np.asarray(kf.dequantize_kv(kf.quantize_kv(d, rope)), np.float32), np.asarray(d, np.float32)
    )
    np.testing.assert_array_equal(np.asarray(d[..., nope:]), np.asarray(x[..., nope:]))  # rope dims exact
    err = np.abs(np.asarray(d, np.float32) - np.asarray(x, np.float32))[..., :nope]
    assert err.max() <= 2.0**-4 * np.abs(np.asarray(x, np.float32)).max() + 1e-6  # e4m3: 3 mantissa bits


@pytest.mark.parametrize("fmt,rel_bound", [("bf16", 4e-3), ("fp8", 0.04), ("fp4", 0.2)])
def test_indexer_key_formats(fmt, rel_bound):
    x = _normal(2, (4, 8, 128))
    keys = kf.quantize_indexer_keys(x, fmt)
    name = "bf16" if fmt == "bf16" else f"indexer_{fmt}"
    assert kf.format_of(keys) == name and keys.shape == (4, 8, 128)
    assert kf.nbytes(keys) == 32 * kf.bytes_per_row(name, 128)
    d = kf.dequantize_indexer_keys(keys)
    rel = float(jnp.linalg.norm(d - x) / jnp.linalg.norm(x))
    assert rel < rel_bound
    np.testing.assert_array_equal(
        np.asarray(kf.dequantize_indexer_keys(kf.quantize_indexer_keys(d, fmt))), np.asarray(d)
    )
    if fmt == "fp4":  # the model's indexer keys are fp4_sim'd: FP4 storage is lossless for them
        np.testing.assert_array_equal(np.asarray(d), np.asarray(ops.fp4_sim(x, 32)))


@pytest.mark.parametrize(
    "fmt,dim", [("bf16", 64), ("fp8_ds_mla", 64), ("indexer_fp8", 32), ("indexer_fp4", 32)]
)
def test_pool_allocate_write_read(fmt, dim):
    pool = kf.allocate_rows((6, 4), fmt, dim, rope_dim=16, poison=True)
    assert kf.format_of(pool) == fmt and pool.shape == (6, 4, dim)
    dense = (kf.dequantize_kv if fmt in ("bf16", "fp8_ds_mla") else kf.dequantize_indexer_keys)(pool)
    assert bool(jnp.all(jnp.isnan(dense)))
    vals = _normal(3, (3, dim))
    index = (jnp.asarray([5, 0, 2]), jnp.asarray([1, 3, 0]))
    pool = kf.write_rows(pool, index, vals)
    got = kf.read_rows(pool, index)
    assert type(got) is type(pool)
    expect = kf.encode_like(pool, vals)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expect)):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))
    untouched = kf.read_rows(pool, (jnp.asarray([1]), jnp.asarray([0])))
    dense = (kf.dequantize_kv if fmt in ("bf16", "fp8_ds_mla") else kf.dequantize_indexer_keys)(untouched)
    assert bool(jnp.all(jnp.isnan(dense)))


def test_codec_errors_name_the_argument():
    with pytest.raises(ValueError, match="rope_dim"):
        kf.quantize_kv(jnp.ones((2, 64)), rope_dim=64)
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4.quantize(jnp.ones((2, 48)))
    with pytest.raises(ValueError, match="unknown fmt"):
        kf.quantize_indexer_keys(jnp.ones((2, 32)), "fp6")


def test_scale_exponents_are_exact_at_powers_of_two():
    """UE8M0 scales come from the bits (``mxfp4.ceil_log2``): exact at and one ulp above every power
    of two, in any program shape (``ceil(log2(x))`` missed 31 of these values: one ulp above
    2^k the float32 log is k). The model's QAT rounding and the FP8 row codec use the same rule,
    so rows rounded by the model are stored exactly, also when a block's amax sits on a boundary."""
    x = np.concatenate([2.0 ** np.arange(-20, 21), 2.0 ** np.arange(-20, 21) * 1.0000001, [3.0, 0.3, 1.5]])
    x = x.astype(np.float32)
    want = np.where(np.frexp(x)[0] == 0.5, np.frexp(x)[1] - 1, np.frexp(x)[1])
    for n in (1, 7, 64, 1000):  # different program shapes around the same values
        got = jax.jit(mxfp4.ceil_log2)(jnp.asarray(np.resize(x, (n, x.size))))
        assert (np.asarray(got) == want).all()
    np.testing.assert_array_equal(np.asarray(mxfp4.pow2(jnp.arange(-126, 128))), 2.0 ** np.arange(-126, 128))
    rows = np.random.RandomState(3).standard_normal((16, 128)).astype(np.float32)
    rows[:, 0] = 448.0 * 2.0 ** np.arange(-8, 8)  # every block's amax on a power-of-two boundary
    rows[:, 64] = -448.0 * 2.0 ** np.arange(-8, 8)
    qat = ops.fp8_sim_nope(jnp.asarray(rows), 0)
    stored = kf.dequantize_kv(kf.quantize_kv(qat, rope_dim=0))
    np.testing.assert_array_equal(np.asarray(stored), np.asarray(qat))
