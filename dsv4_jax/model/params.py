"""The model's parameters as data: random init, the abstract tree, and the checkpoint's view of it.

The NNX modules (``transformer.DeepseekV4`` and below) are the one declaration of every
parameter: shape, dtype, logical axes and init kind (``layers.param``). Everything here is
derived from them:

* ``init_params(cfg, key, dtype)``: the ``params`` half of ``nnx.split`` of a randomly
  initialised model (an ``nnx.State``), what ``transformer.forward`` takes;
* ``abstract_params``: the same without allocating (``layers.shapes_only``), values
  ``jax.ShapeDtypeStruct`` with the variables' metadata;
* the *native view* (``param_infos``, ``to_native``, ``from_native``): nested dicts and lists
  named exactly as the published checkpoint (``layers.3.attn.wq_a.weight``; the mHC
  parameters ``hc_attn.fn`` appear as ``hc_attn_fn``), the tree the checkpoint code walks.
  ``param_infos`` gives an ``ArrayInfo`` per tensor; ``from_native`` turns a native tree of
  values back into the model's ``nnx.State``.

Tensors that the reference keeps in fp32 (mHC, sinks, ``ape``, router bias, norm weights,
compressor projections) stay fp32 whatever weight dtype is chosen (§2, §8).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4_jax.config import Config
from dsv4_jax.model.layers import shapes_only
from dsv4_jax.model.transformer import DeepseekV4

HC_GROUPS = ("hc_attn", "hc_ffn", "hc_head")  # MHC / HCHead modules: native names join with "_"


@dataclasses.dataclass(frozen=True)
class ArrayInfo:
    """Shape, dtype, logical axes and init kind of one parameter (a variable's metadata)."""

    shape: tuple[int, ...]
    dtype: Any
    axes: tuple[str | None, ...]
    init: str  # "linear" | "norm" | "normal" | "scale" | "tid2eid"

    def __post_init__(self):
        assert len(self.shape) == len(self.axes), (self.shape, self.axes)


def is_info(x) -> bool:
    return isinstance(x, ArrayInfo)


def is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def init_params(cfg: Config, key: jax.Array, dtype=jnp.float32, include_mtp: bool = True) -> nnx.State:
    """Random parameters at unit scale with non-degenerate buffers (``layers.param``'s inits):
    the ``params`` half of ``nnx.split(DeepseekV4(...))``."""
    model = DeepseekV4(cfg, dtype=dtype, include_mtp=include_mtp, rngs=nnx.Rngs(params=key))
    return nnx.split(model)[1]


@functools.lru_cache(maxsize=32)
def _abstract(cfg: Config, dtype_name: str, include_mtp: bool) -> nnx.State:
    with shapes_only():
        model = DeepseekV4(cfg, dtype=jnp.dtype(dtype_name), include_mtp=include_mtp, rngs=nnx.Rngs(0))
    return nnx.split(model)[1]


def abstract_params(cfg: Config, dtype=jnp.bfloat16, include_mtp: bool = True) -> nnx.State:
    """The params as ``jax.ShapeDtypeStruct`` values with their variables' metadata (no allocation)."""
    return jax.tree.map(lambda x: x, _abstract(cfg, jnp.dtype(dtype).name, include_mtp))


def variable_info(v: nnx.Variable) -> ArrayInfo:
    meta = v.get_metadata()
    val = v.get_value()
    return ArrayInfo(tuple(val.shape), val.dtype, tuple(meta["out_sharding"]), meta.get("init", "linear"))


def map_variables(state: nnx.State, fn: Callable[[nnx.Variable], Any]) -> dict:
    """A pure nested dict (int keys for lists) of ``fn(variable)`` over a state's variables."""
    out: dict = {}
    for path, var in nnx.to_flat_state(state):
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = fn(var)
    return out


# ----------------------------------------------------------------------------- native view
def to_native(tree) -> dict:
    """The model's params (``nnx.State``, or a tree of its variables) as the native dict tree:
    lists for ``layers`` / ``mtp``, mHC parameters under their checkpoint names."""
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)

    def walk(node):
        if isinstance(node, dict):
            if node and all(isinstance(k, int) for k in node):
                return [walk(node[k]) for k in sorted(node)]
            out = {}
            for k, v in node.items():
                if k in HC_GROUPS and isinstance(v, dict):
                    out.update({f"{k}_{part}": walk(x) for part, x in v.items()})
                else:
                    out[k] = walk(v)
            return out
        return node

    return walk(tree)


def _to_pure(native: dict) -> dict:
    """Inverse of ``to_native`` for a pure tree: lists → int-keyed dicts, mHC names regrouped."""

    def walk(node):
        if isinstance(node, (list, tuple)) and not _is_value_tuple(node):
            return {i: walk(v) for i, v in enumerate(node)}
        if isinstance(node, dict):
            out: dict = {}
            for k, v in node.items():
                group = next((g for g in HC_GROUPS if k.startswith(g + "_")), None)
                if group is not None:
                    out.setdefault(group, {})[k[len(group) + 1 :]] = walk(v)
                else:
                    out[k] = walk(v)
            return out
        return node

    return walk(native)


def _is_value_tuple(node) -> bool:
    """A tuple of per-expert arrays (``moe.split_experts``) is a value, not a list of layers."""
    return isinstance(node, tuple) and all(hasattr(x, "shape") for x in node)


def from_native(cfg: Config, native: dict, dtype=jnp.float32) -> nnx.State:
    """A native tree of values (arrays, ``QuantizedWeight``s) as the model's ``nnx.State``
    (the variables' metadata from the abstract model; ``mtp`` included when present)."""
    state = abstract_params(cfg, dtype, include_mtp="mtp" in native)
    nnx.replace_by_pure_dict(state, _to_pure(native))
    return state


def param_infos(cfg: Config, dtype=jnp.bfloat16, include_mtp: bool = True) -> dict:
    """The whole parameter tree in the native view, ``ArrayInfo`` leaves (nothing allocated)."""
    return to_native(map_variables(_abstract(cfg, jnp.dtype(dtype).name, include_mtp), variable_info))


def count_params(cfg: Config, include_mtp: bool = False) -> int:
    """Number of weights (integer lookup tables such as ``tid2eid`` excluded)."""
    leaves = jax.tree.leaves(param_infos(cfg, include_mtp=include_mtp), is_leaf=is_info)
    return sum(math.prod(a.shape) for a in leaves if a.init != "tid2eid")


def logical_axes(tree) -> Any:
    """Per-leaf logical axis names for a native tree of ``ArrayInfo``."""
    return jax.tree.map(lambda a: a.axes, tree, is_leaf=is_info)


def native_names(tree, map_fn: Callable[[str, Any], Any] = lambda n, x: x) -> dict[str, Any]:
    """Flatten params (``nnx.State`` or native tree) to ``{native_name: map_fn(name, leaf)}``
    (experts still stacked). ``layers.{i}.`` and ``mtp.{k}.`` come from list indices."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(f"{prefix}.{i}", v)
        else:
            out[prefix] = map_fn(prefix, node)

    walk("", to_native(tree) if isinstance(tree, nnx.State) else tree)
    return out
