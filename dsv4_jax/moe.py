"""Mixture-of-experts FFN (ARCHITECTURE.md §6).

Router: ``σ = sqrt(softplus(x @ W_gᵀ))`` in fp32. Top-k layers select
``top_k(σ + bias)`` (the bias steers selection only); hash layers take the fixed
``tid2eid[token]`` row. Weights are the chosen σ renormalised to sum to one, times
``routed_scaling_factor``. Every expert, the shared one included, is a SwiGLU with
the gate clamped to ≤ limit and the up projection to [−limit, limit]; the routing
weight scales the hidden activation before ``w2``.

Routed experts run as a grouped matmul: the (token, choice) pairs are sorted by
expert and fed to ``ragged_dot`` so each expert's weights are read once per step. With
no more (token, choice) rows than experts (small-batch decode) each row gathers its own
expert's weights instead (``_gathered_experts``): ``ragged_dot`` has no grouped kernel on
XLA:CPU and is lowered as a dense matmul over every expert, masked, which reads all E
experts and does E times the work; the gather reads only the chosen ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from dsv4_jax import ops
from dsv4_jax.config import Config
from dsv4_jax.quant import QuantizedWeight

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


def _ragged(lhs: jax.Array, rhs, sizes: jax.Array) -> jax.Array:
    """Grouped ``lhs[rows of group e] @ rhs[e]ᵀ`` for rhs stored [E, out, in]: f32[M,out]."""
    dn = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(([1], [2]), ([], [])),
        lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[0],
    )
    return jax.lax.ragged_dot_general(lhs, ops.dense(rhs, lhs.dtype), sizes, dn, preferred_element_type=F32)


def _mxfp4(w) -> pk.mxfp4.Mxfp4Weight | None:
    """The kernel's view of an expert stack held packed as MXFP4, else ``None``."""
    if isinstance(w, QuantizedWeight) and w.fmt == "mxfp4":
        return pk.mxfp4.Mxfp4Weight(w.data, w.scale)
    return None


def routed_experts(x: jax.Array, idx: jax.Array, w: jax.Array, experts: dict, cfg: Config,
                   *, sim_quant: bool = False, kernels: str = "reference", num_experts: int | None = None) -> jax.Array:
    """``Σ_choices y_e`` for x [N,D], idx i32[N,k], w f32[N,k]: f32[N,D].

    With ``kernels="pallas"`` and experts held as packed MXFP4, the grouped matmuls run
    as the MXFP4 kernels (dequantized in registers, gate/up fused with the SwiGLU);
    otherwise as ``ragged_dot`` over dense weights.

    ``num_experts``: size of the ``experts`` stack when it is one shard's slice under expert
    parallelism (``moe_ep``); a choice equal to it is "no expert here": it sorts after every
    group and contributes nothing.
    """
    n, k = idx.shape
    flat = idx.reshape(-1)
    plain = all(not isinstance(experts[n_]["weight"], QuantizedWeight) for n_ in ("w1", "w3", "w2"))
    if num_experts is None and plain and n * k <= cfg.n_routed_experts:
        return _gathered_experts(x, flat, w.reshape(-1), experts, cfg, sim_quant=sim_quant).reshape(n, k, -1).sum(1)
    order = jnp.argsort(flat, stable=True)  # (token, choice) pairs grouped by expert
    tok = order // k
    e = cfg.n_routed_experts if num_experts is None else num_experts
    sizes = jnp.bincount(flat, length=e).astype(jnp.int32)  # ids >= e are not counted
    xs = x[tok]  # [N·k, D]
    row_w = w.reshape(-1)[order]  # f32[N·k]
    if sim_quant:
        xs = ops.fp8_sim(xs, 128)
    packed = [_mxfp4(experts[n_]["weight"]) for n_ in ("w1", "w3", "w2")]
    if kernels == "pallas" and all(q is not None for q in packed):
        f, d = cfg.moe_intermediate_size, x.shape[-1]  # tiles no larger than the matrices
        h = pk.mxfp4_swiglu(xs, packed[0], packed[1], sizes, row_w, limit=cfg.swiglu_limit,
                            block_n=min(64, f), block_k=min(256, d))
        if sim_quant:
            h = ops.fp8_sim(h, 128)
        y = pk.mxfp4_grouped_matmul(h, packed[2], sizes, block_n=min(64, d), block_k=min(256, f))  # f32[N·k,D]
    else:
        h = swiglu(
            _ragged(xs, experts["w1"]["weight"], sizes), _ragged(xs, experts["w3"]["weight"], sizes),
            cfg.swiglu_limit,
        )
        h = (h * row_w[:, None]).astype(x.dtype)
        if sim_quant:
            h = ops.fp8_sim(h, 128)
        y = _ragged(h, experts["w2"]["weight"], sizes)  # f32[N·k, D]
    if num_experts is not None:  # rows past the groups (no local expert) are not defined by ragged_dot
        y = jnp.where((jnp.arange(n * k) < jnp.sum(sizes))[:, None], y, 0.0)
    return jnp.zeros((n, x.shape[-1]), F32).at[tok].add(y)


