"""Logical axis names → mesh axes: the one table that decides how arrays are laid out.

Every parameter (``params.param_infos``) carries logical axis names. Layer code never
names devices; changing a layout is an edit of ``DEFAULT_RULES``. Names missing from
the table are an error, so a new logical axis cannot silently end up replicated.
"""

from __future__ import annotations

from typing import Mapping

import jax
from jax.sharding import NamedSharding, PartitionSpec

# logical axis -> mesh axis (or None: replicated). Mesh axes: data, expert, tensor.
DEFAULT_RULES: Mapping[str, str | None] = {
    "vocab": "tensor",
    "vocab_table": None,
    "embed": None,
    "embed_out": None,
    "q_lora": None,
    "q_heads": "tensor",
    "heads": "tensor",
    "head_dim": None,
    "o_lora": "tensor",
    "o_group_in": None,
    "cmp_dim": None,
    "index_heads": None,
    "index_heads_w": None,
    "router": None,
    "expert": "expert",
    "mlp": "tensor",
    "shared_mlp": "tensor",
    "hc_in": None,
    # decode state (kv_cache.state_axes)
    "kv_slot": None,
    "kv_block": None,
    "window": None,
    "kv_entry": None,
    "tail_row": None,
    "kv_dim": None,
}


def logical_to_spec(axes: tuple[str | None, ...], rules: Mapping[str, str | None] = DEFAULT_RULES,
                    mesh_axes: tuple[str, ...] | None = None) -> PartitionSpec:
    """PartitionSpec for one array; mesh axes absent from ``mesh_axes`` become replicated."""
    out = []
    for name in axes:
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no entry in the sharding rules")
        m = rules[name]
        out.append(m if (m is None or mesh_axes is None or m in mesh_axes) else None)
    return PartitionSpec(*out)


def is_axes(x) -> bool:
    """A logical-axes leaf: a plain tuple of names (a NamedTuple of them is a container)."""
    return type(x) is tuple and all(a is None or isinstance(a, str) for a in x)


def tree_shardings(axes_tree, mesh: jax.sharding.Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES):
    """NamedSharding for every leaf of a tree of logical-axis tuples."""
    return jax.tree.map(
        lambda a: NamedSharding(mesh, logical_to_spec(a, rules, tuple(mesh.axis_names))),
        axes_tree,
        is_leaf=is_axes,
    )
