"""The numerics report's attribution (issue 17): the router's and the indexer's top-k picks are
recorded, and imposed picks are the ones the forward uses (``dsv4_jax.model.choices``)."""

import jax
import numpy as np

from dsv4_jax import init_params, preset
from dsv4_jax.bench import numerics as nm
from dsv4_jax.model import choices

CFG = preset("tiny")
F32 = nm.Serving("float32", "bf16", qat=False)
PROMPTS = [[5, 9, 2, 7, 1, 3, 8, 4, 6, 2, 11, 13, 5, 1, 9], [3, 1, 4, 1, 5, 9, 2, 6]]
NEW = 3


def _run(params, **kw):
    return nm.run_rows(CFG, params, F32, PROMPTS, NEW, reference=True, **kw)


def test_picks_are_recorded_and_imposing_them_changes_nothing():
    params = init_params(CFG, jax.random.PRNGKey(3))
    ref = _run(params)
    kinds = ref.pick_kinds
    assert "router" in kinds and "indexer" in kinds
    assert len(ref.picks) == 1 and len(ref.picks[0]) == NEW  # one batch: prefill + NEW-1 decode steps
    again = _run(params, forced=ref.tokens, impose=ref.picks[0])
    np.testing.assert_array_equal(again.logits, ref.logits)
    assert all(v == 0 for v in nm.pick_flips(ref, again, PROMPTS, len(PROMPTS)).values())
    assert nm.imposed_agreement(ref, again, None)["exact"] == len(PROMPTS)


def test_imposed_picks_are_the_ones_the_forward_uses():
    params = init_params(CFG, jax.random.PRNGKey(3))
    ref = _run(params)
    e = CFG.n_routed_experts
    other = [  # every router pick moved to the next expert; indexer picks kept
        [(p + 1) % e if kind == "router" else p for kind, p in zip(ref.pick_kinds, step)]
        for step in ref.picks[0]
    ]
    moved = _run(params, forced=ref.tokens, impose=other)
    assert np.abs(moved.logits - ref.logits)[ref.valid].max() > 1e-2  # the imposed experts ran
    # what is recorded is the model's own pick: at the prefill's first router the inputs are equal
    first = ref.pick_kinds.index("router")
    np.testing.assert_array_equal(moved.picks[0][0][first], ref.picks[0][0][first])
    assert nm.pick_flips(ref, moved, PROMPTS, len(PROMPTS))["router_pick_flips"] > 0


def test_without_an_active_context_a_pick_is_returned_as_is():
    idx = np.array([[1, 0]], np.int32)
    assert choices.pick("router", idx) is idx
    with choices.active() as c:
        assert choices.pick("router", idx) is idx
    assert c.kinds == ["router"] and c.seen[0] is idx