def _gathered_experts(x: jax.Array, flat: jax.Array, row_w: jax.Array, experts: dict, cfg: Config,
                      *, sim_quant: bool) -> jax.Array:
    """Each (token, choice) row m = token·k + choice through its own expert ``flat[m]``, with
    the expert's weights gathered: x [N,D], flat i32[M], row_w f32[M] → f32[M,D] (M = N·k).
    Same math as the ragged path, row by row."""
    k = flat.shape[0] // x.shape[0]
    xs = jnp.repeat(x, k, axis=0)  # [M, D], row m is token m // k
    if sim_quant:
        xs = ops.fp8_sim(xs, 128)

    def take(name):  # [M, out, in]: the chosen experts' weights in the activation dtype
        # mode="clip": ids are in range here (no expert parallelism); the default "fill" mode adds
        # a select against NaN over the gathered weights, which doubled the gather's time on CPU.
        return ops.dense(jnp.take(experts[name]["weight"], flat, axis=0, mode="clip"), xs.dtype)

    up = lambda name: jnp.einsum("md,mfd->mf", xs, take(name), preferred_element_type=F32)
    h = swiglu(up("w1"), up("w3"), cfg.swiglu_limit)
    h = (h * row_w[:, None]).astype(x.dtype)
    if sim_quant:
        h = ops.fp8_sim(h, 128)
    return jnp.einsum("mf,mdf->md", h, take("w2"), preferred_element_type=F32)


def shared_expert(x: jax.Array, p: dict, cfg: Config, *, sim_quant: bool = False) -> jax.Array:
    """The always-on expert, same clamped SwiGLU (§11.1): f32[..., D]."""
    h = swiglu(ops.linear(x, p["w1"]["weight"], quant_act=sim_quant),
               ops.linear(x, p["w3"]["weight"], quant_act=sim_quant), cfg.swiglu_limit)
    h = h.astype(x.dtype)
    if sim_quant:
        h = ops.fp8_sim(h, 128)
    return jnp.einsum("...i,oi->...o", h, ops.dense(p["w2"]["weight"], h.dtype), preferred_element_type=F32)


def moe(x: jax.Array, tokens: jax.Array, p: dict, layer: int, cfg: Config, *, sim_quant: bool = False,
        kernels: str = "reference"):
    """The MoE sub-layer on normed input x [B,T,D] with token ids i32[B,T]: [B,T,D]."""
    b, t, d = x.shape
    xf = x.reshape(b * t, d)
    with jax.named_scope("route"):
        idx, w = route(xf, tokens.reshape(-1), p["gate"], cfg, cfg.mlp_kind(layer) == "hash")
    with jax.named_scope("experts"):
        out = routed_experts(xf, idx, w, p["experts"], cfg, sim_quant=sim_quant, kernels=kernels)
    if "shared_experts" in p:
        with jax.named_scope("shared"):
            out = out + shared_expert(xf, p["shared_experts"], cfg, sim_quant=sim_quant)
    return out.astype(x.dtype).reshape(b, t, d)
