"""Expert-parallel MoE: routed experts split over the ``expert`` mesh axis, tokens moved to
them and back by ``jax.shard_map`` with two all-to-alls (ARCHITECTURE.md §6 math unchanged).

Inside one ``shard_map`` that is manual over the whole mesh, each device holds:

* its token slice ``x`` [n, D]: tokens split over every mesh axis except the ones the
  expert hidden dim F is split over (``Layout.ffn_mlp_axes``, normally ``tensor``);
* its experts ``[E/ep, F/tp, D]`` (packed MXFP4 bytes and scales stay packed: the
  ``QuantizedWeight`` halves are split alike, in whole 32-column blocks), the router and,
  F-split the same way, the shared expert.

Per layer and device:

1. route its tokens locally (router weights are replicated): ``idx, w`` [n, k];
2. **dispatch**: for each destination expert shard r, the tokens with the shard-local ids
   of their choices on r (``E/ep`` = none there) and weights: ``[ep, n, ·]``, then one
   ``all_to_all`` over ``expert`` -> ``[ep (source), n, ·]``;
3. the local grouped matmul over those ``ep·n`` tokens (``moe.routed_experts`` with the
   local stack: ragged_dot, or the MXFP4 Pallas kernels);
4. **combine**: ``all_to_all`` back, sum over the shards that computed parts of a token;
5. add the shared expert, ``psum`` over the F-split axes (the shared expert's F splits with
   the routed experts' when its shapes allow, else it runs whole on each device).

The dispatch buffer holds every token once per expert shard: with static shapes this is
the smallest buffer that can never drop a token (a token may pick all its k experts on one
shard), so the result is exact for any routing. For Flash at ep = 8, k = 6, a token needs on
average 8·(1 − (7/8)^6) ≈ 4.4 of the 8 copies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

import pallas_kernels as pk
from dsv4_jax.config import Config
from dsv4_jax.model import moe as moe_ref
from dsv4_jax.model.layers import value
from dsv4_jax.parallel.rules import Layout

F32 = jnp.float32


def moe(
    x: jax.Array,
    tokens: jax.Array,
    p: moe_ref.MoE,
    layer: int,
    cfg: Config,
    *,
    layout: Layout | None,
    sim_quant: bool = False,
    kernels: pk.Impl = pk.REFERENCE,
) -> jax.Array:
    """``moe.moe`` on a mesh: x [B,T,D] (normed), token ids i32[B,T] -> [B,T,D].

    Without a layout, or on one device, this is ``moe.moe`` itself.
    """
    if layout is None or layout.mesh.size == 1:
        return moe_ref.moe(x, tokens, p, layer, cfg, sim_quant=sim_quant, kernels=kernels)
    b, t, d = x.shape
    mesh = layout.mesh
    tp = layout.ffn_mlp_axes(p)
    shared_tp = layout.ffn_mlp_axes(p, shared=True)
    ep = layout.axes("expert")
    tok_axes = tuple(a for a in mesh.axis_names if a not in tp)
    n = b * t
    pad = -n % layout.ways(tok_axes)
    xf = jnp.pad(x.reshape(n, d), ((0, pad), (0, 0)))
    tf = jnp.pad(tokens.reshape(n), (0, pad))
    hash_routed = cfg.mlp_kind(layer) == "hash"
    graph, params = nnx.split(p)  # the module's params cross the shard_map boundary as a pytree

    def body(x, tok, params):  # x [n_l, D], tok i32[n_l]
        p = nnx.merge(graph, params)
        with jax.named_scope("route"):
            idx, w = moe_ref.route(x, tok, p.gate, cfg, hash_routed)  # [n_l, k]
        e_local = value(p.experts.w1.weight).shape[0]
        shards = cfg.n_routed_experts // e_local
        kw = {"sim_quant": sim_quant, "kernels": kernels, "num_experts": e_local}
        if shards > 1:
            with jax.named_scope("dispatch"):
                mine = (idx // e_local)[None] == jnp.arange(shards)[:, None, None]  # bool[ep, n_l, k]
                a2a = lambda a: jax.lax.all_to_all(a, ep[0], 0, 0, tiled=True)
                rx = a2a(jnp.broadcast_to(x[None], (shards, *x.shape)))  # [ep, n_l, D] from each source
                ri = a2a(jnp.where(mine, idx % e_local, e_local))  # local expert ids, e_local = none
                rw = a2a(jnp.where(mine, w, 0.0))
            with jax.named_scope("experts"):
                k = idx.shape[1]
                y = moe_ref.routed_experts(
                    rx.reshape(-1, d), ri.reshape(-1, k), rw.reshape(-1, k), p.experts, cfg, **kw
                )  # f32[ep·n_l, D]
            with jax.named_scope("combine"):
                out = a2a(y.reshape(shards, -1, d)).sum(axis=0)  # f32[n_l, D]
        else:
            with jax.named_scope("experts"):
                out = moe_ref.routed_experts(x, idx, w, p.experts, cfg, **kw)
        if p.shared_experts is None:
            return jax.lax.psum(out, tp) if tp else out
        with jax.named_scope("shared"):
            shared = moe_ref.shared_expert(x, p.shared_experts, cfg, sim_quant=sim_quant)
        if shared_tp:  # partial over its F columns too: one psum for both
            return jax.lax.psum(out + shared, tp)
        return (jax.lax.psum(out, tp) if tp else out) + shared  # whole on every device

    rows = P(tok_axes)
    specs = (rows, rows, layout.sublayer_specs("ffn", params, cfg))
    fn = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=rows, check_vma=False)
    out = fn(xf, tf, params)[:n]
    return out.astype(x.dtype).reshape(b, t, d)
