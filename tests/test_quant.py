"""The weight codecs of ARCHITECTURE.md §8, pinned on hand-made tensors.

The nibble order, the e8m0 bias and the scale-grid layout are the facts a wrong
guess would silently get wrong (weights load, logits are garbage), so each is
checked against values written out by hand; round trips and the model's own QAT
rounding (``ops.fp8_sim`` / ``ops.fp4_sim``) cross-check the quantizers.
"""

import math

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dsv4_jax import quant
from dsv4_jax.model import ops
from dsv4_jax.quant import QuantizedWeight


def test_e8m0_bytes_are_biased_powers_of_two():
    e = np.array([127, 128, 126, 0, 1, 254, 255], np.uint8)
    got = quant.e8m0_decode(e)
    want = [1.0, 2.0, 0.5, 2.0**-127, 2.0**-126, 2.0**127]
    np.testing.assert_array_equal(got[:-1], np.array(want, np.float32))
    assert math.isnan(got[-1])
    np.testing.assert_array_equal(np.asarray(quant.e8m0_decode(jnp.asarray(e)))[:-1], got[:-1])


def test_fp4_low_nibble_is_the_even_element():
    # 0x21: low nibble 1 (0.5) is element 0, high nibble 2 (1.0) is element 1.
    # 0xF8: low 8 (-0.0), high 15 (-6). 0x7A: low 10 (-1.0), high 7 (6.0).
    packed = np.array([[0x21, 0xF8, 0x7A]], np.uint8)
    want = np.array([[0.5, 1.0, -0.0, -6.0, -1.0, 6.0]], np.float32)
    got = quant.fp4_decode(packed)
    np.testing.assert_array_equal(got, want)
    assert np.signbit(got[0, 2])  # code 8 is negative zero
    np.testing.assert_array_equal(np.asarray(quant.fp4_decode(jnp.asarray(packed))), want)
    assert quant.fp4_encode(want).tolist() == packed.tolist()


def test_fp4_codes_follow_the_e2m1_table():
    codes = np.arange(16, dtype=np.uint8)
    vals = quant.fp4_decode(quant.fp4_pack(codes))
    np.testing.assert_array_equal(vals, [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])
    # the same code table as ml_dtypes' float4_e2m1fn
    np.testing.assert_array_equal(codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32), vals)


def test_fp8_e4m3_codes():
    data = np.array([0x38, 0x7E, 0xB8, 0x01, 0x40], np.uint8)
    np.testing.assert_array_equal(
        quant.fp8_decode(data), np.array([1.0, 448.0, -1.0, 2.0**-9, 2.0], np.float32)
    )


def test_fp8_block_scales_index_by_i_div_128_j_div_128():
    # A [256, 384] weight of ones (e4m3 0x38) over a 2x3 grid of distinct scales.
    grid = np.array([[127, 128, 129], [130, 131, 132]], np.uint8)
    w = quant.dequantize_blocks(np.full((256, 384), 0x38, np.uint8), grid, "fp8", (128, 128))
    assert w[0, 0] == 1.0 and w[127, 127] == 1.0
    assert w[127, 128] == 2.0 and w[0, 383] == 4.0
    assert w[128, 127] == 8.0 and w[128, 128] == 16.0 and w[255, 383] == 32.0
    np.testing.assert_array_equal(np.unique(w[:128, 256:]), [4.0])


def test_fp8_scale_grid_rounds_up_on_partial_blocks():
    data = np.full((200, 130), 0x38, np.uint8)  # grid ceil(200/128) x ceil(130/128) = 2 x 2
    w = quant.dequantize_blocks(data, np.array([[127, 128], [129, 130]], np.uint8), "fp8", (128, 128))
    assert w.shape == (200, 130)
    assert (w[0, 129], w[199, 0], w[199, 129]) == (2.0, 4.0, 8.0)
    q = QuantizedWeight.quantize(np.ones((200, 130), np.float32), "fp8")
    assert q.scale.shape == (2, 2) and q.shape == (200, 130)


