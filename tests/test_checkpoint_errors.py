"""Malformed checkpoints fail with a message that names the file and the tensor (issue 3).

Each case starts from a copy of the bundled demo (the published format), breaks
one thing, and checks the ``CheckpointError`` text. None may end in a bare
KeyError or a partial load: all structural checks run before any tensor data is
read, which one test asserts directly.
"""

import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from dsv4_jax.checkpoint import CheckpointError, load_checkpoint, load_tokenizer, safetensors_io
from dsv4_jax.checkpoint.safetensors_io import INDEX_FILE, read_header, read_tensor

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "demo")
S1, S2, S3 = (f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3))


@pytest.fixture
def ckpt(tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(DEMO, d)
    return str(d)


def shard_tensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a shard, in dtypes the safetensors writer maps back to the same F8 tags."""
    out = {}
    for name, e in read_header(path)[0].items():
        t = read_tensor(e)
        out[name] = t.view(ml_dtypes.float8_e8m0fnu) if e.dtype == "F8_E8M0" else t
    return out


def rewrite(d: str, shard: str, edit) -> None:
    """Apply ``edit(tensors)`` to a shard and rewrite it and the index's entries for it."""
    tensors = shard_tensors(os.path.join(d, shard))
    edit(tensors)
    save_file(tensors, os.path.join(d, shard), metadata={"format": "pt"})
    with open(os.path.join(d, INDEX_FILE)) as f:
        index = json.load(f)
    wm = {k: v for k, v in index["weight_map"].items() if v != shard}
    wm.update({k: shard for k in tensors})
    index["weight_map"] = wm
    with open(os.path.join(d, INDEX_FILE), "w") as f:
        json.dump(index, f)


def edit_config(d: str, **changes) -> None:
    with open(os.path.join(d, "config.json")) as f:
        c = json.load(f)
    c.update(changes)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(c, f)


def expect(d: str, *fragments: str) -> str:
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d)
    msg = str(e.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in: {msg}"
    return msg


def test_the_pristine_copy_loads(ckpt):
    cfg, params = load_checkpoint(ckpt)
    assert cfg.num_hidden_layers == 3 and len(params["layers"]) == 3


def test_missing_shard(ckpt):
    os.remove(os.path.join(ckpt, S2))
    expect(ckpt, f"missing shard {S2}", INDEX_FILE, "layers.0.")


def test_missing_tensor(ckpt):
    rewrite(ckpt, S2, lambda t: t.pop("layers.1.attn.wq_b.scale"))
    expect(
        ckpt, "missing tensor layers.1.attn.wq_b.scale", "not in any shard", "declares this weight quantized"
    )


def test_missing_compressor_names_the_config_field(ckpt):
    rewrite(ckpt, S2, lambda t: t.pop("layers.1.attn.indexer.compressor.ape"))
    expect(ckpt, "missing tensor layers.1.attn.indexer.compressor.ape", "compress_ratios[1]=4")


def test_unexpected_tensor(ckpt):
    def add(t):
        t["layers.1.ffn.experts.8.w1.weight"] = t["layers.1.ffn.experts.7.w1.weight"]

    rewrite(ckpt, S2, add)
    expect(ckpt, S2, "unexpected tensor layers.1.ffn.experts.8.w1.weight", "n_routed_experts=8")


def test_unexpected_scale_on_an_unquantized_weight(ckpt):
    def add(t):
        t["layers.0.ffn.gate.scale"] = t["layers.0.attn.wq_a.scale"]

    rewrite(ckpt, S2, add)
    expect(ckpt, "unexpected tensor layers.0.ffn.gate.scale", "unquantized")


def test_index_lists_a_tensor_the_shard_lacks(ckpt):
    with open(os.path.join(ckpt, INDEX_FILE)) as f:
        index = json.load(f)
    index["weight_map"]["layers.0.attn.bogus.weight"] = S2
    with open(os.path.join(ckpt, INDEX_FILE), "w") as f:
        json.dump(index, f)
    expect(
        ckpt, S2, "layers.0.attn.bogus.weight", "listed in model.safetensors.index.json but not in the shard"
    )


def test_shard_holds_a_tensor_the_index_does_not_list(ckpt):
    tensors = shard_tensors(os.path.join(ckpt, S3))
    tensors["mtp.0.extra"] = np.zeros(2, np.float32)
    save_file(tensors, os.path.join(ckpt, S3))
    expect(ckpt, S3, "mtp.0.extra", "not listed in")


def test_wrong_shape(ckpt):
    rewrite(
        ckpt, S2, lambda t: t.__setitem__("layers.0.attn_norm.weight", t["layers.0.attn_norm.weight"][:255])
    )
    expect(ckpt, S2, "layers.0.attn_norm.weight", "shape [255], expected [256]")


def test_wrong_dtype_for_an_fp8_weight(ckpt):
    def to_bf16(t):
        t["layers.0.attn.wkv.weight"] = t["layers.0.attn.wkv.weight"].astype(ml_dtypes.bfloat16)

    rewrite(ckpt, S2, to_bf16)
    expect(ckpt, S2, "layers.0.attn.wkv.weight", "dtype BF16, expected F8_E4M3")


def test_wrong_dtype_for_tid2eid(ckpt):
    rewrite(
        ckpt,
        S2,
        lambda t: t.__setitem__(
            "layers.0.ffn.gate.tid2eid", t["layers.0.ffn.gate.tid2eid"].astype(np.float32)
        ),
    )
    expect(ckpt, "layers.0.ffn.gate.tid2eid", "dtype F32, expected I64 or I32")


def test_truncated_shard(ckpt):
    path = os.path.join(ckpt, S3)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    msg = expect(ckpt, S3, "truncated file", f"has only {size - 1000} bytes")
    assert "tensor " in msg


def test_truncated_header(ckpt):
    with open(os.path.join(ckpt, S1), "wb") as f:
        f.write(b"\x10\x00")
    expect(ckpt, S1, "truncated file")


def test_corrupt_header(ckpt):
    path = os.path.join(ckpt, S1)
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"#")
    expect(ckpt, S1, "not valid JSON")


