"""Config: shipped presets exactly, parameter counts, config.json round trips, errors that name the field."""

import json

import pytest

from dsv4_jax.config import PRESETS, Config, ConfigError, preset, yarn_correction_range
from dsv4_jax.model.params import count_params


def test_flash_preset_is_the_shipped_config():
    c = preset("flash")
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (129280, 4096, 43, 64)
    assert (c.head_dim, c.qk_rope_head_dim, c.q_lora_rank, c.o_groups, c.o_lora_rank) == (
        512,
        64,
        1024,
        8,
        1024,
    )
    assert (c.index_n_heads, c.index_head_dim, c.index_topk, c.sliding_window) == (64, 128, 512, 128)
    assert (c.n_routed_experts, c.num_experts_per_tok, c.moe_intermediate_size) == (256, 6, 2048)
    assert (c.routed_scaling_factor, c.num_hash_layers, c.swiglu_limit) == (1.5, 3, 10.0)
    assert c.compress_ratios == (0, 0) + (4, 128) * 20 + (4, 0)
    kinds = c.layer_kinds
    assert kinds[:2] == ("swa", "swa") and kinds.count("csa") == 21 and kinds.count("hca") == 20
    assert c.attn_kind(43) == "swa"  # the MTP block
    assert [c.mlp_kind(i) for i in range(5)] == ["hash"] * 3 + ["topk"] * 2 and c.mlp_kind(43) == "topk"
    assert yarn_correction_range(c) == (15, 25)


def test_pro_preset_is_the_shipped_config():
    c = preset("pro")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.q_lora_rank) == (7168, 61, 128, 1536)
    assert (c.o_groups, c.index_topk, c.n_routed_experts, c.moe_intermediate_size) == (16, 1024, 384, 3072)
    assert c.routed_scaling_factor == 2.5
    kinds = c.layer_kinds
    assert kinds.count("csa") == 30 and kinds.count("hca") == 31 and "swa" not in kinds
    assert kinds[:2] == ("hca", "hca")


def test_parameter_counts():
    flash, pro = preset("flash"), preset("pro")
    assert round(count_params(flash) / 1e9, 2) == 284.33  # ARCHITECTURE.md §0
    assert round((count_params(flash, include_mtp=True) - count_params(flash)) / 1e9, 2) == 6.61
    assert abs(count_params(pro) / 1e9 - 1573) < 0.5
    assert abs(count_params(pro, include_mtp=True) / 1e9 - 1599) < 0.5


@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith("tiny")])
def test_tiny_presets_cover_every_kind(name):
    c = preset(name)
    assert c.index_n_heads >= 16, "fewer indexer heads give exact top-k ties"
    assert {"csa", "hca"} <= set(c.layer_kinds)
    assert {c.mlp_kind(i) for i in range(c.num_hidden_layers)} == {"hash", "topk"}


def test_tiny_family_covers_swa_only_layers():
    assert any("swa" in preset(n).layer_kinds for n in PRESETS if n.startswith("tiny"))


def _real_flash_json() -> dict:
    """A config.json in the published form, including keys we do not model."""
    d = preset("flash").to_dict()
    d.update(
        torch_dtype="bfloat16",
        hc_sinkhorn_iters=20,
        num_key_value_heads=1,
        rope_scaling={
            "type": "yarn",
            "factor": 16,
            "original_max_position_embeddings": 65536,
            "beta_fast": 32,
            "beta_slow": 1,
        },
        eos_token_id=1,
        attention_bias=False,
        first_k_dense_replace=None,
    )
    return d


def test_from_json_roundtrip(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_real_flash_json()))
    c = Config.from_json(path)
    assert c == preset("flash")
    assert Config.from_json(tmp_path) == c  # a checkpoint directory works too
    assert Config.from_dict(c.to_dict()) == c
    assert hash(c) == hash(preset("flash"))  # usable as a jit static argument


@pytest.mark.parametrize(
    "change, field",
    [
        ({"compress_ratios": [0, 4]}, "compress_ratios"),
        ({"o_groups": 7}, "o_groups"),
        ({"hidden_size": -1}, "hidden_size"),
        ({"hidden_size": "big"}, "hidden_size"),
        ({"num_key_value_heads": 8}, "num_key_value_heads"),
        ({"qk_rope_head_dim": 63}, "qk_rope_head_dim"),
        ({"num_experts_per_tok": 300}, "num_experts_per_tok"),
        ({"scoring_func": "softmax"}, "scoring_func"),
        ({"num_hash_layers": 50}, "num_hash_layers"),
        ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling"),
        ({"model_type": "llama"}, "model_type"),
    ],
)
def test_bad_config_names_the_field(change, field):
    d = _real_flash_json()
    d.update(change)
    with pytest.raises(ConfigError, match=field):
        Config.from_dict(d)


def test_missing_field_is_named(tmp_path):
    d = _real_flash_json()
    del d["q_lora_rank"]
    with pytest.raises(ConfigError, match="q_lora_rank"):
        Config.from_dict(d)
    with pytest.raises(ConfigError, match="not found"):
        Config.from_json(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Config.from_json(tmp_path / "bad.json")


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown name"):
        preset("flash-9000")
