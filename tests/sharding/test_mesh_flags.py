"""Meshes from flags, the rules table's checks, and the placement rules (no compilation)."""

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from sharding_cases import CACHE, CFG, layout, params

from dsv4_jax.engine.runner.layout import RunnerLayout
from dsv4_jax.parallel.mesh import add_mesh_args, mesh_from_args, parse_mesh, parse_mesh_spec, validate_for
from dsv4_jax.parallel.rules import DEFAULT_RULES, Layout, fit_spec
from dsv4_jax.quant import QuantizedWeight


def test_mesh_flag_builds_the_three_axes():
    m = parse_mesh("data=2, expert=4")
    assert m.axis_names == ("data", "expert", "tensor") and tuple(m.shape.values()) == (2, 4, 1)
    assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)
    assert parse_mesh_spec("tensor=8") == {"data": 1, "expert": 1, "tensor": 8}
    auto = parse_mesh("auto")  # every device on the expert axis
    assert tuple(auto.shape.values()) == (1, 8, 1) and auto.devices.size == jax.device_count()
    assert tuple(parse_mesh("auto", jax.devices()[:2]).shape.values()) == (1, 2, 1)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("data=1,expert=4,tensor=1", "covers 4 devices but 8 are available"),
        ("data=2,pipeline=4", "unknown axis 'pipeline'; the axes are data, expert, tensor"),
        ("data=2,data=4", "axis 'data' given twice"),
        ("expert=eight", "size of 'expert' must be an integer, got 'eight'"),
        ("expert=0,tensor=8", "size of 'expert' must be >= 1, got 0"),
        ("expert8", "'expert8' is not of the form axis=size"),
    ],
)
def test_bad_mesh_flags_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_mesh(spec)


def test_mesh_from_args_validates_against_the_model():
    parser = argparse.ArgumentParser()
    add_mesh_args(parser)
    assert mesh_from_args(parser.parse_args([])) is None
    m = mesh_from_args(parser.parse_args(["--mesh", "expert=8"]), CFG)
    assert m.shape["expert"] == 8
    with pytest.raises(ValueError, match="needs --num-processes and --process-id"):
        mesh_from_args(parser.parse_args(["--coordinator", "127.0.0.1:1234"]))
    with pytest.raises(ValueError, match="expert=8 does not divide n_routed_experts=6"):
        validate_for(m, dataclasses.replace(CFG, n_routed_experts=6))


def test_rules_table_checks():
    mesh = parse_mesh("data=2,expert=4")
    with pytest.raises(ValueError, match="must map to the same mesh axes"):
        Layout.create(mesh, {**DEFAULT_RULES, "kv_block": "data"})
    with pytest.raises(ValueError, match="'q_heads' -> 'expert' reuses the sequence axes"):
        Layout.create(mesh, {**DEFAULT_RULES, "q_heads": "expert"})
    with pytest.raises(ValueError, match=r"\['q_lora'\] must map to None"):
        Layout.create(mesh, {**DEFAULT_RULES, "q_lora": "tensor"})
    with pytest.raises(ValueError, match="no entry for"):
        Layout.create(mesh, {k: v for k, v in DEFAULT_RULES.items() if k != "kv_dim"})
    # A table edit, not code: tensor-parallel attention over the expert axis, sequences over data.
    tp_attn = {
        **DEFAULT_RULES,
        "batch": "data",
        "kv_slot": "data",
        "kv_block": "data",
        "q_heads": "expert",
        "heads": "expert",
        "o_lora": "expert",
    }
    lay = Layout.create(mesh, tp_attn)
    assert lay.batch_axes == ("data",) and lay.attn_head_axes(params()["layers"][0]["attn"], CFG) == (
        "expert",
    )


def test_fit_spec_keeps_what_divides():
    mesh = parse_mesh("data=2,expert=4")
    assert fit_spec(P(("data", "expert")), (8, 3), mesh) == P(("data", "expert"), None)
    assert fit_spec(P(("data", "expert")), (2, 3), mesh) == P("data", None)
    assert fit_spec(P(None, "expert"), (4, 64), mesh, blocks=(1, 32)) == P(
        None, None
    )  # 64 = 2 blocks < 4 ways
    assert fit_spec(P(None, "expert"), (4, 128), mesh, blocks=(1, 32)) == P(None, "expert")


def test_packed_weights_split_bytes_and_scales_alike():
    lay = layout("tensor")
    w = np.random.RandomState(0).randn(8, 64, 256).astype(np.float32)
    q = QuantizedWeight.quantize(w, "mxfp4")  # data [8, 64, 128], scale [8, 64, 8]
    sh = lay.weight_sharding(q, ("expert", "embed", "mlp"))
    assert (
        sh.data.spec == sh.scale.spec == P("expert", None, "tensor")
    )  # 256 = 8 blocks of 32: one per device
    sh = lay.weight_sharding(QuantizedWeight.quantize(w[..., :128], "mxfp4"), ("expert", "embed", "mlp"))
    assert sh.data.spec == sh.scale.spec == P("expert", None, None)  # 4 blocks cannot split 8 ways


def test_runner_rows_follow_slot_shards():
    class W:
        def __init__(self, slot, blocks, seq_id=0):
            self.slot, self.block_ids, self.seq_id = slot, blocks, seq_id

    rl = RunnerLayout(CFG, CACHE, layout("data_expert"), num_snapshots=4)
    rows, b = rl.arrange([W(5, [10]), W(0, [0, 1]), W(5, [11])], max_batch=8)
    assert b == 16 and rows == [5 * 2, 0, 5 * 2 + 1]  # two rows per shard, shard 5's band is rows 10-11
    assert not rl.snapshots_split  # 4 snapshots do not split 8 ways: kept whole
    one = RunnerLayout(CFG, CACHE, None, num_snapshots=4)
    assert one.arrange([W(5, [10]), W(0, [0])], max_batch=8) == ([0, 1], 2)
    lay = layout("expert")
    put = lay.put_batch((np.arange(16, dtype=np.int32).reshape(8, 2),))[0]
    assert put.sharding.spec == P(("data", "expert"), None) and put.addressable_shards[3].data.tolist() == [
        [6, 7]
    ]
    table = RunnerLayout(CFG, CACHE, lay, 8).init_table(jnp.int32)
    assert table.sharding.spec == P(("data", "expert"), None) and table.addressable_shards[0].data.shape == (
        1,
        512,
    )
