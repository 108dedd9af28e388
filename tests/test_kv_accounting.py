"""KV-state accounting (ARCHITECTURE.md §10.2) and the bytes the pools really allocate."""

import dataclasses
import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from dsv4_jax.config import preset
from dsv4_jax.model import state as kvc
from dsv4_jax.model.accounting import kv_bytes, mtp_window_bytes


@pytest.mark.parametrize(
    "name, fmt, per_token",
    [
        ("flash", "bf16", 6880),
        ("pro", "bf16", 9848),
        ("flash", "fp8", 3850.25),
        ("pro", "fp8", 5511.4375),
        ("flash", "fp8-fp4", 3514.25),
        ("pro", "fp8-fp4", 5031.4375),
    ],
)
def test_bytes_per_token_reproduce_section_10_2(name, fmt, per_token):
    assert kv_bytes(preset(name), kvc.KVFormat.parse(fmt)).bytes_per_token == per_token


def test_fixed_state_per_sequence():
    acc = kv_bytes(preset("flash"))
    assert acc.fixed["window"] == 43 * 128 * 1024  # 5.4 MiB of bf16 windows
    assert acc.fixed["csa_tail"] + acc.fixed["csa_index_tail"] == 21 * 80 * 1024
    assert acc.fixed["hca_tail"] == 20 * 512 * 1024
    assert kv_bytes(preset("pro")).fixed["window"] == 61 * 128 * 1024
    assert mtp_window_bytes(preset("flash")) == 128 * 1024


def _allocated(cfg, cc):
    """Bytes of every state leaf by kind, from shapes alone (nothing is allocated)."""
    shapes = jax.eval_shape(lambda: kvc.init_state(cfg, cc))
    out = {"pool": 0, "fixed": 0}
    for layer in shapes.layers:
        for field in dataclasses.fields(layer):
            store = getattr(layer, field.name)
            n = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(store))
            out["pool" if field.name in ("cmp", "idx") else "fixed"] += n
    return out


@pytest.mark.parametrize("name", ["flash", "pro", "tiny"])
@pytest.mark.parametrize("fmt", ["bf16", "fp8", "fp8-fp4"])
def test_pools_allocate_what_the_accounting_says(name, fmt):
    cfg = preset(name)
    context = 100_003
    bt = 256
    cc = kvc.CacheConfig(
        num_slots=1,
        num_blocks=math.ceil(context / bt),
        max_blocks_per_seq=math.ceil(context / bt),
        block_tokens=bt,
        fmt=kvc.KVFormat.parse(fmt),
        dtype=jnp.bfloat16,
    )
    acc = kv_bytes(cfg, cc.fmt)
    got = _allocated(cfg, cc)
    assert got["fixed"] == acc.fixed_bytes_per_seq
    want = acc.bytes_per_token * context
    per_block = acc.bytes_per_token * bt  # one block in every pool together
    assert want <= got["pool"] < want + per_block


def test_kv_table_script_json():
    out = subprocess.run(
        [sys.executable, "scripts/kv_table.py", "--json", "--presets", "flash,pro"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = json.loads(out.stdout)
    assert {(r["preset"], r["format"]) for r in rows} == {
        (p, f) for p in ("flash", "pro") for f in ("bf16", "fp8", "fp8-fp4")
    }
    for r in rows:
        assert {"preset", "format", "bytes_per_token", "per_kind", "fixed_bytes_per_seq"} <= set(r)
        assert math.isclose(sum(r["per_kind"].values()), r["bytes_per_token"])
    flash = next(r for r in rows if r["preset"] == "flash" and r["format"] == "fp8-fp4")
    assert flash["bytes_per_token"] == 3514.25


def test_bad_formats_and_caches_are_named():
    with pytest.raises(ValueError, match="unknown name"):
        kvc.KVFormat.parse("int4")
    with pytest.raises(ValueError, match="KVFormat.index"):
        kvc.KVFormat("fp8", "int2")
    cc = kvc.CacheConfig(num_slots=1, num_blocks=1, max_blocks_per_seq=1, block_tokens=100)
    with pytest.raises(ValueError, match="multiple of compress ratio"):
        kvc.init_state(preset("tiny"), cc)


def test_state_leaves_carry_logical_axes():
    from jax.sharding import PartitionSpec

    from dsv4_jax.parallel.rules import DEFAULT_RULES, is_axes, tree_shardings

    cfg = preset("tiny")
    for fmt in ("bf16", "fp8-fp4"):
        cc = kvc.CacheConfig(
            num_slots=8, num_blocks=8, max_blocks_per_seq=2, block_tokens=32, fmt=kvc.KVFormat.parse(fmt)
        )
        state = kvc.init_state(cfg, cc)
        axes = kvc.state_axes(state)
        flat_state = jax.tree.leaves(state)
        flat_axes = jax.tree.leaves(axes, is_leaf=is_axes)
        assert len(flat_state) == len(flat_axes)
        for leaf, ax in zip(flat_state, flat_axes):
            assert len(ax) == leaf.ndim and all(a in DEFAULT_RULES for a in ax)
        mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        placed = jax.device_put(state, tree_shardings(axes, mesh))
        # sequences are data-parallel: every state leaf is split over its slot / block axis
        assert all(
            x.sharding.spec == PartitionSpec("data", *[None] * (x.ndim - 1)) for x in jax.tree.leaves(placed)
        )
