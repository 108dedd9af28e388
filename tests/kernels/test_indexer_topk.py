"""indexer_topk (Pallas, interpret mode) against indexer_topk_reference on random paged
keys with NaN-poisoned unused slots (ARCHITECTURE.md §5.3).

Bounds: the selected entry ids must be identical, order included (by score, ties to the
lower entry, −1 last); their scores agree to 2e-5 relative to the largest |score| (f32
accumulation order; bf16 queries × bf16-exact keys give exact products, so the same
bound holds).
"""

import jax.numpy as jnp
import numpy as np
import pytest
from kernel_inputs import indexer_case

from pallas_kernels.indexer_topk.kernel import indexer_topk
from pallas_kernels.indexer_topk.reference import indexer_topk_reference

# Query 0 of the first sequence sees no entry at all, the second few (k larger than the
# visible entries), the third many; ragged chunk lengths; several programs per query.
STARTS, QLENS, T = [0, 9, 150], [3, 1, 2], 3
CASES = {
    "bf16_f32_topk8_4splits": (
        dict(fmt="bf16", dtype=jnp.float32),
        dict(topk=8, block_k=8, split_entries=16),
    ),
    "fp8_bf16_topk12": (
        dict(fmt="indexer_fp8", dtype=jnp.bfloat16),
        dict(topk=12, block_k=8, split_entries=16),
    ),
    "fp4_f32_topk_equals_split": (
        dict(fmt="indexer_fp4", dtype=jnp.float32),
        dict(topk=16, block_k=16, split_entries=16),
    ),
    "fp4_bf16_defaults": (dict(fmt="indexer_fp4", dtype=jnp.bfloat16), dict(topk=8)),
    "bf16_exact_ties": (
        dict(fmt="bf16", dtype=jnp.float32, duplicate_every=3),
        dict(topk=8, block_k=8, split_entries=16),
    ),
    "bf16_64heads_dim128": (
        dict(fmt="bf16", dtype=jnp.bfloat16, H=64, D=128, max_blocks=4, E=16),
        dict(topk=8, block_k=16, split_entries=32),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(name):
    case_kw, kernel_kw = CASES[name]
    c = indexer_case(sum(map(ord, name)), starts=STARTS, q_lens=QLENS, T=T, **case_kw)
    topk = kernel_kw["topk"]
    ref_idx, ref_val = indexer_topk_reference(*c.args(), ratio=c.ratio, topk=topk)
    idx, val = indexer_topk(*c.args(), ratio=c.ratio, interpret=True, **kernel_kw)
    assert idx.shape == val.shape == (3, T, topk) and idx.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_idx))
    ok = np.asarray(ref_idx) >= 0
    scale = np.abs(np.asarray(ref_val)[ok]).max()
    np.testing.assert_allclose(np.asarray(val)[ok], np.asarray(ref_val)[ok], atol=2e-5 * scale, rtol=0)
    assert np.all(np.asarray(val)[~ok] == -np.inf)
    # causal visibility and padding rows, stated directly
    visible = (np.asarray(STARTS)[:, None] + np.arange(T) + 1) // c.ratio
    visible = np.where(np.arange(T)[None, :] < np.asarray(QLENS)[:, None], visible, 0)
    np.testing.assert_array_equal(ok.sum(-1), np.minimum(visible, topk))
    assert np.all(np.asarray(idx)[ok] < np.repeat(visible[..., None], topk, -1)[ok])


def test_ties_go_to_the_lower_entry():
    c = indexer_case(5, fmt="bf16", dtype=jnp.float32, starts=[60], q_lens=[1], T=1, duplicate_every=4)
    idx, val = indexer_topk(*c.args(), ratio=4, topk=6, block_k=8, split_entries=8, interpret=True)
    idx, val = np.asarray(idx)[0, 0], np.asarray(val)[0, 0]
    assert np.all(np.diff(val) <= 0) and np.any(val[:-1] == val[1:])  # sorted, with exact ties
    for a in range(5):  # equal scores are consecutive and listed by ascending entry
        if val[a] == val[a + 1]:
            assert idx[a] < idx[a + 1]
    assert len(set(idx.tolist())) == 6


def test_validation_names_the_argument():
    c = indexer_case(1, fmt="bf16", dtype=jnp.float32, starts=[4, 8], q_lens=[1, 1], T=1)
    args = list(c.args())
    args[1] = jnp.zeros((2, 1, 5))
    with pytest.raises(ValueError, match="w"):
        indexer_topk(*args, ratio=4, topk=4, interpret=True)
    args = list(c.args())
    args[3] = args[3].astype(jnp.float32)
    with pytest.raises(ValueError, match="block_table"):
        indexer_topk_reference(*args, ratio=4, topk=4)
    with pytest.raises(ValueError, match="split_entries"):
        indexer_topk(*c.args(), ratio=4, topk=8, split_entries=4, block_k=4, interpret=True)
