"""Parameters of the NNX modules: one ``nnx.Param`` per checkpoint tensor, with its logical axes.

Every parameter is created by ``param`` with three pieces of metadata that the rest of the
system reads instead of keeping its own tables:

* ``out_sharding``: the logical axis names of each dimension (Flax's partitioning annotation,
  ``nnx.with_partitioning``'s key). ``dsv4_jax.parallel.rules`` maps them to mesh axes through
  the one rules table; layer code never names devices. Each variable has Flax's eager sharding
  off, so the annotation is metadata only (any module can be built outside a mesh) and
  placement stays the runner's and the loader's decision.
* ``init``: how a random checkpoint fills it (``linear`` N(0, 1/fan_in), ``norm`` 1 ± 0.25,
  ``scale`` U(0.5, 1.5), ``normal`` N(0, 1), ``tid2eid`` distinct experts per token;
  HF_ORACLE.md §8.2 explains why not the HF zeros).
* the dtype: the weight dtype for linears, float32 for what the reference keeps in fp32
  (norm weights, mHC, sinks, ``ape``, router bias, compressor projections: ARCHITECTURE.md §2, §8).

A weight's *value* is a plain array, or how the runner holds it: a ``quant.QuantizedWeight``
(FP8 / MXFP4 bytes and UE8M0 scales, the packed container) or a tuple of per-expert arrays
(``moe.split_experts``). ``value(v)`` reads any of them. Fixed integer tables (``tid2eid``)
are ``Buffer`` variables: part of the model, never trained.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4_jax.quant import QuantizedWeight

F32 = jnp.float32
Axes = tuple[str | None, ...]


class Buffer(nnx.Variable):
    """A fixed table of the model (``ffn.gate.tid2eid``): loaded with the weights, never trained."""


_SHAPES_ONLY = contextvars.ContextVar("shapes_only", default=False)


@contextlib.contextmanager
def shapes_only():
    """Build modules whose variables hold ``jax.ShapeDtypeStruct`` values: the abstract model
    (graphdef, abstract params) without drawing a random key per parameter. ``nnx.eval_shape``
    does the same but traces every key draw, which grew quadratically with the number of
    parameters (minutes for V4-Pro's ~10K variables)."""
    token = _SHAPES_ONLY.set(True)
    try:
        yield
    finally:
        _SHAPES_ONLY.reset(token)


def _init_value(init: str, key, shape: tuple[int, ...], dtype, num_experts: int = 0) -> jax.Array:
    if init == "tid2eid":
        keys = jax.random.split(key, shape[0])
        perm = jax.vmap(lambda k: jax.random.permutation(k, num_experts)[: shape[1]])(keys)
        return perm.astype(jnp.int32)
    if init == "linear":
        x = jax.random.normal(key, shape, F32) / math.sqrt(shape[-1])
    elif init == "norm":
        x = 1.0 + 0.25 * jax.random.normal(key, shape, F32)
    elif init == "scale":
        x = 0.5 + jax.random.uniform(key, shape, F32)
    elif init == "normal":
        x = jax.random.normal(key, shape, F32)
    else:
        raise ValueError(f"unknown init {init!r}")
    return x.astype(dtype)


def param(rngs: nnx.Rngs, shape: tuple[int, ...], dtype, axes: Axes, init: str) -> nnx.Param:
    """A parameter of ``shape`` with its logical ``axes`` and ``init`` kind as metadata."""
    if len(shape) != len(axes):
        raise ValueError(f"param: shape {shape} and logical axes {axes} differ in rank")
    if _SHAPES_ONLY.get():
        value = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
    else:
        value = _init_value(init, rngs.params(), shape, dtype)
    return nnx.Param(value, out_sharding=tuple(axes), init=init, eager_sharding=False)


def buffer(rngs: nnx.Rngs, shape: tuple[int, ...], axes: Axes, num_experts: int) -> Buffer:
    if _SHAPES_ONLY.get():
        value = jax.ShapeDtypeStruct(shape, jnp.int32)
    else:
        value = _init_value("tid2eid", rngs.params(), shape, jnp.int32, num_experts)
    return Buffer(
        value,
        out_sharding=tuple(axes),
        init="tid2eid",
        eager_sharding=False,
    )


def value(v):
    """A variable's value as held: an array, a ``QuantizedWeight`` or a tuple of arrays."""
    return v.get_value() if isinstance(v, nnx.Variable) else v


def dense(w, dtype) -> jax.Array:
    """A weight as a plain array of ``dtype``; packed weights (``QuantizedWeight``) are
    dequantized here, inside the jitted step."""
    w = value(w)
    if isinstance(w, QuantizedWeight):
        return w.dequantize(dtype)
    return w.astype(dtype)


class Linear(nnx.Module):
    """``x @ weightᵀ`` with ``weight`` [out, in] (the checkpoint's ``<name>.weight``)."""

    def __init__(self, out: int, inp: int, dtype, axes: Axes, rngs: nnx.Rngs):
        self.weight = param(rngs, (out, inp), dtype, axes, "linear")


class RMSNorm(nnx.Module):
    """The weight of a weighted RMSNorm (§2), float32 whatever the weight dtype."""

    def __init__(self, dim: int, axis: str, rngs: nnx.Rngs):
        self.weight = param(rngs, (dim,), F32, (axis,), "norm")