def test_mxfp4_one_scale_per_32_inputs_of_a_row():
    packed = np.full((2, 32), 0x22, np.uint8)  # 64 inputs of 1.0
    scale = np.array([[127, 128], [129, 130]], np.uint8)  # [out, in/32]
    w = quant.dequantize_blocks(packed, scale, "mxfp4", (1, 32))
    np.testing.assert_array_equal(w[0, :32], 1.0)
    np.testing.assert_array_equal(w[0, 32:], 2.0)
    np.testing.assert_array_equal(w[1, :32], 4.0)
    np.testing.assert_array_equal(w[1, 32:], 8.0)


# Worst case per block: a half step of the top binade (e4m3 16 of 448, e2m1 1 of 6) times a scale
# below 2·amax/qmax, so |err| < 32/448 (fp8) or 1/3 (fp4) of the block's amax.
@pytest.mark.parametrize("fmt, block, rel", [("fp8", (128, 128), 32 / 448), ("mxfp4", (1, 32), 1 / 3)])
def test_quantize_round_trip(fmt, block, rel):
    rng = np.random.RandomState(0)
    w = rng.standard_normal((3, 256, 192)).astype(np.float32) * np.float32(0.05)  # stacked experts
    q = QuantizedWeight.quantize(w, fmt)
    assert q.shape == w.shape and q.block == block and q.data.dtype == np.uint8
    d = q.dequantize(np.float32)
    assert np.abs(d - w).max() <= rel * np.abs(w).max()
    # dequantized weights are exact in bf16, and quantizing them again changes no value
    np.testing.assert_array_equal(d.astype(jnp.bfloat16).astype(np.float32), d)
    np.testing.assert_array_equal(QuantizedWeight.quantize(d, fmt).dequantize(np.float32), d)
    # the jnp path (on-device dequantization of packed weights) agrees bit for bit
    qj = QuantizedWeight(jnp.asarray(q.data), jnp.asarray(q.scale), q.fmt, q.block)
    np.testing.assert_array_equal(np.asarray(qj.dequantize(jnp.float32)), d)


def test_quantizers_match_the_models_qat_rounding():
    """quant.py and ops.fp{4,8}_sim share §2's scale rule, so their roundings agree."""
    rng = np.random.RandomState(1)
    x = rng.standard_normal((8, 256)).astype(np.float32)
    fp4 = QuantizedWeight.quantize(x, "mxfp4").dequantize(np.float32)
    np.testing.assert_array_equal(fp4, np.asarray(ops.fp4_sim(jnp.asarray(x), 32)))
    fp8 = QuantizedWeight.quantize(x, "fp8", (1, 128)).dequantize(np.float32)
    np.testing.assert_array_equal(fp8, np.asarray(ops.fp8_sim(jnp.asarray(x), 128)))


def test_exact_powers_of_two_pick_the_tight_scale():
    # amax = 448 * 2^-3 exactly: scale 2^-3, not 2^-2 (log2 rounding would risk the latter)
    w = np.zeros((128, 128), np.float32)
    w[5, 7] = 448.0 / 8
    q = QuantizedWeight.quantize(w, "fp8")
    assert q.scale[0, 0] == 127 - 3
    assert quant.fp8_decode(q.data)[5, 7] == 448.0
    assert quant.pow2_ceil_exponent(np.array([1.0, 1.5, 2.0, 0.25, 0.3], np.float32)).tolist() == [
        0,
        1,
        1,
        -2,
        -1,
    ]


def test_invalid_inputs_are_refused():
    with pytest.raises(ValueError, match="even"):
        quant.fp4_pack(np.zeros((2, 3), np.uint8))
    with pytest.raises(ValueError, match="4-bit"):
        quant.fp4_pack(np.array([16, 0], np.uint8))
    with pytest.raises(ValueError, match="unknown format"):
        quant.quantize_blocks(np.zeros((2, 2)), "int4")
    with pytest.raises(ValueError, match="UE8M0 range"):
        quant.e8m0_encode_exponent(np.array([200]))


def test_dequantize_tree_replaces_only_quantized_leaves():
    q = QuantizedWeight.quantize(np.ones((4, 64), np.float32), "mxfp4")
    tree = {"a": np.arange(3.0), "b": [q]}
    out = quant.dequantize_tree(tree, jnp.float32)
    np.testing.assert_array_equal(out["b"][0], np.ones((4, 64)))
    assert out["a"] is tree["a"]
