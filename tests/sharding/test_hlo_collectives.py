"""The compiled decode step moves no whole KV pool and no whole expert stack between devices.

The HLO of the decode step (the ``state_run`` scenario, compiled once per layout) is read
for every ``all-gather``; none may produce as many elements of the same type as a whole
state leaf (compressed pool, indexer pool, window ring, compressor tail) or a whole
routed-expert weight stack. Element counts rather than shapes: XLA may gather a reshaped
view. Two controls show the check can fail: a naive paged read left to XLA's partitioner
gathers the whole pool, and a replicated expert stack gathers the whole stack.
"""

import jax
import jax.numpy as jnp
import pytest
from sharding_cases import (
    CACHE,
    CFG,
    LAYOUTS,
    collectives,
    forbidden,
    gathered,
    layout,
    params,
    place,
    state_run,
)

from dsv4_jax.model import state as kvc


def _state_and_experts():
    state = jax.eval_shape(lambda: kvc.init_state(CFG, CACHE))
    experts = [blk["ffn"]["experts"] for blk in params()["layers"].values()]
    return forbidden(state), forbidden(experts)


@pytest.mark.parametrize("name", LAYOUTS)
def test_decode_step_gathers_no_pool_and_no_expert_stack(name):
    _, _, hlo = state_run(name)
    pools, experts = _state_and_experts()
    got = gathered(hlo)
    assert not got & pools, f"all-gather of a whole state leaf: {sorted(got & pools)}"
    assert not got & experts, f"all-gather of a whole expert stack: {sorted(got & experts)}"
    if layout(name).ways(layout(name).axes("expert")) > 1:  # tokens go to the experts, not the reverse
        assert len(collectives(hlo, "all-to-all")) >= 2 * CFG.num_hidden_layers


def test_the_check_catches_a_naive_paged_read():
    lay = layout("expert")
    pool = jax.device_put(
        jnp.zeros((CACHE.num_blocks, 8, CFG.head_dim)), lay.sharding(("kv_block", None, None))
    )
    table = jax.device_put(jnp.zeros((8, 2), jnp.int32), lay.sharding(("batch", None)))
    hlo = jax.jit(kvc.take_rows).lower(pool, table).compile().as_text()
    assert gathered(hlo) & forbidden(pool)


def test_the_check_catches_a_gathered_expert_stack():
    lay = layout("expert")
    w1 = place(params(), lay)["layers"][1]["ffn"]["experts"]["w1"]["weight"].get_value()
    whole = jax.sharding.NamedSharding(lay.mesh, jax.sharding.PartitionSpec())
    hlo = jax.jit(lambda w: jax.lax.with_sharding_constraint(w, whole) * 2).lower(w1).compile().as_text()
    assert gathered(hlo) & forbidden(w1)
