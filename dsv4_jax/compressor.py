"""The KV compressor shared by CSA, HCA and the lightning indexer (ARCHITECTURE.md §5.2).

Each token i contributes ``k_i = x_i @ wkvᵀ`` and gate logits
``g_i = x_i @ wgateᵀ + ape[i mod m]`` (fp32, ``c·Dc`` channels). An entry pools its
slots with one softmax per channel over the slot axis:

* non-overlap (HCA): entry w pools the m tokens of block w;
* overlap (CSA, m = 4): entry w pools 2m slots: the first half ``A`` of block w−1's
  tokens, then the second half ``Bh`` of block w's tokens (for w = 0 the first m slots
  are empty: k = 0, g = −∞).

The pooled vector is RMS-normalised, cast to the activation dtype and roped at
``w·m`` with the compressed-layer table. Entry w exists once token ``(w+1)·m − 1``
has been processed.

``project`` and ``finish`` are the two halves that the incremental (state) path
reuses; ``compress_sequence`` is the full-sequence form used from position 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax import ops
from dsv4_jax.config import Config

F32 = jnp.float32


def project(x: jax.Array, p: dict, positions: jax.Array, ratio: int) -> tuple[jax.Array, jax.Array]:
    """Per-token kv and gate logits with ``ape`` added: f32[B,T,c·Dc] each (§5.2)."""
    xf = x.astype(F32)
    k = jnp.einsum("btd,od->bto", xf, p["wkv"]["weight"].astype(F32), preferred_element_type=F32)
    g = jnp.einsum("btd,od->bto", xf, p["wgate"]["weight"].astype(F32), preferred_element_type=F32)
    g = g + p["ape"].astype(F32)[positions % ratio]
    return k, g


def pool(k_slots: jax.Array, g_slots: jax.Array) -> jax.Array:
    """Per-channel softmax over the slot axis (−2) of the gates, weighted sum of kv: f32[..., Dc]."""
    w = jax.nn.softmax(g_slots, axis=-2)
    return jnp.sum(w * k_slots, axis=-2)


def overlap_slots(k: jax.Array, g: jax.Array, dim: int, prev_k=None, prev_g=None):
    """Arrange blocks [B,n,m,2·Dc] into overlap slots [B,n,2m,Dc].

    Slots 0..m−1 hold block w−1's ``A`` halves (``prev_k/prev_g`` [B,m,Dc] for w = 0,
    else empty), slots m..2m−1 block w's ``Bh`` halves.
    """
    a_k, b_k = k[..., :dim], k[..., dim:]
    a_g, b_g = g[..., :dim], g[..., dim:]
    b, _, m, _ = k.shape
    if prev_k is None:
        prev_k = jnp.zeros((b, m, dim), F32)
        prev_g = jnp.full((b, m, dim), -jnp.inf, F32)
    first_k = jnp.concatenate([prev_k[:, None], a_k[:, :-1]], axis=1)
    first_g = jnp.concatenate([prev_g[:, None], a_g[:, :-1]], axis=1)
    return jnp.concatenate([first_k, b_k], axis=2), jnp.concatenate([first_g, b_g], axis=2)


def finish(pooled: jax.Array, p: dict, entry_pos: jax.Array, cfg: Config, dtype, *, indexer: bool,
           sim_quant: bool) -> jax.Array:
    """Norm, RoPE at the block's first position, optional QAT rounding (§5.2 steps 1-3).

    ``pooled`` f32[B,n,Dc], ``entry_pos`` i32[B,n] = w·m. Returns [B,n,Dc] in ``dtype``.
    """
    c = ops.rms_norm(pooled, p["norm"]["weight"], cfg.rms_norm_eps).astype(dtype)
    cos, sin = ops.rope_angles(entry_pos, ops.rope_inv_freq(cfg, compressed=True))
    c = ops.apply_rope(c, cos, sin)
    if sim_quant:
        if indexer:
            c = ops.fp4_sim(ops.hadamard(c), 32)
        else:
            c = ops.fp8_sim_nope(c, cfg.qk_rope_head_dim)
    return c


def compress_sequence(x: jax.Array, p: dict, ratio: int, cfg: Config, *, indexer: bool = False,
                      sim_quant: bool = False) -> jax.Array:
    """Every complete entry of a sequence that starts at position 0: [B, T // ratio, Dc].

    ``x`` [B,T,D] is the normed attention input. Tokens past the last complete block
    produce no entry (they are a compressor tail, kept only by the state path).
    """
    b, t, _ = x.shape
    n = t // ratio
    dim = p["norm"]["weight"].shape[0]
    if n == 0:
        return jnp.zeros((b, 0, dim), x.dtype)
    positions = jnp.broadcast_to(jnp.arange(n * ratio), (b, n * ratio))
    k, g = project(x[:, : n * ratio], p, positions, ratio)
    k = k.reshape(b, n, ratio, -1)
    g = g.reshape(b, n, ratio, -1)
    if ratio == cfg.compress_rate_csa:
        k, g = overlap_slots(k, g, dim)
    pooled = pool(k, g)  # f32[B,n,Dc]
    entry_pos = jnp.broadcast_to(jnp.arange(n) * ratio, (b, n))
    return finish(pooled, p, entry_pos, cfg, x.dtype, indexer=indexer, sim_quant=sim_quant)
