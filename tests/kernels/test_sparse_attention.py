"""sparse_attention (Pallas, interpret mode) against sparse_attention_reference on random
paged state with NaN-poisoned unused slots (ARCHITECTURE.md §5.4, §10.1).

Error bounds (max |kernel − reference| on outputs of magnitude ≲ 3): f32 queries 1e-5
(accumulation order only); bf16 queries 3e-2 (the P·V dot takes bf16 probabilities, and
the output is rounded to bf16, 2^-8 relative).
"""

import jax.numpy as jnp
import numpy as np
import pytest
from kernel_inputs import attention_case

from pallas_kernels import kv_format
from pallas_kernels.sparse_attention.kernel import sparse_attention
from pallas_kernels.sparse_attention.reference import ring_positions, sparse_attention_reference

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 3e-2}

# name: (case kwargs, kernel kwargs). Starts below the window (16), ring wrap-around,
# k larger than the visible entries (early positions), −1 anywhere in the top-k rows,
# chunks longer than a tile and than the window, ragged q_lens, several head blocks.
CASES = {
    "csa_decode_bf16rows_f32": (
        dict(mode="csa", fmt="bf16", dtype=jnp.float32, starts=[0, 3, 17, 61], q_lens=[1] * 4, T=1),
        dict(num_splits=3, block_k=16),
    ),
    "csa_decode_fp8rows_bf16": (
        dict(mode="csa", fmt="fp8_ds_mla", dtype=jnp.bfloat16, starts=[5, 44], q_lens=[1, 1], T=1),
        dict(),
    ),  # default splits / head block
    "csa_chunk_fp8rows_f32": (
        dict(mode="csa", fmt="fp8_ds_mla", dtype=jnp.float32, starts=[0, 12, 30], q_lens=[8, 5, 1], T=8),
        dict(num_splits=2, block_k=16),
    ),
    "hca_decode_fp8rows_bf16": (
        dict(
            mode="hca",
            fmt="fp8_ds_mla",
            dtype=jnp.bfloat16,
            starts=[7, 40, 90],
            q_lens=[1] * 3,
            T=1,
            ratio=8,
            E=4,
            max_blocks=4,
        ),
        dict(num_splits=4, block_k=16),
    ),
    "hca_long_chunk_bf16rows_bf16": (
        dict(
            mode="hca",
            fmt="bf16",
            dtype=jnp.bfloat16,
            starts=[0, 33],
            q_lens=[20, 13],
            T=20,
            ratio=8,
            E=4,
            max_blocks=4,
        ),
        dict(num_splits=1, block_k=16),
    ),
    "swa_chunk_f32": (
        dict(mode="swa", fmt="bf16", dtype=jnp.float32, starts=[0, 9, 26], q_lens=[4, 2, 3], T=4),
        dict(block_k=16),
    ),
    "csa_32heads_two_head_blocks": (
        dict(mode="csa", fmt="bf16", dtype=jnp.float32, starts=[21, 2], q_lens=[2, 2], T=2, H=32),
        dict(num_splits=2, block_k=16, block_h=16),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(name):
    case_kw, kernel_kw = CASES[name]
    c = attention_case(sum(map(ord, name)), **case_kw)
    ref = sparse_attention_reference(*c.args(), ratio=c.ratio)
    out = sparse_attention(*c.args(), ratio=c.ratio, interpret=True, **kernel_kw)
    assert out.shape == c.q.shape and out.dtype == c.q.dtype
    ref, out = np.asarray(ref, np.float32), np.asarray(out, np.float32)
    assert np.isfinite(ref).all() and np.isfinite(out).all()  # poisoned slots were never read
    np.testing.assert_allclose(out, ref, atol=TOL[case_kw["dtype"]], rtol=0)
    live = np.arange(c.q.shape[1])[None, :] < np.asarray(c.q_lens)[:, None]
    assert np.all(out[~live] == 0) and np.abs(out[live]).max() > 0.1


def test_splits_and_head_blocks_do_not_change_the_result():
    c = attention_case(
        7,
        mode="hca",
        fmt="bf16",
        dtype=jnp.float32,
        starts=[50, 95],
        q_lens=[1, 1],
        T=1,
        ratio=4,
        E=8,
        max_blocks=4,
    )
    outs = [
        np.asarray(sparse_attention(*c.args(), ratio=c.ratio, interpret=True, block_k=16, num_splits=s))
        for s in (1, 2, 8)
    ]
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], atol=2e-6, rtol=0)


