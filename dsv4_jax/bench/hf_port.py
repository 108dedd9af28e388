"""The Hugging Face ``deepseek_v4`` port as a live CPU oracle (HF_ORACLE.md).

Builds the HF model from one of our configs, loads *our* params into it (name map of
HF_ORACLE.md §5), and runs it in float32. Used by the parity tests, the decode benchmark and
the numerics report; it needs the ``oracle`` extra (torch, transformers), so nothing on the
serving path imports this module.
"""

from __future__ import annotations

import numpy as np
import torch
from flax import nnx
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

from dsv4_jax.config import Config
from dsv4_jax.model.params import to_native

torch.set_num_threads(2)


def hf_config(cfg: Config) -> DeepseekV4Config:
    """Our config in HF's form: explicit layer types and compression rates."""
    kinds = {
        "swa": "sliding_attention",
        "csa": "compressed_sparse_attention",
        "hca": "heavily_compressed_attention",
    }
    n = cfg.num_hidden_layers
    hca = sorted({cfg.compress_ratios[i] for i in range(n) if cfg.attn_kind(i) == "hca"})
    if len(hca) > 1:
        raise ValueError(f"HF supports one HCA ratio per model, config has {hca}")
    rope: dict = {"rope_type": "default"}
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        rope = {
            "rope_type": "yarn",
            "factor": rs.factor,
            "beta_fast": rs.beta_fast,
            "beta_slow": rs.beta_slow,
            "original_max_position_embeddings": rs.original_max_position_embeddings,
        }
    hf = DeepseekV4Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        moe_intermediate_size=cfg.moe_intermediate_size,
        num_hidden_layers=n,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=1,
        head_dim=cfg.head_dim,
        q_lora_rank=cfg.q_lora_rank,
        num_experts_per_tok=cfg.num_experts_per_tok,
        n_routed_experts=cfg.n_routed_experts,
        n_shared_experts=cfg.n_shared_experts,
        routed_scaling_factor=cfg.routed_scaling_factor,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        compress_rope_theta=cfg.compress_rope_theta,
        layer_types=[kinds[cfg.attn_kind(i)] for i in range(n)],
        compress_rates={
            "compressed_sparse_attention": cfg.compress_rate_csa,
            "heavily_compressed_attention": hca[0] if hca else 128,
        },
        mlp_layer_types=["hash_moe" if cfg.mlp_kind(i) == "hash" else "moe" for i in range(n)],
        hc_mult=cfg.hc_mult,
        hc_sinkhorn_iters=cfg.hc_sinkhorn_iters,
        hc_eps=cfg.hc_eps,
        swiglu_limit=cfg.swiglu_limit,
        sliding_window=cfg.sliding_window,
        o_groups=cfg.o_groups,
        o_lora_rank=cfg.o_lora_rank,
        index_n_heads=cfg.index_n_heads,
        index_head_dim=cfg.index_head_dim,
        index_topk=cfg.index_topk,
        rms_norm_eps=cfg.rms_norm_eps,
        partial_rotary_factor=cfg.qk_rope_head_dim / cfg.head_dim,
        rope_parameters=rope,
        num_nextn_predict_layers=0,
        tie_word_embeddings=False,
    )
    hf._attn_implementation = "eager"
    hf._experts_implementation = "eager"
    return hf


def _t(x) -> torch.Tensor:
    a = np.asarray(x)
    return torch.from_numpy(a.astype(np.int64) if a.dtype.kind in "iu" else a.astype(np.float32).copy())


def _compressor(sd: dict, prefix: str, p: dict):
    sd[f"{prefix}.kv_proj.weight"] = _t(p["wkv"]["weight"])
    sd[f"{prefix}.gate_proj.weight"] = _t(p["wgate"]["weight"])
    sd[f"{prefix}.position_bias"] = _t(p["ape"])
    sd[f"{prefix}.kv_norm.weight"] = _t(p["norm"]["weight"])


