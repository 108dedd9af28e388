"""Loading the bundled demo (the published format) and its orbax round trip.

The demo goes through the code path a real DeepSeek-V4-Flash directory takes:
index + shards, FP8 block-scaled linears, MXFP4 experts stacked per layer, I64
``tid2eid``. Orbax conversion is checked for identical params, restore onto a
mesh other than the one it was saved from (8 fake CPU devices, conftest.py), and
restart after an interruption.
"""

import filecmp
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax.checkpoint import CheckpointError, SafetensorsLoader, convert, load_checkpoint, load_tokenizer
from dsv4_jax.checkpoint import convert_cli as convert_checkpoint
from dsv4_jax.checkpoint import demo as make_demo_checkpoint
from dsv4_jax.checkpoint.orbax_io import MANIFEST, PARAMS
from dsv4_jax.checkpoint.safetensors_io import SafetensorsCheckpoint
from dsv4_jax.model.params import ArrayInfo, param_infos, to_native
from dsv4_jax.model.transformer import mtp_forward
from dsv4_jax.quant import QuantizedWeight, dequantize_tree, is_quantized

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "checkpoints", "demo")


def mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


@functools.cache
def demo(dtype=jnp.float32):
    return load_checkpoint(DEMO, dtype)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_demo_covers_every_layer_kind_and_routing():
    cfg, _ = demo()
    assert cfg.layer_kinds == ("swa", "csa", "hca")
    assert [cfg.mlp_kind(i) for i in range(4)] == ["hash", "hash", "topk", "topk"]  # 3 = MTP block
    assert cfg.num_nextn_predict_layers == 1 and cfg.compress_ratios == (0, 4, 128, 0)
    assert cfg.weight_dtype == "fp8" and cfg.expert_dtype == "fp4" and cfg.index_n_heads >= 16
    assert cfg.hidden_size % 128 == 0 and cfg.moe_intermediate_size % 128 == 0


def test_demo_is_in_the_published_format():
    ck = SafetensorsCheckpoint(DEMO)
    dt = {n: e.dtype for n, e in ck.entries.items()}
    assert dt["layers.0.attn.wq_a.weight"] == "F8_E4M3" and dt["layers.0.attn.wq_a.scale"] == "F8_E8M0"
    assert ck.entry("layers.0.attn.wq_b.scale").shape == (4, 1)  # [ceil(512/128), ceil(128/128)]
    assert (
        dt["layers.1.ffn.experts.3.w2.weight"] == "I8" and dt["layers.1.ffn.experts.3.w2.scale"] == "F8_E8M0"
    )
    assert ck.entry("layers.1.ffn.experts.3.w2.weight").shape == (256, 64)  # [D, I/2]
    assert ck.entry("layers.1.ffn.experts.3.w2.scale").shape == (256, 4)  # [D, I/32]
    assert dt["layers.0.ffn.gate.tid2eid"] == "I64" and "layers.2.ffn.gate.tid2eid" not in dt
    assert dt["layers.2.ffn.gate.bias"] == "F32" and dt["layers.1.attn.compressor.ape"] == "F32"
    assert dt["layers.2.attn.compressor.wkv.weight"] == "BF16" and dt["embed.weight"] == "BF16"
    assert dt["mtp.0.hc_head_fn"] == "F32" and dt["mtp.0.e_proj.weight"] == "F8_E4M3"
    assert dt["layers.1.attn.indexer.wq_b.weight"] == "F8_E4M3"
    assert dt["layers.1.attn.indexer.weights_proj.weight"] == "BF16"
    assert not any(n.startswith("model.") for n in dt)
    assert len({e.file for e in ck.entries.values()}) == 3


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_loaded_tree_matches_param_infos(dtype):
    cfg, params = demo(dtype)
    infos = param_infos(cfg, dtype)
    got = jax.tree.map(lambda x: (x.shape, x.dtype), to_native(params))
    want = jax.tree.map(
        lambda a: (a.shape, jnp.dtype(a.dtype)), infos, is_leaf=lambda x: isinstance(x, ArrayInfo)
    )
    assert got == want