def test_sink_only_enlarges_the_denominator():
    """With no compressed rows, a huge sink drives every output to zero; a very negative one
    leaves plain softmax attention over the window."""
    c = attention_case(11, mode="swa", fmt="bf16", dtype=jnp.float32, starts=[4], q_lens=[1], T=1)
    args = list(c.args())
    args[7] = jnp.full_like(c.sink, 60.0)
    assert np.abs(np.asarray(sparse_attention(*args, interpret=True))).max() < 1e-12
    args[7] = jnp.full_like(c.sink, -60.0)
    out = np.asarray(sparse_attention(*args, interpret=True))[0, 0]
    ring = np.asarray(kv_format.dequantize_kv(c.ring))[int(c.ring_slot[0])][np.arange(4) % 16]
    keys = np.concatenate([ring, np.asarray(c.kv[0, :1])])  # positions 0..3 and the token itself
    s = np.asarray(c.q[0, 0]) @ keys.T / 8.0
    p = np.exp(s - s.max(-1, keepdims=True))
    np.testing.assert_allclose(out, (p / p.sum(-1, keepdims=True)) @ keys, atol=2e-5)


def test_ring_positions():
    np.testing.assert_array_equal(
        np.asarray(ring_positions(jnp.asarray([0, 3, 18]), 4)),
        [[-4, -3, -2, -1], [0, 1, 2, -1], [16, 17, 14, 15]],
    )


def test_validation_names_the_argument():
    c = attention_case(3, mode="csa", fmt="bf16", dtype=jnp.float32, starts=[4, 8], q_lens=[1, 1], T=1)
    bad = {
        1: (jnp.zeros((2, 1, 32)), "kv"),
        3: (jnp.zeros((3,), jnp.int32), "ring_slot"),
        6: (jnp.zeros((2, 1, 4), jnp.float32), "topk"),
        7: (jnp.zeros((5,)), "sink"),
    }
    for pos, (val, name) in bad.items():
        args = list(c.args())
        args[pos] = val
        with pytest.raises(ValueError, match=name):
            sparse_attention(*args, ratio=4, interpret=True)
    args = list(c.args())
    args[6] = None  # HCA without a ratio
    with pytest.raises(ValueError, match="ratio"):
        sparse_attention_reference(*args, ratio=0)
    fp8_pool = kv_format.quantize_kv(kv_format.dequantize_kv(c.pool), 16)
    args = list(c.args())
    args[4] = fp8_pool
    with pytest.raises(ValueError, match="pool"):
        sparse_attention(*args, ratio=4, interpret=True)
    with pytest.raises(ValueError, match="block_k"):
        sparse_attention(*c.args(), ratio=4, block_k=24, interpret=True)


@pytest.mark.parametrize("mode", ["swa", "csa"])
def test_replay_hides_ring_rows_before_state_start(mode):
    """A recompute replay (``state_start`` > 0) sees no ring row before its first position: the
    kernel and the reference drop the same rows, and the result is attention without them."""
    c = attention_case(
        41, mode=mode, fmt="bf16", dtype=jnp.float32, starts=[40, 70], q_lens=[3, 2], T=3, max_blocks=4
    )
    first = jnp.asarray([33, 0], jnp.int32)  # sequence 0 replays from position 33; sequence 1 does not
    ref = np.asarray(sparse_attention_reference(*c.args(), state_start=first, ratio=c.ratio))
    out = np.asarray(
        sparse_attention(*c.args(), state_start=first, ratio=c.ratio, interpret=True, block_k=16)
    )
    np.testing.assert_allclose(out, ref, atol=TOL[jnp.float32], rtol=0)
    full = np.asarray(sparse_attention_reference(*c.args(), ratio=c.ratio))
    np.testing.assert_array_equal(ref[1], full[1])  # state_start 0: unchanged
    assert np.abs(ref[0] - full[0]).max() > 1e-3  # rows 40-W..32 were visible before, not now
    # the same as overwriting those ring rows with junk: they are never read
    ring = c.ring
    slot = int(c.ring_slot[0])
    w = ring.shape[1]
    junk = ring.at[slot, np.arange(40 - w, 33) % w].set(1e4)
    args = list(c.args())
    args[2] = junk
    again = sparse_attention_reference(*args, state_start=first, ratio=c.ratio)
    np.testing.assert_array_equal(np.asarray(again), ref)