def hf_layer_state_dict(lp: dict, pre: str) -> dict[str, torch.Tensor]:
    """One decoder block under HF names, ``pre`` = e.g. ``model.layers.3``."""
    sd: dict[str, torch.Tensor] = {}
    sd[f"{pre}.input_layernorm.weight"] = _t(lp["attn_norm"]["weight"])
    sd[f"{pre}.post_attention_layernorm.weight"] = _t(lp["ffn_norm"]["weight"])
    for ours, theirs in (("hc_attn", "attn_hc"), ("hc_ffn", "ffn_hc")):
        for part in ("fn", "base", "scale"):
            sd[f"{pre}.{theirs}.{part}"] = _t(lp[f"{ours}_{part}"])
    a = lp["attn"]
    at = f"{pre}.self_attn"
    for ours, theirs in (
        ("wq_a", "q_a_proj"),
        ("q_norm", "q_a_norm"),
        ("wq_b", "q_b_proj"),
        ("wkv", "kv_proj"),
        ("kv_norm", "kv_norm"),
        ("wo_a", "o_a_proj"),
        ("wo_b", "o_b_proj"),
    ):
        sd[f"{at}.{theirs}.weight"] = _t(a[ours]["weight"])
    sd[f"{at}.sinks"] = _t(a["attn_sink"])
    if "compressor" in a:
        _compressor(sd, f"{at}.compressor", a["compressor"])
    if "indexer" in a:
        ix = a["indexer"]
        _compressor(sd, f"{at}.compressor.indexer", ix["compressor"])
        sd[f"{at}.compressor.indexer.q_b_proj.weight"] = _t(ix["wq_b"]["weight"])
        sd[f"{at}.compressor.indexer.scorer.weights_proj.weight"] = _t(ix["weights_proj"]["weight"])
    f = lp["ffn"]
    mp = f"{pre}.mlp"
    sd[f"{mp}.gate.weight"] = _t(f["gate"]["weight"])
    if "bias" in f["gate"]:
        sd[f"{mp}.gate.e_score_correction_bias"] = _t(f["gate"]["bias"])
    if "tid2eid" in f["gate"]:
        sd[f"{mp}.gate.tid2eid"] = _t(f["gate"]["tid2eid"])
    e = f["experts"]
    sd[f"{mp}.experts.gate_up_proj"] = torch.cat([_t(e["w1"]["weight"]), _t(e["w3"]["weight"])], dim=1)
    sd[f"{mp}.experts.down_proj"] = _t(e["w2"]["weight"])
    for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
        sd[f"{mp}.shared_experts.{theirs}.weight"] = _t(f["shared_experts"][ours]["weight"])
    return sd


def hf_state_dict(params) -> dict[str, torch.Tensor]:
    """Our params (``nnx.State`` or the native tree) under HF's module names (HF_ORACLE.md §5)."""
    params = to_native(params) if isinstance(params, nnx.State) else params
    sd = {
        "model.embed_tokens.weight": _t(params["embed"]["weight"]),
        "lm_head.weight": _t(params["head"]["weight"]),
        "model.norm.weight": _t(params["norm"]["weight"]),
        "model.hc_head.hc_fn": _t(params["hc_head_fn"]),
        "model.hc_head.hc_base": _t(params["hc_head_base"]),
        "model.hc_head.hc_scale": _t(params["hc_head_scale"]),
    }
    for i, lp in enumerate(params["layers"]):
        sd.update(hf_layer_state_dict(lp, f"model.layers.{i}"))
    return sd


def hf_model(cfg: Config, params: dict) -> DeepseekV4ForCausalLM:
    """The HF model in float32 eval mode holding exactly ``params``."""
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(hf_config(cfg)).float().eval()
    missing, unexpected = model.load_state_dict(hf_state_dict(params), strict=False)
    missing = [m for m in missing if "rotary_emb" not in m]
    if missing or unexpected:
        raise RuntimeError(f"HF state dict mismatch: missing={missing} unexpected={unexpected}")
    return model


@torch.no_grad()
def hf_logits(model: DeepseekV4ForCausalLM, tokens: np.ndarray) -> np.ndarray:
    """Full-sequence logits f32[B,T,V] (no cache)."""
    out = model(input_ids=torch.from_numpy(np.asarray(tokens, np.int64)), use_cache=False)
    return out.logits.float().numpy()
