"""Random checkpoints in the published DeepSeek-V4 format (ARCHITECTURE.md §8), at named sizes.

The benchmarks and the numerics report need real-format checkpoints (FP8 e4m3 linears with
UE8M0 128x128 scales, MXFP4 routed experts, I64 ``tid2eid``) that the loader reads exactly as
it reads a published one. Weights are ``safetensors_writer.random_value`` (seeded per tensor
name, so a seed gives the same bytes on every machine); the tokenizer is the demo's.

Sizes: ``tiny`` (the demo's widths), ``mid`` (the decode benchmark's: hidden 1024, 8 heads of
512, 16 experts), and ``narrow`` (hidden 256, heads of 128, window 32, CSA 4 / HCA 128 after a
short SWA prefix: many compressed entries and top-k choices at prompt lengths of a few hundred).
"""

from __future__ import annotations

import os
import shutil

from dsv4_jax.checkpoint import placement
from dsv4_jax.checkpoint.demo import DEMO as DEMO_CONFIG
from dsv4_jax.checkpoint.safetensors_writer import native_tensors, random_value, write_native
from dsv4_jax.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "checkpoints", "demo")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
EXTRA_CONFIG = {"torch_dtype": "bfloat16", "attention_bias": False, "attention_dropout": 0.0}

# Mid size: 6 layers [SWA, CSA, HCA, CSA, HCA, SWA] + an SWA MTP block, hidden 1024,
# 8 heads x 512, 16 routed experts (top-4) + 1 shared, vocab 32768. Tiny: the demo's widths.
COMMON = {  # RoPE, scaling and weight formats: the published ones, as the demo
    k: DEMO_CONFIG[k]
    for k in (
        "routed_scaling_factor",
        "rope_theta",
        "compress_rope_theta",
        "rope_scaling",
        "max_position_embeddings",
        "weight_dtype",
        "expert_dtype",
    )
}
DEMO_SHAPE = {k: v for k, v in DEMO_CONFIG.items() if k not in COMMON}
SIZES = {
    "mid": dict(
        vocab_size=32768,
        hidden_size=1024,
        num_hidden_layers=6,
        num_attention_heads=8,
        head_dim=512,
        qk_rope_head_dim=64,
        q_lora_rank=512,
        o_groups=4,
        o_lora_rank=256,
        sliding_window=128,
        index_n_heads=16,
        index_head_dim=128,
        index_topk=512,
        compress_ratios=(0, 4, 128, 4, 128, 0, 0),
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        moe_intermediate_size=512,
        num_hash_layers=2,
    ),
    # Issue 19's CPU target: Flash's layer pattern (2 SWA, then CSA/HCA alternating) over 8 layers,
    # hidden 768, 32 experts top-6, and Flash's 1M-token max_position_embeddings, so defaults
    # (no max_model_len) meet a 1M-wide block table. The rest as ``mid``.
    "mid1m": None,
    "tiny": dict(DEMO_SHAPE),  # the demo's architecture
    # V4's decision regime at a few hundred tokens: the indexer keeps every entry (Flash's top-512
    # drops none below 2K tokens), 32 experts top-6, 3 hash layers; the demo's other widths.
    "flashlike": {
        **DEMO_SHAPE,
        "num_hidden_layers": 5,
        "index_topk": 128,
        "compress_ratios": (0, 0, 4, 128, 4, 0),
        "n_routed_experts": 32,
        "num_experts_per_tok": 6,
        "num_hash_layers": 3,
    },
    "narrow": {
        **DEMO_SHAPE,
        "num_hidden_layers": 5,
        "sliding_window": 32,
        "index_topk": 8,
        "compress_ratios": (0, 4, 128, 4, 128, 0),
        "num_hash_layers": 1,
    },
}

SIZES["mid1m"] = {
    **SIZES["mid"],
    "hidden_size": 768,
    "num_hidden_layers": 8,
    "compress_ratios": (0, 0, 4, 128, 4, 128, 4, 0, 0),
    "n_routed_experts": 32,
    "num_experts_per_tok": 6,
    "num_hash_layers": 3,
    "max_position_embeddings": 1 << 20,
}


def size_config(size: str, **overrides) -> Config:
    """The ``Config`` of a named size (``SIZES``), published-format storage."""
    if size not in SIZES:
        raise ValueError(f"unknown checkpoint size {size!r}; known: {sorted(SIZES)}")
    return Config(**{**COMMON, **SIZES[size], **overrides})


def build_random(out_dir: str, cfg: Config, seed: int = 0) -> str:
    """Write (once) a random checkpoint of ``cfg`` in the published format, one shard per layer,
    with the demo's tokenizer files; returns ``out_dir``. An existing complete directory is
    kept (written to ``.partial`` and renamed, so an interrupted write is never mistaken for one)."""
    if os.path.exists(os.path.join(out_dir, "model.safetensors.index.json")):
        return out_dir
    tmp = out_dir + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shards = [[k] for k in placement.chunk_keys(cfg, include_mtp=True)]
    write_native(
        tmp, cfg, shards, lambda spec: native_tensors(spec, random_value(spec, cfg, seed)), EXTRA_CONFIG
    )
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(DEMO, name), tmp)
    os.replace(tmp, out_dir)
    return out_dir
