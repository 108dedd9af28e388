"""Where loaded arrays go: per-leaf shardings from logical axes, and the tree's chunks.

Shardings come from the one rules table of ``dsv4_jax/parallel/rules.py``. A checkpoint
adds arrays the rules never saw: the packed bytes and UE8M0 scale grids of a
``QuantizedWeight`` (``quant.py``). They reuse the weight's logical axes, and any
mesh axis that does not divide a dimension (a 2-row scale grid over a 4-way
``tensor`` axis) is dropped to replication rather than failing: scales are 1/32
to 1/16384 of their weight, so replicating one costs little.

Chunks are the unit of restartable conversion and of bounded host memory:
``globals`` (embed, head, final norm, HC head), then one per main layer and one
per MTP block (ARCHITECTURE.md §8 names: ``layers.{i}``, ``mtp.{k}``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from dsv4_jax.config import Config
from dsv4_jax.model.params import ArrayInfo
from dsv4_jax.parallel.rules import DEFAULT_RULES, logical_to_spec


def fitted_sharding(
    shape: tuple[int, ...],
    axes: tuple[str | None, ...],
    mesh: jax.sharding.Mesh,
    rules: Mapping[str, str | None] = DEFAULT_RULES,
) -> NamedSharding:
    """NamedSharding for an array of ``shape`` with logical ``axes``; non-dividing mesh axes dropped."""
    spec = logical_to_spec(axes, rules, tuple(mesh.axis_names))
    fitted = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        ways = math.prod(mesh.shape[n] for n in names)
        fitted.append(entry if ways and dim % ways == 0 else None)
    return NamedSharding(mesh, PartitionSpec(*fitted))


def put(x, axes: tuple[str | None, ...], mesh: jax.sharding.Mesh | None, rules=DEFAULT_RULES) -> jax.Array:
    """Host array -> device array, sharded over ``mesh`` when one is given."""
    if mesh is None:
        return jax.device_put(x)
    return jax.device_put(x, fitted_sharding(tuple(x.shape), axes, mesh, rules))


# ----------------------------------------------------------------------------- chunks
GLOBALS = "globals"


def chunk_keys(cfg: Config, include_mtp: bool = True) -> list[str]:
    keys = [GLOBALS] + [f"layers.{i}" for i in range(cfg.num_hidden_layers)]
    if include_mtp:
        keys += [f"mtp.{k}" for k in range(cfg.num_nextn_predict_layers)]
    return keys


def get_chunk(tree: dict, key: str) -> Any:
    """The sub-tree of ``tree`` (a param-shaped tree) that chunk ``key`` covers."""
    if key == GLOBALS:
        return {k: v for k, v in tree.items() if k not in ("layers", "mtp")}
    group, idx = key.split(".")
    return tree[group][int(idx)]


def assemble(chunks: Mapping[str, Any]) -> dict:
    """Inverse of ``get_chunk`` over all keys: the full param tree."""
    tree = dict(chunks[GLOBALS])
    for group in ("layers", "mtp"):
        idx = sorted(int(k.split(".")[1]) for k in chunks if k.startswith(group + "."))
        if idx:
            if idx != list(range(len(idx))):
                raise ValueError(f"{group}: chunks {idx} are not contiguous from 0")
            tree[group] = [chunks[f"{group}.{i}"] for i in idx]
    return tree


def leaf_names(tree) -> Any:
    """A tree shaped like ``tree`` whose leaves are their native names (``layers.0.attn.wq_a.weight``)."""

    def name(path, _):
        parts = []
        for k in path:
            parts.append(str(k.key if hasattr(k, "key") else k.idx))
        return ".".join(parts)

    return jax.tree_util.tree_map_with_path(name, tree, is_leaf=lambda x: isinstance(x, ArrayInfo))
