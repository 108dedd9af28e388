"""MXFP4 routed experts: the pure-jnp specification and the validators shared with the
kernel (ARCHITECTURE.md §6 math, §8 weight format).

Routed experts run as grouped matmuls over the (token, choice) rows sorted by expert:
``group_sizes[e]`` consecutive rows use expert ``e``; rows past ``sum(group_sizes)`` are
padding and come out as zeros. Weights stay packed (``mxfp4.Mxfp4Weight``, ``[E, out,
in]`` logical) and are dequantized to the activation dtype; every MXFP4 value is exact
in bf16, so only the accumulation order can differ from the kernel.

``w1`` (gate) and ``w3`` (up) share the input and are fused with the clamped SwiGLU
``silu(min(g, limit))·clip(u, −limit, limit)`` times the routing weight of the row
(the weight multiplies the hidden before ``w2``, §6); ``w2`` (down) is a plain grouped
matmul; the per-token sum over choices is a scatter-add, as in ``dsv4_jax.model.moe``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import mxfp4

F32 = jnp.float32


def validate_grouped_args(x, w: mxfp4.Mxfp4Weight, group_sizes) -> None:
    """Trace-time checks shared by kernel and reference; errors name the argument."""
    if x.ndim != 2:
        raise ValueError(f"x: expected [M, in], got {tuple(x.shape)}")
    if w.packed.ndim != 3 or w.packed.dtype != jnp.uint8 or w.scale.dtype != jnp.uint8:
        raise ValueError(
            f"w: expected packed uint8[E,out,in/2] + scale uint8[E,out,in/32], got "
            f"{w.packed.dtype}{list(w.packed.shape)}, {w.scale.dtype}{list(w.scale.shape)}"
        )
    e, n, half = w.packed.shape
    if x.shape[1] != 2 * half:
        raise ValueError(f"x: in dim {x.shape[1]} != weight in dim {2 * half}")
    if tuple(w.scale.shape) != (e, n, 2 * half // mxfp4.BLOCK):
        raise ValueError(f"w.scale: expected {[e, n, 2 * half // mxfp4.BLOCK]}, got {list(w.scale.shape)}")
    if tuple(group_sizes.shape) != (e,) or group_sizes.dtype != jnp.int32:
        raise ValueError(
            f"group_sizes: expected int32[E={e}], got {group_sizes.dtype}{list(group_sizes.shape)}"
        )


def validate_moe_args(x, idx, weights, w1, w2, w3) -> None:
    if x.ndim != 2 or idx.ndim != 2 or idx.shape[0] != x.shape[0] or idx.dtype != jnp.int32:
        raise ValueError(
            f"x/idx: expected x [N,D] and int32 idx [N,k], got {x.shape}, {idx.dtype}{idx.shape}"
        )
    if tuple(weights.shape) != tuple(idx.shape):
        raise ValueError(f"weights: expected {list(idx.shape)}, got {list(weights.shape)}")
    if w1.shape != w3.shape or w2.shape != (w1.shape[0], x.shape[1], w1.shape[1]):
        raise ValueError(
            f"w1/w3/w2: expected [E,F,D], [E,F,D], [E,D,F], got {w1.shape}, {w3.shape}, {w2.shape}"
        )


def _ragged(x: jax.Array, w: mxfp4.Mxfp4Weight, group_sizes: jax.Array) -> jax.Array:
    dn = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0]
    )
    return jax.lax.ragged_dot_general(
        x, mxfp4.dequantize(w, x.dtype), group_sizes, dn, preferred_element_type=F32
    )


def _zero_tail(y: jax.Array, group_sizes: jax.Array) -> jax.Array:
    return jnp.where(jnp.arange(y.shape[0])[:, None] < jnp.sum(group_sizes), y, 0.0)


@jax.jit
def mxfp4_grouped_matmul_reference(
    x: jax.Array,  # [M, in] rows sorted by expert (bf16 or f32)
    w: mxfp4.Mxfp4Weight,  # packed [E, out, in]
    group_sizes: jax.Array,  # i32[E]
) -> jax.Array:  # f32[M, out]
    """``y[r] = x[r] @ W[e(r)]ᵀ`` with f32 accumulation."""
    validate_grouped_args(x, w, group_sizes)
    return _zero_tail(_ragged(x, w, group_sizes), group_sizes)


def swiglu_clamped(gate: jax.Array, up: jax.Array, limit: float) -> jax.Array:
    """``silu(min(gate, limit))·clip(up, −limit, limit)`` in f32 (§6)."""
    g = jnp.minimum(gate.astype(F32), limit)
    return jax.nn.silu(g) * jnp.clip(up.astype(F32), -limit, limit)


@functools.partial(jax.jit, static_argnames=("limit",))
def mxfp4_swiglu_reference(
    x: jax.Array,  # [M, D] rows sorted by expert
    w1: mxfp4.Mxfp4Weight,  # gate, packed [E, F, D]
    w3: mxfp4.Mxfp4Weight,  # up, packed [E, F, D]
    group_sizes: jax.Array,  # i32[E]
    row_weights: jax.Array,  # f32[M] routing weight of each row
    *,
    limit: float,
) -> jax.Array:  # [M, F] in x.dtype
    """Fused gate/up: ``swiglu(x@w1ᵀ, x@w3ᵀ)·row_weight``, cast to the activation dtype."""
    validate_grouped_args(x, w1, group_sizes)
    validate_grouped_args(x, w3, group_sizes)
    h = swiglu_clamped(_ragged(x, w1, group_sizes), _ragged(x, w3, group_sizes), limit)
    return _zero_tail(h * row_weights.astype(F32)[:, None], group_sizes).astype(x.dtype)


def sort_by_expert(idx: jax.Array, n_experts: int):
    """(order, token of each sorted row, group sizes i32[E]) for idx i32[N,k]."""
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=n_experts).astype(jnp.int32)
    return order, order // idx.shape[1], sizes


@functools.partial(jax.jit, static_argnames=("limit",))
def moe_experts_reference(
    x: jax.Array,  # [N, D] normed tokens
    idx: jax.Array,  # i32[N, k] chosen experts
    weights: jax.Array,  # f32[N, k] routing weights
    w1: mxfp4.Mxfp4Weight,  # [E, F, D]
    w2: mxfp4.Mxfp4Weight,  # [E, D, F]
    w3: mxfp4.Mxfp4Weight,  # [E, F, D]
    *,
    limit: float,
) -> jax.Array:  # f32[N, D]
    """``Σ_choices (w·swiglu(x@w1ᵀ, x@w3ᵀ)) @ w2ᵀ``: ``dsv4_jax.model.moe.routed_experts`` on MXFP4."""
    validate_moe_args(x, idx, weights, w1, w2, w3)
    order, tok, sizes = sort_by_expert(idx, w1.packed.shape[0])
    h = mxfp4_swiglu_reference(x[tok], w1, w3, sizes, weights.reshape(-1)[order], limit=limit)
    y = mxfp4_grouped_matmul_reference(h, w2, sizes)
    return jnp.zeros((x.shape[0], y.shape[1]), F32).at[tok].add(y)
