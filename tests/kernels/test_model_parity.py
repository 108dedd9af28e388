"""The kernels' references compute the model's math (ties pallas_kernels to dsv4_jax):

- ``sparse_attention_reference`` on paged state == ``dsv4_jax.model.attention.attend`` on the
  same rows laid out densely (window segment + CSA per-query rows / HCA entries + sink);
- ``indexer_topk_reference`` on paged keys == ``indexer.index_scores`` + ``select_topk``;
- ``moe_experts_reference`` on MXFP4 weights == ``moe.routed_experts`` on their dequantized
  values;

and, closing the loop, each kernel in interpret mode == the model function. Bounds: f32,
1e-5 relative to max |output| (accumulation order only); top-k ids identical.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from kernel_inputs import attention_case, indexer_case

from dsv4_jax.config import preset
from dsv4_jax.model import attention, indexer, moe, ops
from pallas_kernels import kv_format, mxfp4
from pallas_kernels.indexer_topk.kernel import indexer_topk
from pallas_kernels.indexer_topk.reference import indexer_topk_reference
from pallas_kernels.mxfp4_matmul.kernel import moe_experts
from pallas_kernels.mxfp4_matmul.reference import moe_experts_reference
from pallas_kernels.sparse_attention.kernel import sparse_attention
from pallas_kernels.sparse_attention.reference import ring_positions, sparse_attention_reference

FAR = -(10**6)  # position of a never-written ring row: outside every window


def _model_attention(c, window):
    """``attention.attend`` on dense segments built from the case's data (no paging)."""
    b, t = c.q.shape[:2]
    pos = np.asarray(c.start)[:, None] + np.arange(t)
    ring = np.nan_to_num(np.asarray(kv_format.dequantize_kv(kv_format.read_rows(c.ring, c.ring_slot))))
    p_ring = np.asarray(ring_positions(c.start, window))
    k_pos = np.concatenate([np.where(p_ring >= 0, p_ring, FAR), pos], axis=1)
    keys = jnp.concatenate([jnp.asarray(ring), c.kv.astype(jnp.float32)], axis=1)
    segments = [attention.Segment(keys, attention.window_mask(jnp.asarray(pos), jnp.asarray(k_pos), window))]
    if c.pool is not None:
        stored = [
            np.asarray(kv_format.dequantize_kv(kv_format.encode_like(c.pool, jnp.asarray(e))))
            for e in c.entries
        ]
        cap = max(len(e) for e in stored)
        dense = np.zeros((b, cap, c.q.shape[-1]), np.float32)
        for i, e in enumerate(stored):
            dense[i, : len(e)] = e
        if c.topk is not None:
            rows = np.take_along_axis(dense[:, None], np.maximum(np.asarray(c.topk), 0)[..., None], axis=2)
            segments.append(attention.Segment(jnp.asarray(rows), c.topk >= 0))
        else:
            mask = np.arange(cap)[None, None, :] < ((pos + 1) // c.ratio)[..., None]
            segments.append(attention.Segment(jnp.asarray(dense), jnp.asarray(mask)))
    return np.asarray(attention.attend(c.q, segments, c.sink), np.float32)


@pytest.mark.parametrize(
    "mode,fmt", [("csa", "bf16"), ("csa", "fp8_ds_mla"), ("hca", "fp8_ds_mla"), ("swa", "bf16")]
)
def test_attention_reference_is_the_model_attend(mode, fmt):
    # Full chunks (the model has no padding rows); sequences shorter than the window too.
    c = attention_case(
        17,
        mode=mode,
        fmt=fmt,
        dtype=jnp.float32,
        starts=[0, 6, 45],
        q_lens=[3, 3, 3],
        T=3,
        ratio=4 if mode == "csa" else 8,
        E=8 if mode == "csa" else 4,
    )
    model = _model_attention(c, 16)
    ref = np.asarray(sparse_attention_reference(*c.args(), ratio=c.ratio), np.float32)
    np.testing.assert_allclose(ref, model, atol=1e-5 * np.abs(model).max(), rtol=0)
    if mode == "csa" and fmt == "fp8_ds_mla":
        out = np.asarray(sparse_attention(*c.args(), ratio=c.ratio, block_k=16, num_splits=2, interpret=True))
        np.testing.assert_allclose(out, model, atol=1e-5 * np.abs(model).max(), rtol=0)


@pytest.mark.parametrize("fmt", ["bf16", "indexer_fp4"])
def test_indexer_reference_is_the_model_indexer(fmt):
    c = indexer_case(23, fmt=fmt, dtype=jnp.float32, starts=[2, 30, 97], q_lens=[2, 2, 2], T=2, max_blocks=4)
    topk = 6
    t = c.q.shape[1]
    e = c.keys.shape[1]
    ent = jnp.arange(c.block_table.shape[1] * e)
    rows = kv_format.read_rows(c.keys, (c.block_table[:, ent // e], ent % e))
    keys = kv_format.dequantize_indexer_keys(rows)  # every slot in entry order; unused slots NaN
    keys = jnp.where(jnp.isnan(keys), 0.0, keys)  # masked by select_topk anyway; keep the model finite
    positions = c.start[:, None] + jnp.arange(t)[None, :]
    model_idx = indexer.select_topk(indexer.index_scores(c.q, c.w, keys), positions, c.ratio, topk)
    ref_idx, _ = indexer_topk_reference(*c.args(), ratio=c.ratio, topk=topk)
    np.testing.assert_array_equal(np.asarray(ref_idx), np.asarray(model_idx))
    if fmt == "indexer_fp4":
        idx, _ = indexer_topk(*c.args(), ratio=c.ratio, topk=topk, block_k=8, split_entries=8, interpret=True)
        np.testing.assert_array_equal(np.asarray(idx), np.asarray(model_idx))


def test_fp4_indexer_cache_is_lossless_for_the_model_keys():
    """The model FP4-simulates indexer keys (§5.2 step 3); stored as "indexer_fp4" they decode
    to exactly the same values, so the kernel's FP4 path needs no extra tolerance."""
    raw = jnp.asarray(np.random.default_rng(4).standard_normal((3, 9, 128)).astype(np.float32))
    sim = ops.fp4_sim(ops.hadamard(raw), 32)
    back = kv_format.dequantize_indexer_keys(kv_format.quantize_indexer_keys(sim, "fp4"))
    np.testing.assert_array_equal(np.asarray(back), np.asarray(sim))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_moe_reference_is_the_model_routed_experts(dtype):
    cfg = preset("tiny")
    e, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    rng = np.random.default_rng(31)
    ws = {
        name: mxfp4.quantize(jnp.asarray(rng.standard_normal(shape).astype(np.float32)))
        for name, shape in (("w1", (e, f, d)), ("w2", (e, d, f)), ("w3", (e, f, d)))
    }
    experts = moe.Experts(cfg, dtype, nnx.Rngs(0))
    for name, w in ws.items():
        getattr(experts, name).weight.set_value(mxfp4.dequantize(w, dtype))
    n, k = 9, cfg.num_experts_per_tok
    x = jnp.asarray(rng.standard_normal((n, d)) * 2.0, dtype)  # large enough to hit the clamp
    idx = jnp.asarray(np.stack([rng.permutation(e)[:k] for _ in range(n)]), jnp.int32)
    w = jnp.asarray(rng.random((n, k)).astype(np.float32))
    model = np.asarray(moe.routed_experts(x, idx, w, experts, cfg), np.float32)
    ref = np.asarray(moe_experts_reference(x, idx, w, ws["w1"], ws["w2"], ws["w3"], limit=cfg.swiglu_limit))
    tol = 1e-5 * np.abs(model).max()
    np.testing.assert_allclose(ref, model, atol=tol, rtol=0)
    out = np.asarray(
        moe_experts(
            x,
            idx,
            w,
            ws["w1"],
            ws["w2"],
            ws["w3"],
            limit=cfg.swiglu_limit,
            block_k=64,
            block_n=32,
            interpret=True,
        )
    )
    np.testing.assert_allclose(
        out, model, atol=tol if dtype == jnp.float32 else 1e-2 * np.abs(model).max(), rtol=0
    )
