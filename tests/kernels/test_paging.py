"""The references read the paged state in chunks of whole blocks (``pallas_kernels.paging``):
the result must not depend on the chunk size. One block per chunk (many loop trips, a running
top-k merged many times, an online softmax rescaled many times) must give what one chunk over
the whole table gives, on ragged batches whose sequences end in different chunks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_inputs import attention_case, indexer_case

from pallas_kernels import paging
from pallas_kernels.indexer_topk.reference import indexer_topk_reference
from pallas_kernels.sparse_attention.reference import sparse_attention_reference


def _both(monkeypatch, fn):
    """``fn()`` with one chunk per call (the default at these sizes), then one block per chunk."""
    jax.clear_caches()  # the references are jitted; their chunk size is fixed at trace time
    whole = fn()
    monkeypatch.setattr(paging, "MAX_CHUNK_ENTRIES", 1)
    jax.clear_caches()
    try:
        return whole, fn()
    finally:
        monkeypatch.undo()
        jax.clear_caches()


@pytest.mark.parametrize("fmt", ["bf16", "indexer_fp4"])
def test_indexer_topk_chunked_equals_whole(monkeypatch, fmt):
    # ties every 3 entries: the merge must keep lax.top_k's lower-entry-first order
    c = indexer_case(
        5, fmt=fmt, dtype=jnp.float32, starts=[3, 41, 97, 150], q_lens=[2, 3, 1, 3], T=3, duplicate_every=3
    )
    (i1, v1), (i2, v2) = _both(monkeypatch, lambda: indexer_topk_reference(*c.args(), ratio=c.ratio, topk=6))
    np.testing.assert_array_equal(np.asarray(i2), np.asarray(i1))
    np.testing.assert_allclose(np.asarray(v2), np.asarray(v1), rtol=1e-5)  # same dots, other tiling
    assert (np.asarray(i1) >= 0).any() and (np.asarray(i1) == -1).any()


def test_hca_attention_chunked_equals_whole(monkeypatch):
    c = attention_case(
        9,
        mode="hca",
        fmt="fp8_ds_mla",
        dtype=jnp.float32,
        starts=[0, 37, 90, 250],
        q_lens=[3, 2, 4, 1],
        T=4,
        ratio=4,
        E=4,
        max_blocks=20,
    )
    whole, chunked = _both(monkeypatch, lambda: sparse_attention_reference(*c.args(), ratio=c.ratio))
    whole = np.asarray(whole)
    assert np.abs(whole).max() > 0
    np.testing.assert_allclose(np.asarray(chunked), whole, atol=2e-6 * np.abs(whole).max(), rtol=0)


def test_indexer_kernel_in_groups_of_splits_equals_one_launch(monkeypatch):
    """A wide table runs the kernel over groups of splits (sub-tables, shifted positions) merged
    by a running top-k; one split per group must give the single launch's answer."""
    from pallas_kernels.indexer_topk import kernel

    c = indexer_case(
        6,
        fmt="indexer_fp4",
        dtype=jnp.float32,
        starts=[3, 41, 97, 150],
        q_lens=[2, 3, 1, 3],
        T=3,
        duplicate_every=3,
    )
    kw = dict(ratio=c.ratio, topk=6, block_k=8, split_entries=8, interpret=True)
    jax.clear_caches()
    i1, v1 = kernel.indexer_topk(*c.args(), **kw)
    monkeypatch.setattr(kernel, "MAX_SPLITS_PER_CALL", 1)
    jax.clear_caches()
    i2, v2 = kernel.indexer_topk(*c.args(), **kw)
    monkeypatch.undo()
    jax.clear_caches()
    np.testing.assert_array_equal(np.asarray(i2), np.asarray(i1))
    np.testing.assert_allclose(np.asarray(v2), np.asarray(v1), rtol=1e-6)
    ref, _ = indexer_topk_reference(*c.args(), ratio=c.ratio, topk=6)
    np.testing.assert_array_equal(np.asarray(i2), np.asarray(ref))


@pytest.mark.parametrize("mode", ["csa", "hca"])
def test_attention_in_query_tiles_equals_one_tile(monkeypatch, mode):
    """A long prefill chunk attends in tiles of queries (``paging.query_tile``); tiles of 2 must
    give what one tile of the whole chunk gives (ragged rows, the window crossing tiles)."""
    kw = dict(fmt="bf16", dtype=jnp.float32, starts=[0, 21, 60], q_lens=[8, 5, 7], T=8, E=4, max_blocks=8)
    c = attention_case(4, mode=mode, ratio=4, W=4, **kw)

    def run():
        return np.asarray(sparse_attention_reference(*c.args(), ratio=c.ratio))

    jax.clear_caches()
    whole = run()
    assert paging.query_tile(8, 1000) == 8  # the default budget: one tile at these sizes
    monkeypatch.setattr(paging, "CHUNK_ELEMENTS", 1)  # halved down to one query per tile
    assert paging.query_tile(8, 1000) == 1
    jax.clear_caches()
    tiled = run()
    monkeypatch.undo()
    jax.clear_caches()
    np.testing.assert_allclose(tiled, whole, atol=2e-6 * np.abs(whole).max(), rtol=0)
