"""The parameter tree: native names and shapes of ARCHITECTURE.md §8, logical axes, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax.config import preset
from dsv4_jax.model.params import ArrayInfo, init_params, logical_axes, native_names, param_infos, to_native
from dsv4_jax.parallel.rules import DEFAULT_RULES, logical_to_spec, tree_shardings


def shapes(name):
    infos = param_infos(preset(name))
    return native_names(infos, lambda n, a: a.shape)


def test_flash_native_names_and_shapes():
    s = shapes("flash")
    want = {
        "embed.weight": (129280, 4096),
        "head.weight": (129280, 4096),
        "norm.weight": (4096,),
        "hc_head_fn": (4, 16384),
        "hc_head_base": (4,),
        "hc_head_scale": (1,),
        "layers.0.hc_attn_fn": (24, 16384),
        "layers.0.hc_ffn_base": (24,),
        "layers.0.hc_attn_scale": (3,),
        "layers.0.attn.wq_a.weight": (1024, 4096),
        "layers.0.attn.q_norm.weight": (1024,),
        "layers.0.attn.wq_b.weight": (32768, 1024),
        "layers.0.attn.wkv.weight": (512, 4096),
        "layers.0.attn.kv_norm.weight": (512,),
        "layers.0.attn.wo_a.weight": (8192, 4096),
        "layers.0.attn.wo_b.weight": (4096, 8192),
        "layers.0.attn.attn_sink": (64,),
        "layers.0.ffn.gate.weight": (256, 4096),
        "layers.0.ffn.gate.tid2eid": (129280, 6),
        "layers.2.attn.compressor.wkv.weight": (1024, 4096),
        "layers.2.attn.compressor.ape": (4, 1024),
        "layers.2.attn.compressor.norm.weight": (512,),
        "layers.3.attn.compressor.wgate.weight": (512, 4096),
        "layers.3.attn.compressor.ape": (128, 512),
        "layers.2.attn.indexer.wq_b.weight": (8192, 1024),
        "layers.2.attn.indexer.weights_proj.weight": (64, 4096),
        "layers.2.attn.indexer.compressor.wkv.weight": (256, 4096),
        "layers.2.attn.indexer.compressor.ape": (4, 256),
        "layers.2.attn.indexer.compressor.norm.weight": (128,),
        "layers.3.ffn.gate.bias": (256,),
        "layers.3.ffn.experts.w1.weight": (256, 2048, 4096),
        "layers.3.ffn.experts.w2.weight": (256, 4096, 2048),
        "layers.3.ffn.shared_experts.w2.weight": (4096, 2048),
        "mtp.0.e_proj.weight": (4096, 4096),
        "mtp.0.h_proj.weight": (4096, 4096),
        "mtp.0.enorm.weight": (4096,),
        "mtp.0.hc_head_fn": (4, 16384),
        "mtp.0.ffn.gate.bias": (256,),
    }
    for name, shape in want.items():
        assert s[name] == shape, name
    assert "layers.0.attn.compressor.wkv.weight" not in s  # SWA-only layer
    assert "layers.3.attn.indexer.wq_b.weight" not in s  # HCA: no indexer
    assert "layers.2.ffn.gate.bias" not in s and "layers.3.ffn.gate.tid2eid" not in s
    assert "mtp.0.attn.compressor.wkv.weight" not in s  # the MTP block is SWA-only


def test_every_logical_axis_has_a_rule():
    for name in ("flash", "tiny"):
        infos = param_infos(preset(name))
        for axes in jax.tree.leaves(logical_axes(infos), is_leaf=lambda x: isinstance(x, tuple)):
            for a in axes:
                assert a is None or a in DEFAULT_RULES, a
    with pytest.raises(KeyError, match="no entry"):
        logical_to_spec(("not_an_axis",))


def test_params_shard_over_a_mesh():
    cfg = preset("tiny")
    params = to_native(init_params(cfg, jax.random.PRNGKey(0)))  # the checkpoint's view of the params
    mesh = jax.make_mesh(
        (2, 2, 2), ("data", "expert", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
    )
    sh = tree_shardings(logical_axes(param_infos(cfg, jnp.float32)), mesh)
    placed = jax.device_put(params, sh)
    w1 = placed["layers"][3]["ffn"]["experts"]["w1"]["weight"]
    assert w1.sharding.spec == jax.sharding.PartitionSpec("expert", "tensor", None)
    assert len(w1.addressable_shards) == 8 and w1.addressable_shards[0].data.shape == (4, 32, 128)
    np.testing.assert_array_equal(
        np.asarray(w1), np.asarray(params["layers"][3]["ffn"]["experts"]["w1"]["weight"])
    )


def test_init_is_non_degenerate():
    cfg = preset("tiny")
    params = to_native(init_params(cfg, jax.random.PRNGKey(0)))
    t = np.asarray(params["layers"][0]["ffn"]["gate"]["tid2eid"])
    assert t.dtype == np.int32 and t.shape == (cfg.vocab_size, cfg.num_experts_per_tok)
    assert all(len(set(row)) == len(row) for row in t)  # distinct experts per token
    assert len(np.unique(t)) == cfg.n_routed_experts
    layers = params["layers"]
    for leaves in (
        [lp["attn"]["attn_sink"] for lp in layers],
        [lp["ffn"]["gate"]["bias"] for lp in layers[2:]],
        [layers[1]["attn"]["compressor"]["ape"]],
        [lp["hc_attn_base"] for lp in layers],
    ):
        x = jnp.concatenate([jnp.ravel(v) for v in leaves])  # N(0, 1): every layer's, pooled
        assert float(jnp.std(x)) > 0.5 and float(jnp.abs(x).max()) > 1.0
    infos = jax.tree.leaves(param_infos(cfg, jnp.bfloat16), is_leaf=lambda x: isinstance(x, ArrayInfo))
    kept = {a.dtype for a in infos if a.init in ("norm", "scale")}
    assert kept == {jnp.dtype(jnp.float32)}  # norms and mHC stay fp32 whatever the weight dtype
