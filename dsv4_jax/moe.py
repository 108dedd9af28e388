"""Mixture-of-experts FFN (ARCHITECTURE.md §6).

Router: ``σ = sqrt(softplus(x @ W_gᵀ))`` in fp32. Top-k layers select
``top_k(σ + bias)`` (the bias steers selection only); hash layers take the fixed
``tid2eid[token]`` row. Weights are the chosen σ renormalised to sum to one, times
``routed_scaling_factor``. Every expert, the shared one included, is a SwiGLU with
the gate clamped to ≤ limit and the up projection to [−limit, limit]; the routing
weight scales the hidden activation before ``w2``.

Routed experts run as a grouped matmul: the (token, choice) pairs are sorted by
expert and fed to ``ragged_dot`` so each expert's weights are read once per step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax import ops
from dsv4_jax.config import Config

F32 = jnp.float32


def route(x: jax.Array, tokens: jax.Array, gate: dict, cfg: Config, hash_routed: bool):
    """Expert indices i32[N,k] and weights f32[N,k] for tokens x [N,D] (ids i32[N])."""
    logits = jnp.einsum("nd,ed->ne", x.astype(F32), gate["weight"].astype(F32), preferred_element_type=F32)
    scores = jnp.sqrt(jax.nn.softplus(logits))
    if hash_routed:
        idx = gate["tid2eid"][tokens].astype(jnp.int32)
    else:
        _, idx = jax.lax.top_k(scores + gate["bias"].astype(F32), cfg.num_experts_per_tok)
    w = jnp.take_along_axis(scores, idx, axis=-1)
    if cfg.norm_topk_prob:
        w = w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-20)
    return idx, w * cfg.routed_scaling_factor


def swiglu(gate: jax.Array, up: jax.Array, limit: float) -> jax.Array:
    """``silu(min(gate, limit)) · clip(up, −limit, limit)`` in fp32."""
    gate = jnp.minimum(gate.astype(F32), limit)
    up = jnp.clip(up.astype(F32), -limit, limit)
    return jax.nn.silu(gate) * up


def _ragged(lhs: jax.Array, rhs: jax.Array, sizes: jax.Array) -> jax.Array:
    """Grouped ``lhs[rows of group e] @ rhs[e]ᵀ`` for rhs stored [E, out, in]: f32[M,out]."""
    dn = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(([1], [2]), ([], [])),
        lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[0],
    )
    return jax.lax.ragged_dot_general(lhs, rhs.astype(lhs.dtype), sizes, dn, preferred_element_type=F32)


def routed_experts(x: jax.Array, idx: jax.Array, w: jax.Array, experts: dict, cfg: Config,
                   *, sim_quant: bool = False) -> jax.Array:
    """``Σ_choices y_e`` for x [N,D], idx i32[N,k], w f32[N,k]: f32[N,D]."""
    n, k = idx.shape
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # (token, choice) pairs grouped by expert
    tok = order // k
    sizes = jnp.bincount(flat, length=cfg.n_routed_experts).astype(jnp.int32)
    xs = x[tok]  # [N·k, D]
    if sim_quant:
        xs = ops.fp8_sim(xs, 128)
    h = swiglu(
        _ragged(xs, experts["w1"]["weight"], sizes), _ragged(xs, experts["w3"]["weight"], sizes),
        cfg.swiglu_limit,
    )
    h = (h * w.reshape(-1)[order][:, None]).astype(x.dtype)
    if sim_quant:
        h = ops.fp8_sim(h, 128)
    y = _ragged(h, experts["w2"]["weight"], sizes)  # f32[N·k, D]
    return jnp.zeros((n, x.shape[-1]), F32).at[tok].add(y)


def shared_expert(x: jax.Array, p: dict, cfg: Config, *, sim_quant: bool = False) -> jax.Array:
    """The always-on expert, same clamped SwiGLU (§11.1): f32[..., D]."""
    h = swiglu(ops.linear(x, p["w1"]["weight"], quant_act=sim_quant),
               ops.linear(x, p["w3"]["weight"], quant_act=sim_quant), cfg.swiglu_limit)
    h = h.astype(x.dtype)
    if sim_quant:
        h = ops.fp8_sim(h, 128)
    return jnp.einsum("...i,oi->...o", h, p["w2"]["weight"].astype(h.dtype), preferred_element_type=F32)


def moe(x: jax.Array, tokens: jax.Array, p: dict, layer: int, cfg: Config, *, sim_quant: bool = False):
    """The MoE sub-layer on normed input x [B,T,D] with token ids i32[B,T]: [B,T,D]."""
    b, t, d = x.shape
    xf = x.reshape(b * t, d)
    with jax.named_scope("route"):
        idx, w = route(xf, tokens.reshape(-1), p["gate"], cfg, cfg.mlp_kind(layer) == "hash")
    with jax.named_scope("experts"):
        out = routed_experts(xf, idx, w, p["experts"], cfg, sim_quant=sim_quant)
    if "shared_experts" in p:
        with jax.named_scope("shared"):
            out = out + shared_expert(xf, p["shared_experts"], cfg, sim_quant=sim_quant)
    return out.astype(x.dtype).reshape(b, t, d)