def test_bf16_load_is_exact():
    """FP8/FP4 products are exact in bf16, so a bf16 load is the f32 load, bit for bit."""
    _, p32 = demo(jnp.float32)
    _, p16 = demo(jnp.bfloat16)
    for a, b in zip(jax.tree.leaves(p32), jax.tree.leaves(p16)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(a.dtype))


def test_tid2eid_is_int32_with_distinct_experts():
    cfg, params = demo()
    tid = np.asarray(params["layers"][0]["ffn"]["gate"]["tid2eid"])
    assert tid.dtype == np.int32 and tid.shape == (cfg.vocab_size, cfg.num_experts_per_tok)
    assert (tid[:, 0] != tid[:, 1]).all() and tid.min() >= 0 and tid.max() < cfg.n_routed_experts
    raw = SafetensorsCheckpoint(DEMO).read("layers.0.ffn.gate.tid2eid")
    np.testing.assert_array_equal(tid, raw)


def test_packed_storage_stacks_experts_in_order():
    _, packed = load_checkpoint(DEMO, jnp.float32, storage="packed")
    ck = SafetensorsCheckpoint(DEMO)
    native = to_native(packed)  # the checkpoint's names: lists of layers, plain values
    w2 = native["layers"][1]["ffn"]["experts"]["w2"]["weight"]
    assert isinstance(w2, QuantizedWeight) and w2.fmt == "mxfp4" and w2.shape == (8, 256, 128)
    for j in (0, 5):
        np.testing.assert_array_equal(
            np.asarray(w2.data[j]), ck.read(f"layers.1.ffn.experts.{j}.w2.weight").view(np.uint8)
        )
        np.testing.assert_array_equal(np.asarray(w2.scale[j]), ck.read(f"layers.1.ffn.experts.{j}.w2.scale"))
    wq = native["layers"][0]["attn"]["wq_a"]["weight"]
    assert wq.fmt == "fp8" and wq.block == (128, 128) and wq.scale.shape == (1, 2)
    assert not is_quantized(
        native["layers"][1]["attn"]["compressor"]["wkv"]["weight"]
    )  # BF16 in the checkpoint
    assert_trees_equal(dequantize_tree(packed, jnp.float32), demo()[1])


def test_loaded_mtp_block_runs():
    """The HF port has no MTP block (HF_ORACLE.md §8.5), so parity cannot cover it; it must run."""
    cfg, params = demo()
    rng = np.random.RandomState(0)
    x_main = rng.standard_normal((1, 24, cfg.hc_mult, cfg.hidden_size)).astype(np.float32)
    tokens = rng.randint(0, cfg.vocab_size, (1, 24))
    logits, streams = jax.jit(lambda p, x, t: mtp_forward(p, x, t, np.arange(24)[None], cfg))(
        params, x_main, tokens
    )
    assert logits.shape == (1, 24, cfg.vocab_size) and streams.shape == x_main.shape
    assert np.isfinite(np.asarray(logits)).all() and float(jnp.std(logits)) > 0.1


def test_sharded_load_places_leaves_by_logical_axes():
    m = mesh((2, 4), ("expert", "tensor"))
    _, params = load_checkpoint(DEMO, jnp.float32, mesh=m)
    w1 = to_native(params)["layers"][1]["ffn"]["experts"]["w1"]["weight"]
    assert w1.sharding.spec == jax.sharding.PartitionSpec("expert", "tensor", None)
    assert len(w1.sharding.device_set) == 8
    assert_trees_equal(params, demo()[1])


@pytest.fixture(scope="module")
def packed_orbax(tmp_path_factory):
    dst = str(tmp_path_factory.mktemp("orbax") / "packed")
    convert(DEMO, dst, storage="packed", mesh=mesh((2, 4), ("expert", "tensor")))
    return dst


