"""The model on 8 fake CPU devices equals the model on one, for three layouts.

Tolerance is the model parity test's (``test_parity.assert_close``: max |Δlogits| <=
2e-4 · max(1, max|logits|) and equal argmax at every compared position). Sharding only
reorders float sums (expert partials, head groups), so the observed error is ~1e-6.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sharding_cases import CFG, CHUNK, LAYOUTS, SEQS, layout, params, place, prompts, state_run
from test_parity import assert_close

from dsv4_jax.checkpoint import load_checkpoint
from dsv4_jax.model import state as kvc
from dsv4_jax.model.transformer import ModelOptions, forward
from dsv4_jax.parallel.mesh import parse_mesh
from dsv4_jax.parallel.rules import Layout
from dsv4_jax.quant import QuantizedWeight


@functools.cache
def full_forward(name):
    """Whole-sequence forward (no state) over 4 prompts of 24 tokens."""
    lay = None if name is None else layout(name)
    toks = prompts()[:4, :24]
    pos = np.broadcast_to(np.arange(24, dtype=np.int32), toks.shape)
    fn = jax.jit(lambda p, t, q: forward(p, t, q, cfg=CFG, opts=ModelOptions(layout=lay))[0])
    return np.asarray(fn(place(params(), lay), toks, pos))


@pytest.mark.parametrize("name", LAYOUTS)
def test_full_forward_matches_one_device(name):
    assert_close(full_forward(name), full_forward(None))


@pytest.mark.parametrize("name", LAYOUTS)
def test_prefill_and_decode_match_one_device(name):
    """Two prefill chunks then three greedy decode steps for three sequences on three shards."""
    prefill, decode, _ = state_run(name)
    ref_prefill, ref_decode, _ = state_run(None)
    for got, want, n_done in zip(prefill, ref_prefill, (0, CHUNK)):
        for r, (_, _, length) in SEQS.items():
            n = min(CHUNK, max(0, length - n_done))
            if n:
                assert_close(got[r, :n], want[r, :n])
    for got, want in zip(decode, ref_decode):
        rows = sorted(SEQS)
        assert_close(got[rows, 0], want[rows, 0])


def test_params_placed_by_the_table():
    """Experts split over ``expert`` and F over ``tensor``; heads, groups and vocab over ``tensor``."""
    p = place(params(), layout("tensor"))
    attn, ffn = p["layers"][0]["attn"], p["layers"][0]["ffn"]
    assert attn["wq_b"]["weight"].addressable_shards[0].data.shape == (
        CFG.num_attention_heads * CFG.head_dim // 8,
        CFG.q_lora_rank,
    )
    assert attn["wo_a"]["weight"].sharding.spec[0] == "tensor"
    assert (
        ffn["experts"]["w2"]["weight"].addressable_shards[0].data.shape[-1] == CFG.moe_intermediate_size // 8
    )
    w1 = place(params(), layout("data_expert"))["layers"][1]["ffn"]["experts"]["w1"]["weight"]
    assert (
        w1.sharding.spec[0] == "expert"
        and w1.addressable_shards[0].data.shape[0] == CFG.n_routed_experts // 4
    )


@functools.cache
def demo_packed():
    return load_checkpoint("checkpoints/demo", jnp.float32, storage="packed")


def test_packed_mxfp4_experts_run_expert_parallel():
    """The demo checkpoint kept packed (FP8 linears, MXFP4 experts): bytes and UE8M0 scales are
    split alike over ``expert`` and, in whole 32-column blocks, over ``tensor``; the sharded
    forward equals the one-device forward on the same packed weights."""
    cfg, p = demo_packed()
    mesh_lay = Layout.create(parse_mesh("data=2,expert=2,tensor=2"))
    sh = mesh_lay.param_shardings(p, cfg)
    w2 = p["layers"][1]["ffn"]["experts"]["w2"]["weight"].get_value()
    assert isinstance(w2, QuantizedWeight) and w2.fmt == "mxfp4"
    s2 = sh["layers"][1]["ffn"]["experts"]["w2"]["weight"].get_value()
    assert s2.data.spec == s2.scale.spec == jax.sharding.PartitionSpec("expert", None, "tensor")
    placed = jax.device_put(p, sh)
    shard = placed["layers"][1]["ffn"]["experts"]["w2"]["weight"].get_value()
    assert shard.data.addressable_shards[0].data.shape == (
        cfg.n_routed_experts // 2,
        cfg.hidden_size,
        cfg.moe_intermediate_size // 4,
    )
    assert shard.scale.addressable_shards[0].data.shape == (
        cfg.n_routed_experts // 2,
        cfg.hidden_size,
        cfg.moe_intermediate_size // 64,
    )
    toks = np.random.RandomState(3).randint(0, cfg.vocab_size, (2, 40)).astype(np.int32)
    pos = np.broadcast_to(np.arange(40, dtype=np.int32), toks.shape)
    run = lambda opts, w: np.asarray(
        jax.jit(lambda w_, t, q: forward(w_, t, q, cfg=cfg, opts=opts)[0])(w, toks, pos)
    )
    assert_close(run(ModelOptions(layout=mesh_lay), placed), run(ModelOptions(), p))


def _demo_steps(lay, kernels):
    """Prefill two sequences (60 and 33 tokens, on shards 1 and 5) and decode one token each."""
    cfg, p = demo_packed()
    cc = kvc.CacheConfig(
        num_slots=8, num_blocks=16, max_blocks_per_seq=2, block_tokens=128, dtype=jnp.float32
    )
    opts = ModelOptions(layout=lay, kernels=kernels)
    step = jax.jit(
        lambda p, t, q, s, m: forward(p, t, q, s, m, cfg=cfg, opts=opts, cache=cc, last_only=True),
        donate_argnums=(3,),
    )
    state = kvc.init_state(cfg, cc)
    if lay is not None:
        p, state = (
            jax.device_put(p, lay.param_shardings(p, cfg)),
            jax.device_put(state, lay.state_shardings(state)),
        )
    toks = np.random.RandomState(5).randint(0, cfg.vocab_size, (8, 64)).astype(np.int32)
    slots, lengths, table = np.full(8, 8, np.int32), np.zeros(8, np.int32), np.zeros((8, 2), np.int32)
    for r, (s, blocks, n) in {1: (1, [2, 3], 60), 5: (5, [10, 11], 33)}.items():
        slots[r], table[r], lengths[r] = s, blocks, n
    zero = np.zeros(8, np.int32)
    pos = np.broadcast_to(np.arange(64, dtype=np.int32), (8, 64))
    first, state = step(p, toks, pos, state, kvc.StepMeta(slots, table, lengths, zero, zero))
    nxt = np.asarray(first)[:, 0].argmax(-1).astype(np.int32)[:, None]
    second, _ = step(
        p,
        nxt,
        lengths[:, None],
        state,
        kvc.StepMeta(slots, table, (lengths > 0).astype(np.int32), zero, zero),
    )
    return np.asarray(first)[[1, 5], 0], np.asarray(second)[[1, 5], 0]


@pytest.mark.slow  # CI time: make test-slow
def test_pallas_kernels_inside_the_sharded_regions():
    """``kernels="pallas"`` on a mesh: the sparse-attention and indexer kernels read each shard's
    own pools, the MXFP4 kernel multiplies each shard's packed experts; prefill and decode equal
    the one-device jnp path."""
    got = _demo_steps(Layout.create(parse_mesh("data=2,expert=4,tensor=1")), "pallas")
    for g, w in zip(got, _demo_steps(None, "reference")):
        assert_close(g, w)
