"""The parameter pytree: shapes, dtypes and logical axis names for every array.

The tree mirrors the native checkpoint names of ARCHITECTURE.md §8 so that the
loader's mapping is mechanical: ``params["layers"][3]["attn"]["wq_a"]["weight"]``
is ``layers.3.attn.wq_a.weight``. Two structural differences:

* routed experts are stacked: ``ffn.experts.w1.weight`` is ``[E, I, D]`` where the
  checkpoint has ``ffn.experts.{j}.w1.weight`` per expert;
* the MTP blocks live under ``params["mtp"][k]`` (native ``mtp.{k}.*``).

``param_infos(cfg, dtype)`` describes the tree without allocating anything
(``ArrayInfo`` leaves); ``init_params`` fills it with random values;
``logical_axes`` gives the per-leaf logical axis names that ``sharding.py``
maps onto a device mesh.

Tensors that the reference keeps in fp32 (mHC, sinks, ``ape``, router bias, norm
weights) stay fp32 whatever weight dtype is chosen (§2, §8).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax.config import Config


@dataclasses.dataclass(frozen=True)
class ArrayInfo:
    """Shape, dtype and logical axes of one parameter; ``init`` names its random init."""

    shape: tuple[int, ...]
    dtype: Any
    axes: tuple[str | None, ...]
    init: str  # "linear" | "norm" | "normal" | "scale" | "tid2eid"

    def __post_init__(self):
        assert len(self.shape) == len(self.axes), (self.shape, self.axes)


def _is_info(x) -> bool:
    return isinstance(x, ArrayInfo)


def _linear(out: int, inp: int, dtype, axes) -> dict:
    return {"weight": ArrayInfo((out, inp), dtype, axes, "linear")}


def _norm(n: int, axis: str) -> dict:
    return {"weight": ArrayInfo((n,), jnp.float32, (axis,), "norm")}


def _compressor_infos(cfg: Config, ratio: int, dim: int, dtype) -> dict:
    """§5.2: ``c = 2`` channels per token in overlap mode (CSA), else 1."""
    c = 2 if ratio == cfg.compress_rate_csa else 1
    d = cfg.hidden_size
    return {
        # The reference runs the compressor projections in fp32 (§8 last bullet).
        "wkv": _linear(c * dim, d, jnp.float32, ("cmp_dim", "embed")),
        "wgate": _linear(c * dim, d, jnp.float32, ("cmp_dim", "embed")),
        "ape": ArrayInfo((ratio, c * dim), jnp.float32, (None, "cmp_dim"), "normal"),
        "norm": _norm(dim, "cmp_dim"),
    }


def _attn_infos(cfg: Config, layer: int, dtype) -> dict:
    d, h, k = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    g, r = cfg.o_groups, cfg.o_lora_rank
    p = {
        "wq_a": _linear(cfg.q_lora_rank, d, dtype, ("q_lora", "embed")),
        "q_norm": _norm(cfg.q_lora_rank, "q_lora"),
        "wq_b": _linear(h * k, cfg.q_lora_rank, dtype, ("q_heads", "q_lora")),
        "wkv": _linear(k, d, dtype, ("head_dim", "embed")),
        "kv_norm": _norm(k, "head_dim"),
        # [G*o_lora, (H/G)*K]: group g maps heads g*H/G.. to rows g*o_lora.. (§5.1)
        "wo_a": _linear(g * r, h * k // g, dtype, ("o_lora", "o_group_in")),
        "wo_b": _linear(d, g * r, dtype, ("embed", "o_lora")),
        "attn_sink": ArrayInfo((h,), jnp.float32, ("heads",), "normal"),
    }
    kind = cfg.attn_kind(layer)
    if kind != "swa":
        p["compressor"] = _compressor_infos(cfg, cfg.compress_ratio(layer), k, dtype)
    if kind == "csa":
        ih, ik = cfg.index_n_heads, cfg.index_head_dim
        p["indexer"] = {
            "wq_b": _linear(ih * ik, cfg.q_lora_rank, dtype, ("index_heads", "q_lora")),
            "weights_proj": _linear(ih, d, dtype, ("index_heads_w", "embed")),
            "compressor": _compressor_infos(cfg, cfg.compress_ratio(layer), ik, dtype),
        }
    return p


def _ffn_infos(cfg: Config, layer: int, dtype) -> dict:
    d, e, i = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
    si = cfg.shared_intermediate_size
    gate: dict = {"weight": ArrayInfo((e, d), dtype, ("router", "embed"), "linear")}
    if cfg.mlp_kind(layer) == "hash":
        gate["tid2eid"] = ArrayInfo(
            (cfg.vocab_size, cfg.num_experts_per_tok), jnp.int32, ("vocab_table", None), "tid2eid"
        )
    else:
        gate["bias"] = ArrayInfo((e,), jnp.float32, ("router",), "normal")
    p = {
        "gate": gate,
        "experts": {
            "w1": {"weight": ArrayInfo((e, i, d), dtype, ("expert", "mlp", "embed"), "linear")},
            "w3": {"weight": ArrayInfo((e, i, d), dtype, ("expert", "mlp", "embed"), "linear")},
            "w2": {"weight": ArrayInfo((e, d, i), dtype, ("expert", "embed", "mlp"), "linear")},
        },
    }
    if si > 0:
        p["shared_experts"] = {
            "w1": _linear(si, d, dtype, ("shared_mlp", "embed")),
            "w3": _linear(si, d, dtype, ("shared_mlp", "embed")),
            "w2": _linear(d, si, dtype, ("embed", "shared_mlp")),
        }
    return p


def _hc_infos(cfg: Config, prefix: str) -> dict:
    n, d = cfg.hc_mult, cfg.hidden_size
    rows = cfg.hc_dim if prefix != "hc_head" else n
    nscale = 3 if prefix != "hc_head" else 1
    return {
        f"{prefix}_fn": ArrayInfo((rows, n * d), jnp.float32, (None, "hc_in"), "linear"),
        f"{prefix}_base": ArrayInfo((rows,), jnp.float32, (None,), "normal"),
        f"{prefix}_scale": ArrayInfo((nscale,), jnp.float32, (None,), "scale"),
    }


def _block_infos(cfg: Config, layer: int, dtype) -> dict:
    d = cfg.hidden_size
    return {
        "attn_norm": _norm(d, "embed"),
        "ffn_norm": _norm(d, "embed"),
        **_hc_infos(cfg, "hc_attn"),
        **_hc_infos(cfg, "hc_ffn"),
        "attn": _attn_infos(cfg, layer, dtype),
        "ffn": _ffn_infos(cfg, layer, dtype),
    }


def param_infos(cfg: Config, dtype=jnp.bfloat16, include_mtp: bool = True) -> dict:
    """The whole parameter tree as ``ArrayInfo`` leaves (nothing allocated)."""
    d, v = cfg.hidden_size, cfg.vocab_size
    tree: dict = {
        "embed": {"weight": ArrayInfo((v, d), dtype, ("vocab", "embed"), "normal")},
        "head": {"weight": ArrayInfo((v, d), dtype, ("vocab", "embed"), "linear")},
        "norm": _norm(d, "embed"),
        **_hc_infos(cfg, "hc_head"),
        "layers": [_block_infos(cfg, i, dtype) for i in range(cfg.num_hidden_layers)],
    }
    if include_mtp and cfg.num_nextn_predict_layers:
        tree["mtp"] = []
        for k in range(cfg.num_nextn_predict_layers):
            blk = _block_infos(cfg, cfg.num_hidden_layers + k, dtype)
            blk.update(
                e_proj=_linear(d, d, dtype, ("embed_out", "embed")),
                h_proj=_linear(d, d, dtype, ("embed_out", "embed")),
                enorm=_norm(d, "embed"),
                hnorm=_norm(d, "embed"),
                norm=_norm(d, "embed"),
                **_hc_infos(cfg, "hc_head"),
            )
            tree["mtp"].append(blk)
    return tree


def count_params(cfg: Config, include_mtp: bool = False) -> int:
    """Number of weights (integer lookup tables such as ``tid2eid`` excluded)."""
    leaves = jax.tree.leaves(param_infos(cfg, include_mtp=include_mtp), is_leaf=_is_info)
    return sum(math.prod(a.shape) for a in leaves if a.init != "tid2eid")


def logical_axes(tree) -> Any:
    """Per-leaf logical axis names for a tree of ``ArrayInfo`` (or arrays shaped like one)."""
    return jax.tree.map(lambda a: a.axes, tree, is_leaf=_is_info)


def abstract_params(cfg: Config, dtype=jnp.bfloat16) -> Any:
    """``jax.ShapeDtypeStruct`` leaves, for ``eval_shape`` / orbax restore targets."""
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), param_infos(cfg, dtype), is_leaf=_is_info
    )


def _init_leaf(info: ArrayInfo, key, cfg: Config):
    shape, dtype = info.shape, info.dtype
    if info.init == "tid2eid":
        # Distinct experts per token: the HF default (all zeros) would send every
        # token to expert 0 and hide routing bugs (HF_ORACLE.md §8.2).
        keys = jax.random.split(key, shape[0])
        perm = jax.vmap(lambda k: jax.random.permutation(k, cfg.n_routed_experts)[: shape[1]])(keys)
        return perm.astype(jnp.int32)
    if info.init == "linear":
        x = jax.random.normal(key, shape, jnp.float32) / math.sqrt(shape[-1])
    elif info.init == "norm":
        x = 1.0 + 0.25 * jax.random.normal(key, shape, jnp.float32)
    elif info.init == "scale":
        x = 0.5 + jax.random.uniform(key, shape, jnp.float32)
    else:  # "normal": unit-scale values for sinks, ape, biases, embeddings
        x = jax.random.normal(key, shape, jnp.float32)
    return x.astype(dtype)


def init_params(cfg: Config, key: jax.Array, dtype=jnp.float32, include_mtp: bool = True) -> Any:
    """Random parameters at unit scale with non-degenerate buffers.

    Linears are N(0, 1/fan_in) so activations stay unit-scale; sinks, ``ape``, mHC
    ``base`` and the router bias are N(0, 1) (the HF default of zeros would hide bugs
    in their handling); norm weights are 1 ± 0.25; ``tid2eid`` holds distinct experts.
    """
    infos = param_infos(cfg, dtype, include_mtp=include_mtp)
    leaves, treedef = jax.tree.flatten(infos, is_leaf=_is_info)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [_init_leaf(a, k, cfg) for a, k in zip(leaves, keys)])


def native_names(tree, map_fn: Callable[[str, Any], Any] = lambda n, x: x) -> dict[str, Any]:
    """Flatten a param tree to ``{native_name: map_fn(name, leaf)}`` (experts still stacked).

    ``layers.{i}.`` and ``mtp.{k}.`` come from list indices; dict keys join with '.'.
    """
    out: dict[str, Any] = {}

    def walk(prefix: str, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(f"{prefix}.{i}", v)
        else:
            out[prefix] = map_fn(prefix, node)

    walk("", tree)
    return out