def test_orbax_round_trip_onto_another_mesh(packed_orbax):
    """Saved from an (expert 2, tensor 4) mesh, restored onto (expert 4, tensor 2): same params."""
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert filecmp.cmp(os.path.join(packed_orbax, name), os.path.join(DEMO, name), shallow=False)
    mb = mesh((4, 2), ("expert", "tensor"))
    cfg, params = load_checkpoint(packed_orbax, jnp.float32, mesh=mb)
    assert cfg == demo()[0]
    assert_trees_equal(params, demo()[1])
    w1 = to_native(params)["layers"][1]["ffn"]["experts"]["w1"]["weight"]
    assert w1.sharding.mesh.shape == mb.shape and w1.sharding.spec == jax.sharding.PartitionSpec(
        "expert", "tensor", None
    )
    _, packed = load_checkpoint(packed_orbax, jnp.float32, storage="packed", mesh=mb)
    assert isinstance(to_native(packed)["layers"][2]["ffn"]["experts"]["w3"]["weight"], QuantizedWeight)
    assert_trees_equal(packed, load_checkpoint(DEMO, jnp.float32, storage="packed")[1])


@pytest.mark.parametrize("storage", ["bfloat16", "float32"])
def test_orbax_dequantized_storage(tmp_path, storage):
    dst = str(tmp_path / storage)
    convert(DEMO, dst, storage=storage)
    assert_trees_equal(load_checkpoint(dst, jnp.float32, mesh=mesh((8,), ("expert",)))[1], demo()[1])
    assert_trees_equal(load_checkpoint(dst, jnp.bfloat16)[1], demo(jnp.bfloat16)[1])


def test_conversion_restarts_after_an_interruption(tmp_path):
    dst = str(tmp_path / "o")
    m = convert(DEMO, dst, storage="bfloat16", max_chunks=2)
    assert m["done"] == ["globals", "layers.0"] and not m["complete"]
    with pytest.raises(CheckpointError, match="incomplete conversion .2 of 5 chunks.; rerun"):
        load_checkpoint(dst)
    # a crash mid-save leaves orbax's tmp dir and maybe an unrecorded chunk dir; both are redone
    os.makedirs(os.path.join(dst, PARAMS, "layers.1.orbax-checkpoint-tmp-123"))
    os.makedirs(os.path.join(dst, PARAMS, "layers.1", "junk"))
    seen = []
    m = convert(DEMO, dst, storage="bfloat16", on_chunk=lambda k, skipped: seen.append((k, skipped)))
    assert m["complete"] and seen == [
        ("globals", True),
        ("layers.0", True),
        ("layers.1", False),
        ("layers.2", False),
        ("mtp.0", False),
    ]
    assert sorted(os.listdir(os.path.join(dst, PARAMS))) == [
        "globals",
        "layers.0",
        "layers.1",
        "layers.2",
        "mtp.0",
    ]
    assert_trees_equal(load_checkpoint(dst, jnp.float32)[1], demo()[1])
    with pytest.raises(CheckpointError, match="different storage"):
        convert(DEMO, dst, storage="packed")
    # a recorded chunk whose directory vanished is converted again, once
    shutil.rmtree(os.path.join(dst, PARAMS, "layers.2"))
    seen.clear()
    m = convert(DEMO, dst, storage="bfloat16", on_chunk=lambda k, skipped: seen.append((k, skipped)))
    assert ("layers.2", False) in seen and sorted(m["done"]) == sorted(set(m["done"])) and len(m["done"]) == 5
    with open(os.path.join(dst, MANIFEST)) as f:
        m = json.load(f)
    m["config"]["routed_scaling_factor"] = 2.0
    with open(os.path.join(dst, MANIFEST), "w") as f:
        json.dump(m, f)
    with pytest.raises(CheckpointError, match="different config .differs in routed_scaling_factor"):
        convert(DEMO, dst, storage="bfloat16")