def test_config_with_fewer_layers_than_the_weights(ckpt):
    edit_config(ckpt, num_hidden_layers=2, compress_ratios=[0, 4, 0])
    expect(ckpt, "unexpected tensor layers.2.", "num_hidden_layers=2")


def test_config_with_another_width(ckpt):
    edit_config(ckpt, moe_intermediate_size=256)
    expect(ckpt, "tensor layers.0.ffn.", "expected [", "config does not match the weights")


def test_config_declaring_no_quantization(ckpt):
    with open(os.path.join(ckpt, "config.json")) as f:
        c = json.load(f)
    del c["quantization_config"], c["expert_dtype"]
    with open(os.path.join(ckpt, "config.json"), "w") as f:
        json.dump(c, f)
    expect(ckpt, "unexpected tensor", "declares this weight unquantized")


def test_expert_ids_outside_the_config(ckpt):
    def bad(t):
        tid = t["layers.1.ffn.gate.tid2eid"].copy()
        tid[3, 1] = 8
        t["layers.1.ffn.gate.tid2eid"] = tid

    rewrite(ckpt, S2, bad)
    expect(ckpt, S2, "layers.1.ffn.gate.tid2eid", "outside [0, n_routed_experts=8)")


def test_nan_scale(ckpt):
    def bad(t):
        s = t["layers.2.attn.wo_b.scale"].view(np.uint8).copy()
        s[0, 0] = 255
        t["layers.2.attn.wo_b.scale"] = s.view(ml_dtypes.float8_e8m0fnu)

    rewrite(ckpt, S3, bad)
    expect(ckpt, S3, "layers.2.attn.wo_b.scale", "NaN scale")


def test_missing_config(ckpt):
    os.remove(os.path.join(ckpt, "config.json"))
    expect(ckpt, "config.json not found")


def test_bad_config_value(ckpt):
    edit_config(ckpt, o_groups=3)
    expect(ckpt, "config.json", "o_groups")


def test_not_a_checkpoint(tmp_path):
    shutil.copyfile(os.path.join(DEMO, "config.json"), tmp_path / "config.json")
    expect(str(tmp_path), "no model.safetensors.index.json and no model.safetensors")
    with pytest.raises(CheckpointError, match="not a directory"):
        load_checkpoint(str(tmp_path / "nope"))


def test_structural_errors_come_before_any_data_is_read(ckpt, monkeypatch):
    """A fault in the last shard stops the load before the first tensor's bytes are read."""
    reads = []
    real = safetensors_io.read_tensor
    monkeypatch.setattr(safetensors_io, "read_tensor", lambda e: reads.append(e.name) or real(e))
    rewrite(ckpt, S3, lambda t: t.pop("mtp.0.norm.weight"))
    reads.clear()
    expect(ckpt, "missing tensor mtp.0.norm.weight")
    assert reads == []


def test_tokenizer_checks(ckpt):
    from dsv4_jax.config import Config

    cfg = Config.from_json(ckpt)
    assert load_tokenizer(ckpt, cfg).token_to_id("<｜User｜>") is not None
    with pytest.raises(CheckpointError, match="bos_token .* has id 0, config.json says bos_token_id=5"):
        load_tokenizer(ckpt, cfg.replace(bos_token_id=5))
    with pytest.raises(CheckpointError, match="vocab_size=512"):
        load_tokenizer(ckpt, cfg.replace(vocab_size=512))
    os.remove(os.path.join(ckpt, "tokenizer.json"))
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        load_tokenizer(ckpt, cfg)
