"""Model configuration for DeepSeek-V4, built from a DeepSeek ``config.json``.

Field names are the Hugging Face / DeepSeek names of ARCHITECTURE.md §1.1, so a
real ``config.json`` loads without renaming. The config is a frozen, hashable
dataclass: it is passed to jitted functions as a static argument, and every
per-layer variation (attention kind, hash routing) is read from data
(``compress_ratios``, ``num_hash_layers``), never from layer-number tests in code.

Layer kinds (§1.2): ``compress_ratios[i] == 0`` is a sliding-window-only layer,
``== compress_rate_csa`` (4 in the shipped models) is CSA (overlapping compressor
plus lightning indexer), any other positive ratio is HCA (non-overlapping
compressor, dense). The list has one entry per main layer plus one per MTP block.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Literal

AttnKind = Literal["swa", "csa", "hca"]
MlpKind = Literal["hash", "topk"]


class ConfigError(ValueError):
    """A config value is missing, malformed or inconsistent; the message names the field."""


@dataclasses.dataclass(frozen=True)
class YarnScaling:
    """YaRN frequency interpolation for compressed layers only (ARCHITECTURE.md §2)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    qk_rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    sliding_window: int
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    compress_ratios: tuple[int, ...]
    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    num_hash_layers: int
    routed_scaling_factor: float
    num_key_value_heads: int = 1
    n_shared_experts: int = 1
    compress_rate_csa: int = 4
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: YarnScaling | None = None
    max_position_embeddings: int = 1 << 20
    scoring_func: str = "sqrtsoftplus"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    swiglu_limit: float = 10.0
    hidden_act: str = "silu"
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 1
    tie_word_embeddings: bool = False
    bos_token_id: int = 0
    eos_token_id: int = 1
    # Checkpoint storage: "fp8" means non-expert linears are FP8 e4m3 with UE8M0 block
    # scales of ``weight_block_size``; ``expert_dtype`` "fp4" means MXFP4 routed experts.
    weight_dtype: str = "bf16"
    weight_block_size: tuple[int, int] = (128, 128)
    expert_dtype: str | None = None

    def __post_init__(self):
        _validate(self)

    # ------------------------------------------------------------------ layer kinds
    @property
    def num_layers_with_mtp(self) -> int:
        return self.num_hidden_layers + self.num_nextn_predict_layers

    def attn_kind(self, layer: int) -> AttnKind:
        """Attention kind of main layer ``layer``; ``layer >= num_hidden_layers`` is an MTP block."""
        ratio = self.compress_ratios[layer]
        if ratio == 0:
            return "swa"
        return "csa" if ratio == self.compress_rate_csa else "hca"

    def mlp_kind(self, layer: int) -> MlpKind:
        """Hash routing in the first ``num_hash_layers`` main layers; MTP blocks are top-k."""
        return "hash" if layer < min(self.num_hash_layers, self.num_hidden_layers) else "topk"

    def compress_ratio(self, layer: int) -> int:
        return self.compress_ratios[layer]

    @property
    def layer_kinds(self) -> tuple[AttnKind, ...]:
        return tuple(self.attn_kind(i) for i in range(self.num_hidden_layers))

    @property
    def shared_intermediate_size(self) -> int:
        return self.n_shared_experts * self.moe_intermediate_size

    @property
    def qat_trained(self) -> bool:
        """Whether the checkpoint is in the published QAT-trained format (FP8 block-scaled
        linears): DeepSeek trained those weights with FP8 KV rows and FP4 indexer keys in the
        forward (§2, §11.2), so serving applies the same rounding by default (``LLM(qat=None)``).
        A checkpoint of plain BF16 / FP32 weights (e.g. saved by the HF port) was not."""
        return self.weight_dtype == "fp8"

    @property
    def hc_dim(self) -> int:
        """Width of the mHC projection output: pre (n) + post (n) + comb (n*n), §4."""
        return (2 + self.hc_mult) * self.hc_mult

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Config:
        """Build from a DeepSeek/HF ``config.json`` dict; unknown keys are ignored."""
        d = dict(raw)
        mt = d.get("model_type")
        if mt is not None and mt != "deepseek_v4":
            raise ConfigError(f"model_type: expected 'deepseek_v4', got {mt!r}")
        kwargs: dict[str, Any] = {}
        names = {f.name for f in dataclasses.fields(cls)}
        for key in names:
            if key in d:
                kwargs[key] = d[key]
        if "compress_ratios" not in d:
            raise ConfigError("compress_ratios: missing (one entry per layer plus one per MTP block)")
        kwargs["compress_ratios"] = tuple(int(r) for r in d["compress_ratios"])
        rs = d.get("rope_scaling")
        if rs:
            rtype = rs.get("type", rs.get("rope_type"))
            if rtype != "yarn":
                raise ConfigError(f"rope_scaling.type: only 'yarn' is supported, got {rtype!r}")
            try:
                kwargs["rope_scaling"] = YarnScaling(
                    factor=float(rs["factor"]),
                    original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
                    beta_fast=float(rs.get("beta_fast", 32)),
                    beta_slow=float(rs.get("beta_slow", 1)),
                )
            except KeyError as e:
                raise ConfigError(f"rope_scaling.{e.args[0]}: missing") from None
        else:
            kwargs["rope_scaling"] = None
        q = d.get("quantization_config")
        if q:
            if q.get("quant_method") != "fp8":
                raise ConfigError(
                    f"quantization_config.quant_method: only 'fp8' is supported, got {q.get('quant_method')!r}"
                )
            kwargs["weight_dtype"] = "fp8"
            kwargs["weight_block_size"] = tuple(int(b) for b in q.get("weight_block_size", (128, 128)))
            kwargs["expert_dtype"] = d.get("expert_dtype", q.get("expert_dtype"))
        else:
            kwargs["expert_dtype"] = d.get("expert_dtype")
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = int(kwargs["eos_token_id"][0])
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.name not in kwargs
        ]
        if missing:
            raise ConfigError(f"{missing[0]}: missing from config.json")
        for f in dataclasses.fields(cls):
            if f.name in kwargs and f.type in ("int", "float", "bool") and kwargs[f.name] is not None:
                kwargs[f.name] = _coerce(f.name, f.type, kwargs[f.name])
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Config:
        """Read ``config.json`` (a file, or a checkpoint directory holding one)."""
        p = os.fspath(path)
        if os.path.isdir(p):
            p = os.path.join(p, "config.json")
        try:
            with open(p) as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config.json not found at {p}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON ({e})") from None
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` form (DeepSeek/HF field names), inverse of ``from_dict``."""
        d: dict[str, Any] = {
            "architectures": ["DeepseekV4ForCausalLM"],
            "model_type": "deepseek_v4",
        }
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("weight_dtype", "weight_block_size", "expert_dtype", "rope_scaling"):
                continue
            d[f.name] = list(v) if isinstance(v, tuple) else v
        if self.rope_scaling is not None:
            d["rope_scaling"] = {"type": "yarn", **dataclasses.asdict(self.rope_scaling)}
        if self.weight_dtype == "fp8":
            d["quantization_config"] = {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "scale_fmt": "ue8m0",
                "weight_block_size": list(self.weight_block_size),
                "activation_scheme": "dynamic",
            }
        if self.expert_dtype is not None:
            d["expert_dtype"] = self.expert_dtype
        return d

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)


def _coerce(name: str, typ: str, value: Any):
    try:
        if typ == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if typ == "float":
            return float(value)
        if typ == "bool":
            if not isinstance(value, bool):
                raise TypeError
            return value
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {typ}, got {value!r}") from None
    return value


def _validate(c: Config) -> None:
    def need(cond: bool, field: str, msg: str):
        if not cond:
            raise ConfigError(f"{field}: {msg} (got {getattr(c, field)!r})")

    for name in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "head_dim",
        "q_lora_rank",
        "o_groups",
        "o_lora_rank",
        "sliding_window",
        "n_routed_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "hc_mult",
        "hc_sinkhorn_iters",
        "compress_rate_csa",
    ):
        v = getattr(c, name)
        need(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, "must be a positive int")
    need(c.num_key_value_heads == 1, "num_key_value_heads", "DeepSeek-V4 has one shared K=V head")
    need(
        0 < c.qk_rope_head_dim <= c.head_dim and c.qk_rope_head_dim % 2 == 0,
        "qk_rope_head_dim",
        f"must be even and in (0, head_dim={c.head_dim}]",
    )
    need(
        c.num_attention_heads % c.o_groups == 0,
        "o_groups",
        f"must divide num_attention_heads={c.num_attention_heads}",
    )
    need(c.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
    need(
        len(c.compress_ratios) == c.num_layers_with_mtp,
        "compress_ratios",
        f"needs {c.num_hidden_layers} + {c.num_nextn_predict_layers} (MTP) entries, "
        f"has {len(c.compress_ratios)}",
    )
    need(all(r >= 0 for r in c.compress_ratios), "compress_ratios", "entries must be >= 0")
    has_csa = any(r == c.compress_rate_csa for r in c.compress_ratios)
    if has_csa:
        for name in ("index_n_heads", "index_head_dim", "index_topk"):
            need(getattr(c, name) > 0, name, "must be positive when the model has CSA layers")
        need(
            c.qk_rope_head_dim <= c.index_head_dim and c.index_head_dim % 2 == 0,
            "index_head_dim",
            f"must be even and >= qk_rope_head_dim={c.qk_rope_head_dim}",
        )
    need(
        c.num_experts_per_tok <= c.n_routed_experts,
        "num_experts_per_tok",
        f"cannot exceed n_routed_experts={c.n_routed_experts}",
    )
    need(c.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
    need(
        0 <= c.num_hash_layers <= c.num_hidden_layers, "num_hash_layers", "must be in [0, num_hidden_layers]"
    )
    need(c.scoring_func == "sqrtsoftplus", "scoring_func", "only 'sqrtsoftplus' is supported")
    need(c.topk_method == "noaux_tc", "topk_method", "only 'noaux_tc' is supported")
    need(c.hidden_act == "silu", "hidden_act", "only 'silu' is supported")
    need(not c.tie_word_embeddings, "tie_word_embeddings", "DeepSeek-V4 has an untied head")
    need(c.rms_norm_eps > 0 and c.hc_eps > 0, "rms_norm_eps", "eps values must be positive")
    need(c.weight_dtype in ("bf16", "fp8"), "weight_dtype", "must be 'bf16' or 'fp8'")
    need(c.expert_dtype in (None, "fp4", "fp8", "bf16"), "expert_dtype", "must be fp4, fp8, bf16 or absent")
    if c.rope_scaling is not None:
        rs = c.rope_scaling
        if not (rs.factor >= 1 and rs.original_max_position_embeddings > 0):
            raise ConfigError(f"rope_scaling: factor must be >= 1 and original length > 0, got {rs}")


# ---------------------------------------------------------------------- presets
_FLASH = dict(
    vocab_size=129280,
    hidden_size=4096,
    num_hidden_layers=43,
    num_attention_heads=64,
    head_dim=512,
    qk_rope_head_dim=64,
    q_lora_rank=1024,
    o_groups=8,
    o_lora_rank=1024,
    sliding_window=128,
    index_n_heads=64,
    index_head_dim=128,
    index_topk=512,
    compress_ratios=(0, 0) + (4, 128) * 20 + (4,) + (0,),
    n_routed_experts=256,
    n_shared_experts=1,
    num_experts_per_tok=6,
    moe_intermediate_size=2048,
    num_hash_layers=3,
    routed_scaling_factor=1.5,
    rope_theta=10000.0,
    compress_rope_theta=160000.0,
    rope_scaling=YarnScaling(16.0, 65536, 32.0, 1.0),
    max_position_embeddings=1 << 20,
    weight_dtype="fp8",
    expert_dtype="fp4",
)

_PRO = dict(
    _FLASH,
    hidden_size=7168,
    num_hidden_layers=61,
    num_attention_heads=128,
    q_lora_rank=1536,
    o_groups=16,
    index_topk=1024,
    compress_ratios=(128, 128) + (4, 128) * 29 + (4,) + (0,),
    n_routed_experts=384,
    moe_intermediate_size=3072,
    routed_scaling_factor=2.5,
)

# Tiny configs for tests. Every one has >= 16 indexer heads: with fewer, ReLU'd index
# scores tie exactly at the top-k boundary and two correct implementations disagree
# (HF_ORACLE.md §8.1).
_TINY = dict(
    vocab_size=512,
    hidden_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    head_dim=64,
    qk_rope_head_dim=16,
    q_lora_rank=64,
    o_groups=2,
    o_lora_rank=32,
    sliding_window=16,
    index_n_heads=16,
    index_head_dim=32,
    index_topk=4,
    compress_ratios=(0, 4, 8, 4, 8, 0, 0),
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    moe_intermediate_size=64,
    num_hash_layers=2,
    routed_scaling_factor=1.5,
    rope_scaling=YarnScaling(4.0, 1024, 32.0, 1.0),
    max_position_embeddings=4096,
)

PRESETS: dict[str, dict[str, Any]] = {
    "flash": _FLASH,
    "pro": _PRO,
    # Every layer kind, small ratios (CSA 4, HCA 8), window 16, YaRN on compressed layers.
    "tiny": _TINY,
    # The shipped ratios (4 / 128) and window (128) at tiny width: HCA entries need > 128 tokens.
    "tiny-shipped": dict(
        _TINY,
        hidden_size=64,
        num_hidden_layers=5,
        num_attention_heads=4,
        head_dim=64,
        qk_rope_head_dim=16,
        q_lora_rank=32,
        o_groups=2,
        o_lora_rank=16,
        sliding_window=128,
        index_topk=8,
        compress_ratios=(0, 4, 128, 4, 128, 0),
        num_hash_layers=1,
        rope_scaling=YarnScaling(16.0, 256, 32.0, 1.0),
        max_position_embeddings=4096,
    ),
    # Pro's pattern (HCA first, no SWA-only layers), wider top-k, 3 hash layers, no YaRN.
    "tiny-pro": dict(
        _TINY,
        num_hidden_layers=5,
        num_attention_heads=8,
        o_groups=4,
        index_topk=6,
        n_routed_experts=6,
        num_experts_per_tok=3,
        compress_ratios=(16, 16, 4, 16, 4, 0),
        num_hash_layers=3,
        routed_scaling_factor=2.5,
        rope_scaling=None,
    ),
}


def preset(name: str) -> Config:
    """A named config: ``flash``, ``pro`` (the shipped values) or a tiny test config."""
    try:
        return Config(**PRESETS[name])
    except KeyError:
        raise ConfigError(f"preset: unknown name {name!r}; known: {sorted(PRESETS)}") from None


def yarn_correction_range(cfg: Config) -> tuple[int, int] | None:
    """(low, high) pair-index range of the YaRN ramp, §2; ``None`` without YaRN."""
    rs = cfg.rope_scaling
    if rs is None:
        return None
    r, base = cfg.qk_rope_head_dim, cfg.compress_rope_theta

    def corr(n_rot: float) -> float:
        return (
            r * math.log(rs.original_max_position_embeddings / (n_rot * 2 * math.pi)) / (2 * math.log(base))
        )

    low = max(math.floor(corr(rs.beta_fast)), 0)
    high = min(math.ceil(corr(rs.beta_slow)), r - 1)
    return low, high