def test_orbax_manifest_guards(tmp_path, packed_orbax):
    dst = str(tmp_path / "copy")
    shutil.copytree(packed_orbax, dst)
    shutil.rmtree(os.path.join(dst, PARAMS, "layers.2"))
    with pytest.raises(CheckpointError, match="missing chunk params/layers.2"):
        load_checkpoint(dst)
    with open(os.path.join(dst, MANIFEST)) as f:
        m = json.load(f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump({**m["config"], "routed_scaling_factor": 2.5}, f)
    with pytest.raises(CheckpointError, match="differs from the config the params were converted with"):
        load_checkpoint(dst)


def test_convert_script(tmp_path, capsys):
    """``scripts/convert_checkpoint.py`` (``checkpoint.convert_cli``): resumes, reports, refuses."""
    dst = str(tmp_path / "cli")
    assert (
        convert_checkpoint.main([DEMO, dst, "--storage", "bfloat16", "--max-chunks", "1", "--no-progress"])
        == 0
    )
    assert "stopped after 1/5 chunks" in capsys.readouterr().out
    assert convert_checkpoint.main([DEMO, dst, "--storage", "bfloat16", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "globals: already converted" in out and "mtp.0: saved" in out and "complete" in out
    assert convert_checkpoint.main([str(tmp_path / "missing"), str(tmp_path / "x")]) == 1
    assert "error:" in capsys.readouterr().err


def test_demo_is_what_the_writer_makes_of_its_trained_weights(tmp_path):
    """The committed demo holds the weights ``scripts/train_demo.py`` trained: writing them back with
    ``checkpoint.demo.build`` gives the same files (config, index, tokenizer byte for byte; every
    tensor's value exactly)."""
    cfg, params = load_checkpoint(DEMO, jnp.float32)
    make_demo_checkpoint.build(
        str(tmp_path), cfg, jax.tree.map(np.asarray, params), load_tokenizer(DEMO, cfg)
    )
    committed = sorted(f for f in os.listdir(DEMO) if f != "README.md")
    assert sorted(os.listdir(tmp_path)) == committed
    for name in committed:
        if not name.endswith(".safetensors"):
            assert filecmp.cmp(tmp_path / name, os.path.join(DEMO, name), shallow=False), name
    _, again = load_checkpoint(str(tmp_path), jnp.float32)
    jax.tree.map(np.testing.assert_array_equal, again, params)
    assert sum(os.path.getsize(os.path.join(DEMO, f)) for f in committed) < 8 << 20


def test_random_build_is_deterministic(tmp_path):
    """Without trained weights the script writes seeded random ones, the same bytes every run."""
    make_demo_checkpoint.build(str(tmp_path / "a"))
    make_demo_checkpoint.build(str(tmp_path / "b"))
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b")) and "tokenizer.json" in names
    for name in names:
        assert filecmp.cmp(tmp_path / "a" / name, tmp_path / "b" / name, shallow=False), name


def test_loader_reports_source_bytes():
    loader = SafetensorsLoader(DEMO)
    total = sum(loader.chunk_bytes(k) for k in ["globals", "layers.0", "layers.1", "layers.2", "mtp.0"])
    assert total == loader.ckpt.nbytes


def test_flash_layout_matches_the_published_index():
    """The names a Flash config implies are the 69,187 of the published index (ARCHITECTURE.md §0, S5)."""
    from dsv4_jax.checkpoint import layout, placement
    from dsv4_jax.config import preset

    cfg = preset("flash")
    specs = {s.name: s for k in placement.chunk_keys(cfg) for s in layout.chunk_specs(cfg, k)}
    assert sum(len(s.tensors()) for s in specs.values()) == 69187
    wq_a = specs["layers.0.attn.wq_a.weight"]
    assert (wq_a.fmt, wq_a.data_shape(), wq_a.scale_shape()) == ("fp8", (1024, 4096), (8, 32))
    w1 = specs["layers.0.ffn.experts.w1.weight"]
    assert (w1.fmt, w1.data_shape(), w1.scale_shape()) == ("mxfp4", (2048, 2048), (2048, 128))
    assert w1.sources[255] == "layers.0.ffn.experts.255.w1.weight"
    assert specs["layers.2.attn.indexer.wq_b.weight"].scale_shape() == (64, 8)
    assert (
        specs["mtp.0.h_proj.weight"].fmt == "fp8"
        and specs["layers.3.attn.compressor.wkv.weight"].fmt == "float"
    )
    assert "layers.3.ffn.gate.tid2eid" not in specs and "layers.2.ffn.gate.tid2eid" in specs
