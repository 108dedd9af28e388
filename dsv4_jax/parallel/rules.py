"""Logical axis names → mesh axes: the one table that decides how arrays are laid out.

Every parameter (``params.param_infos``), every leaf of the decode state
(``kv_cache.state_axes``), the penalty tables and the step metadata carry logical axis
names. Layer code never names devices; changing a layout is an edit of ``DEFAULT_RULES``
(or a mesh flag, ``mesh.parse_mesh``). Names missing from the table are an error, so a new
logical axis cannot silently end up replicated.

The default layout, on a mesh ``(data, expert, tensor)``:

* **data-parallel attention over data × expert** (``batch``, ``kv_slot``, ``kv_block``): a
  sequence's window ring, compressor tails and paged pools live on one shard, so a decode
  step reads them locally (``dp_attention``). V4 has one shared K=V head (MQA), so tensor
  parallelism cannot split the KV; without this every device would hold every sequence.
* **expert parallelism** (``expert``): routed expert stacks split over ``expert``; tokens
  reach them through ``jax.shard_map`` + all-to-all (``moe_ep``).
* **tensor parallelism** (``q_heads``, ``heads``, ``o_lora``, ``mlp``, ``vocab``): query
  heads, output groups, expert hidden columns and the vocabulary split over ``tensor``.

A rule maps to one mesh axis, a tuple of them (split over their product, first axis
major), or ``None`` (replicated). Mesh axes a mesh lacks are dropped, so the same table
serves a one-axis test mesh and the full 3-axis serving mesh.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dsv4_jax.config import Config
from dsv4_jax.model import state as kvc
from dsv4_jax.model.layers import value
from dsv4_jax.quant import QuantizedWeight

MeshAxes = str | tuple[str, ...] | None

# logical axis -> mesh axis / axes (None: replicated). Mesh axes: data, expert, tensor.
DEFAULT_RULES: Mapping[str, MeshAxes] = {
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
    # step metadata and activations: the batch rows of a step
    "batch": ("data", "expert"),
    # decode state (kv_cache.state_axes) and the per-slot penalty tables
    "kv_slot": ("data", "expert"),
    "kv_block": ("data", "expert"),
    "window": None,
    "kv_entry": None,
    "tail_row": None,
    "kv_dim": None,
}

# Logical axes that must share one mapping: a sequence's batch row, slot and blocks live on
# the same shard, which is what lets dp_attention read the state without communication.
SEQUENCE_AXES = ("batch", "kv_slot", "kv_block")


# Axes the manual (shard_map) regions compute whole on every device: splitting one would make
# a norm, a softmax or the indexer's head sum see a part of its input.
UNSPLIT_AXES = (
    "embed",
    "embed_out",
    "q_lora",
    "head_dim",
    "o_group_in",
    "cmp_dim",
    "index_heads",
    "index_heads_w",
    "router",
    "hc_in",
    "window",
    "kv_entry",
    "tail_row",
    "kv_dim",
)


def _as_tuple(m: MeshAxes) -> tuple[str, ...]:
    return () if m is None else (m,) if isinstance(m, str) else tuple(m)


def _entry(names: tuple[str, ...]):
    return None if not names else names[0] if len(names) == 1 else names


def logical_to_spec(
    axes: tuple[str | None, ...],
    rules: Mapping[str, MeshAxes] = DEFAULT_RULES,
    mesh_axes: tuple[str, ...] | None = None,
) -> PartitionSpec:
    """PartitionSpec for one array; mesh axes absent from ``mesh_axes`` become replicated."""
    out = []
    for name in axes:
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no entry in the sharding rules")
        kept = tuple(m for m in _as_tuple(rules[name]) if mesh_axes is None or m in mesh_axes)
        out.append(_entry(kept))
    return PartitionSpec(*out)


def is_axes(x) -> bool:
    """A logical-axes leaf: a plain tuple of names (a NamedTuple of them is a container)."""
    return type(x) is tuple and all(a is None or isinstance(a, str) for a in x)


def tree_shardings(axes_tree, mesh: jax.sharding.Mesh, rules: Mapping[str, MeshAxes] = DEFAULT_RULES):
    """NamedSharding for every leaf of a tree of logical-axis tuples."""
    return jax.tree.map(
        lambda a: NamedSharding(mesh, logical_to_spec(a, rules, tuple(mesh.axis_names))),
        axes_tree,
        is_leaf=is_axes,
    )


def fit_spec(
    spec: PartitionSpec,
    shape: tuple[int, ...],
    mesh: jax.sharding.Mesh,
    blocks: tuple[int, ...] | None = None,
) -> PartitionSpec:
    """``spec`` with, per dim, the longest prefix of its mesh axes that splits the dim evenly
    (in whole ``blocks[d]``-sized blocks when given: a quantization block never straddles two
    devices). Small arrays (a 2-row scale grid, a batch of 2) replicate instead of failing."""
    out = []
    for d, entry in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = _as_tuple(entry)
        unit = blocks[d] if blocks else 1
        while names and shape[d] % (math.prod(mesh.shape[n] for n in names) * unit):
            names = names[:-1]
        out.append(_entry(names))
    return PartitionSpec(*out)


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh plus the rules table: everything jitted code needs to place and split arrays.

    Hashable (the rules are frozen into sorted items), so it rides in the static
    ``ModelOptions`` and a jit cache entry never outlives its mesh.
    """

    mesh: jax.sharding.Mesh
    rules_items: tuple[tuple[str, MeshAxes], ...]

    @classmethod
    def create(cls, mesh: jax.sharding.Mesh, rules: Mapping[str, MeshAxes] = DEFAULT_RULES) -> Layout:
        items = tuple(
            sorted((k, v if v is None or isinstance(v, str) else tuple(v)) for k, v in rules.items())
        )
        lay = cls(mesh, items)
        lay._validate()
        return lay

    @property
    def rules(self) -> dict[str, MeshAxes]:
        return dict(self.rules_items)

    def _validate(self) -> None:
        r = self.rules
        missing = [n for n in DEFAULT_RULES if n not in r]
        if missing:
            raise ValueError(f"sharding rules: no entry for {missing}")
        seq = {n: self.axes(n) for n in SEQUENCE_AXES}
        if len(set(seq.values())) != 1:
            raise ValueError(
                f"sharding rules: {SEQUENCE_AXES} must map to the same mesh axes (a sequence's row, "
                f"slot and blocks share a shard); got {seq}"
            )
        for name, m in r.items():
            if name in SEQUENCE_AXES or name == "expert":
                continue
            clash = set(_as_tuple(m)) & set(self.batch_axes)
            if clash:
                raise ValueError(
                    f"sharding rules: {name!r} -> {m!r} reuses the sequence axes {sorted(clash)}; "
                    f"weights are replicated over the axes that split sequences"
                )
        split = sorted(n for n in UNSPLIT_AXES if self.axes(n))
        if split:
            raise ValueError(
                f"sharding rules: {split} must map to None: the attention and MoE shard_map regions "
                f"split heads/groups (q_heads, heads, o_lora), experts and F (expert, mlp) only"
            )
        if len(self.axes("expert")) > 1:
            raise ValueError(
                f"sharding rules: 'expert' must map to at most one mesh axis, got {r['expert']!r}"
            )
        if set(self.axes("expert")) & set(self.axes("mlp")):
            raise ValueError("sharding rules: 'expert' and 'mlp' must use different mesh axes")

    # ------------------------------------------------------------------ axes and specs
    def axes(self, logical: str) -> tuple[str, ...]:
        """Mesh axes (present in the mesh) that a logical axis is split over."""
        if logical not in self.rules:
            raise KeyError(f"logical axis {logical!r} has no entry in the sharding rules")
        return tuple(m for m in _as_tuple(self.rules[logical]) if m in self.mesh.axis_names)

    def ways(self, mesh_axes: tuple[str, ...]) -> int:
        return math.prod(self.mesh.shape[a] for a in mesh_axes)

    @property
    def batch_axes(self) -> tuple[str, ...]:
        """Mesh axes that split sequences (batch rows, slots, blocks)."""
        return self.axes("batch")

    @property
    def num_seq_shards(self) -> int:
        return self.ways(self.batch_axes)

    def spec(self, axes: tuple[str | None, ...], shape: tuple[int, ...] | None = None) -> PartitionSpec:
        spec = logical_to_spec(axes, self.rules, tuple(self.mesh.axis_names))
        return spec if shape is None else fit_spec(spec, tuple(shape), self.mesh)

    def sharding(self, axes: tuple[str | None, ...], shape: tuple[int, ...] | None = None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(axes, shape))

    def with_rules(self, **overrides: MeshAxes) -> Layout:
        return Layout.create(self.mesh, {**self.rules, **overrides})

    # ------------------------------------------------------------------ placement
    def tree_shardings(self, axes_tree, shapes_tree) -> Any:
        """NamedSharding per leaf, fitted to each leaf's shape."""
        return jax.tree.map(lambda a, x: self.sharding(a, x.shape), axes_tree, shapes_tree, is_leaf=is_axes)

    def put(self, tree, axes_tree) -> Any:
        """Host arrays -> global device arrays laid out by their logical axes. Built per shard
        from the host copy (``make_array_from_callback``), so it also works across processes,
        where each process supplies only its own devices' pieces."""

        def one(a, x):
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, self.sharding(a, x.shape), lambda i: x[i])

        return jax.tree.map(one, axes_tree, tree, is_leaf=is_axes)

    def put_batch(self, tree) -> Any:
        """Step metadata (every leaf's leading axis is the batch) -> arrays split over the batch axes."""
        return jax.tree.map(lambda x: self.put(x, ("batch",) + (None,) * (np.ndim(x) - 1)), tree)

    def constrain(self, x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, self.sharding(axes, x.shape))

    # ------------------------------------------------------------------ params and state
    def weight_sharding(self, w, axes: tuple[str | None, ...] | PartitionSpec):
        """Sharding of one weight from its logical axes (or its unfitted spec): a NamedSharding,
        or for a packed ``QuantizedWeight`` a ``QuantizedWeight`` of two NamedShardings with one
        spec for bytes and scales, fitted to the dequantized shape in whole quantization blocks
        (both halves split alike)."""
        spec = axes if isinstance(axes, PartitionSpec) else self.spec(axes)
        if isinstance(w, QuantizedWeight):
            shape = w.shape
            blocks = (1,) * (len(shape) - 2) + tuple(w.block)
            ns = NamedSharding(self.mesh, fit_spec(spec, shape, self.mesh, blocks))
            return QuantizedWeight(ns, ns, w.fmt, w.block)
        return NamedSharding(self.mesh, fit_spec(spec, tuple(w.shape), self.mesh))

    def param_spec(self, v: nnx.Variable) -> PartitionSpec:
        """The unfitted spec of one parameter: Flax's logical partitioning
        (``nnx.get_partition_spec`` of its ``out_sharding`` annotation under this rules table),
        with the mesh axes this mesh lacks dropped. A logical name the table lacks is an error
        (Flax would replicate it silently)."""
        axes = tuple(v.get_metadata()["out_sharding"])
        unknown = [a for a in axes if a is not None and a not in self.rules]
        if unknown:
            raise KeyError(f"logical axes {unknown} have no entry in the sharding rules")
        with nnx.logical_axis_rules(list(self.rules_items)):
            spec = nnx.get_partition_spec(v).get_value()
        present = tuple(self.mesh.axis_names)
        return PartitionSpec(*(_entry(tuple(m for m in _as_tuple(e) if m in present)) for e in spec))

    def ffn_mlp_axes(self, ffn, shared: bool = False) -> tuple[str, ...]:
        """Mesh axes the expert hidden dim F is split over in one MoE layer (a ``model.MoE``, or
        its ``nnx.State``): the ``mlp`` rule's axes when every routed expert matrix (packed: in
        whole scale blocks) splits on them, else none (F whole; the MoE then splits tokens over
        those axes); none either for size-1 axes. ``shared=True``: the same for the shared
        expert (``shared_mlp``), which can only split where the routed experts do."""
        axes = self.axes("mlp")
        ways = self.ways(axes)
        names = ("w1", "w3", "w2")
        mats = [(_get(ffn, "experts", n, "weight"), -1 if n == "w2" else -2) for n in names]
        if ways == 1 or not _splits(mats, ways):
            return ()
        if not shared:
            return axes
        if _get(ffn, "shared_experts") is None or self.axes("shared_mlp") != axes:
            return ()
        mats = [(_get(ffn, "shared_experts", n, "weight"), -1 if n == "w2" else -2) for n in names]
        return axes if _splits(mats, ways) else ()

    def attn_head_axes(self, attn, cfg: Config) -> tuple[str, ...]:
        """Mesh axes one attention layer's heads and output groups are split over: the
        ``q_heads`` rule's axes when heads, groups and the matrices holding them split evenly
        (whole quantization blocks), else none (the layer runs whole on every device)."""
        axes = self.axes("q_heads")
        if self.axes("heads") != axes or self.axes("o_lora") != axes:
            return ()
        ways = self.ways(axes)
        if ways == 1 or cfg.num_attention_heads % ways or cfg.o_groups % ways:
            return ()
        mats = [
            (_get(attn, "wq_b", "weight"), -2),
            (_get(attn, "wo_a", "weight"), -2),
            (_get(attn, "wo_b", "weight"), -1),
        ]
        return axes if _splits(mats, ways) else ()

    def sublayer(self, key: str, p, cfg: Config) -> Layout:
        """The layout one attention (``key="attn"``) or MoE (``"ffn"``) layer runs with: this one,
        or with its split rules cleared when its shapes do not split (see the two methods above)."""
        if key == "attn" and not self.attn_head_axes(p, cfg):
            return self.with_rules(q_heads=None, heads=None, o_lora=None)
        if key == "ffn":
            over = {} if self.ffn_mlp_axes(p) else {"mlp": None}
            over.update({} if self.ffn_mlp_axes(p, shared=True) else {"shared_mlp": None})
            return self.with_rules(**over) if over else self
        return self

    def variable_sharding(self, v: nnx.Variable):
        """One parameter's sharding from its logical axes (``out_sharding`` metadata), wrapped
        in a copy of the variable so a tree of them matches the params' structure."""
        return v.replace(self.weight_sharding(value(v), self.param_spec(v)))

    def sublayer_specs(self, key: str, state: nnx.State, cfg: Config) -> Any:
        """shard_map specs of one layer's attention or FFN params (``nnx.split`` of the module):
        the specs ``param_shardings`` placed them with, so entering the shard_map moves no weight."""
        lay = self.sublayer(key, state, cfg)

        def spec(v):
            s = lay.weight_sharding(value(v), lay.param_spec(v))
            return v.replace(
                QuantizedWeight(s.data.spec, s.scale.spec, s.fmt, s.block)
                if isinstance(s, QuantizedWeight)
                else s.spec
            )

        return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))

    def param_shardings(self, params: nnx.State, cfg: Config) -> Any:
        """Shardings for the params (plain or packed values) from their logical axes, each
        attention and MoE layer with its ``sublayer`` layout; same tree structure as ``params``."""

        def walk(node, lay: Layout):
            if isinstance(node, nnx.Variable):
                return lay.variable_sharding(node)
            out = {
                k: walk(sub, lay.sublayer(k, sub, cfg) if k in ("attn", "ffn") else lay)
                for k, sub in node.items()
            }
            return out

        return nnx.State(walk(params, self))  # a State of plain dicts, as ``nnx.split`` makes

    def state_shardings(self, state) -> Any:
        """Shardings of a decode state or snapshot store (``model.state.state_axes``)."""
        return self.tree_shardings(kvc.state_axes(state), state)

    # ------------------------------------------------------------------ the model's hooks
    def attention_chunk(self, *args, **kwargs):
        """The state-path attention of one layer on this mesh (``dp_attention``)."""
        from dsv4_jax.parallel import dp_attention

        return dp_attention.attention_chunk(*args, layout=self, **kwargs)

    def moe(self, *args, **kwargs):
        """One MoE sub-layer on this mesh (``moe_ep``: expert parallelism)."""
        from dsv4_jax.parallel import moe_ep

        return moe_ep.moe(*args, layout=self, **kwargs)


def _get(tree, *keys):
    """``tree.a.b`` of a module, or ``tree["a"]["b"]`` of an ``nnx.State``; ``None`` if absent."""
    for k in keys:
        if tree is None:
            return None
        tree = tree.get(k) if isinstance(tree, (dict, nnx.State)) else getattr(tree, k, None)
    return tree


def _splits(mats, ways: int) -> bool:
    """Every ``(weight, dim)`` splits ``ways`` ways along ``dim`` in whole quantization blocks."""
    for w, dim in mats:
        w = value(w)
        block = w.block[dim] if isinstance(w, QuantizedWeight) else 1
        if w.shape[dim] % (ways * block):
            return False
    return True
