"""The lightning indexer of CSA layers (ARCHITECTURE.md §5.3).

For query t and compressed entry s:
``I[t,s] = Σ_h w[t,h]·ReLU(q[t,h]·K[s])``, with ``q = c_q @ wq_bᵀ`` roped at the
query position, ``w = x @ weights_projᵀ · (Dᵢ^-½ · Hᵢ^-½)`` and K the indexer
compressor's entries. Entries that are not yet complete for query t
(``s >= (t+1) // m``) are masked, the top ``index_topk`` survive, and picks that
land on masked entries become −1 ("no key"). Only the index set leaves the indexer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4_jax.config import Config
from dsv4_jax.model import choices, ops
from dsv4_jax.model.compressor import Compressor
from dsv4_jax.model.layers import Linear
from pallas_kernels.indexer_topk.reference import index_scores_reference

F32 = jnp.float32


class Indexer(nnx.Module):
    """The lightning indexer of a CSA layer (§5.3): query projection ``wq_b`` [Hi·Di, q_lora],
    head weights ``weights_proj`` [Hi, D] and its own compressor (m = 4, Dc = Di)."""

    def __init__(self, cfg: Config, ratio: int, dtype, rngs: nnx.Rngs):
        ih, ik = cfg.index_n_heads, cfg.index_head_dim
        self.wq_b = Linear(ih * ik, cfg.q_lora_rank, dtype, ("index_heads", "q_lora"), rngs)
        self.weights_proj = Linear(ih, cfg.hidden_size, dtype, ("index_heads_w", "embed"), rngs)
        self.compressor = Compressor(cfg, ratio, ik, rngs)


def index_queries(x, c_q, positions, p: Indexer, cfg: Config, *, sim_quant: bool = False):
    """Indexer queries [B,T,Hi,Di] and head weights f32[B,T,Hi]."""
    b, t, _ = x.shape
    q = ops.linear(c_q, p.wq_b.weight, quant_act=sim_quant)
    q = q.reshape(b, t, cfg.index_n_heads, cfg.index_head_dim)
    cos, sin = ops.rope_angles(positions, ops.rope_inv_freq(cfg, compressed=True))
    q = ops.apply_rope(q, cos[:, :, None], sin[:, :, None])
    if sim_quant:
        q = ops.fp4_sim(ops.hadamard(q), 32)
    w = jnp.einsum(
        "btd,hd->bth", x.astype(F32), p.weights_proj.weight[...].astype(F32), preferred_element_type=F32
    )
    w = w * (cfg.index_head_dim**-0.5 * cfg.index_n_heads**-0.5)
    return q, w


def index_scores(q: jax.Array, w: jax.Array, keys: jax.Array) -> jax.Array:
    """``Σ_h w[t,h]·ReLU(q[t,h]·K[s])``: f32[B,T,S] for keys [B,S,Di]; the kernel package's spec."""
    return index_scores_reference(q, w, keys)


def select_topk(scores: jax.Array, positions: jax.Array, ratio: int, topk: int) -> jax.Array:
    """Causal mask + top-k: i32[B,T,k] entry indices, −1 where a pick is not visible.

    ``k = min(topk, S)`` is static. Masked scores are −inf, so they only win when a
    query sees fewer than k entries; those picks are replaced by −1.
    """
    s = scores.shape[-1]
    k = min(topk, s)
    visible = (positions + 1) // ratio  # i32[B,T]: entries 0..visible-1 exist
    ent = jnp.arange(s)
    masked = jnp.where(ent[None, None, :] < visible[..., None], scores, -jnp.inf)
    _, idx = jax.lax.top_k(masked, k)
    return choices.pick("indexer", jnp.where(idx < visible[..., None], idx, -1).astype(jnp.int32))


def indexer_topk(x, c_q, positions, keys, p: Indexer, ratio: int, cfg: Config, *, sim_quant: bool = False):
    """Top-k compressed-entry indices per query, i32[B,T,k] (§5.3)."""
    q, w = index_queries(x, c_q, positions, p, cfg, sim_quant=sim_quant)
    return select_topk(index_scores(q, w, keys), positions, ratio, cfg.index_topk)
