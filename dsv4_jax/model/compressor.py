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

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4_jax.config import Config
from dsv4_jax.model import ops
from dsv4_jax.model.layers import Linear, RMSNorm, param
from dsv4_jax.model.state import Tail

F32 = jnp.float32


class Compressor(nnx.Module):
    """One compressor (§5.2): ``wkv``, ``wgate`` [c·Dc, D] (run in fp32, as the reference keeps
    them), ``ape`` [m, c·Dc] and the entry norm [Dc]; ``c = 2`` in overlap mode (CSA), else 1."""

    def __init__(self, cfg: Config, ratio: int, dim: int, rngs: nnx.Rngs):
        c = 2 if ratio == cfg.compress_rate_csa else 1
        d = cfg.hidden_size
        self.wkv = Linear(c * dim, d, F32, ("cmp_dim", "embed"), rngs)
        self.wgate = Linear(c * dim, d, F32, ("cmp_dim", "embed"), rngs)
        self.ape = param(rngs, (ratio, c * dim), F32, (None, "cmp_dim"), "normal")
        self.norm = RMSNorm(dim, "cmp_dim", rngs)


def project(x: jax.Array, p: Compressor, positions: jax.Array, ratio: int) -> tuple[jax.Array, jax.Array]:
    """Per-token kv and gate logits with ``ape`` added: f32[B,T,c·Dc] each (§5.2)."""
    xf = x.astype(F32)
    k = jnp.einsum("btd,od->bto", xf, p.wkv.weight[...].astype(F32), preferred_element_type=F32)
    g = jnp.einsum("btd,od->bto", xf, p.wgate.weight[...].astype(F32), preferred_element_type=F32)
    g = g + p.ape[...].astype(F32)[positions % ratio]
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


def finish(
    pooled: jax.Array,
    p: Compressor,
    entry_pos: jax.Array,
    cfg: Config,
    dtype,
    *,
    indexer: bool,
    sim_quant: bool,
) -> jax.Array:
    """Norm, RoPE at the block's first position, optional QAT rounding (§5.2 steps 1-3).

    ``pooled`` f32[B,n,Dc], ``entry_pos`` i32[B,n] = w·m. Returns [B,n,Dc] in ``dtype``.
    """
    c = ops.rms_norm(pooled, p.norm.weight[...], cfg.rms_norm_eps).astype(dtype)
    cos, sin = ops.rope_angles(entry_pos, ops.rope_inv_freq(cfg, compressed=True))
    c = ops.apply_rope(c, cos, sin)
    if sim_quant:
        if indexer:
            c = ops.fp4_sim(ops.hadamard(c), 32)
        else:
            c = ops.fp8_sim_nope(c, cfg.qk_rope_head_dim)
    return c


def compress_sequence(
    x: jax.Array, p: Compressor, ratio: int, cfg: Config, *, indexer: bool = False, sim_quant: bool = False
) -> jax.Array:
    """Every complete entry of a sequence that starts at position 0: [B, T // ratio, Dc].

    ``x`` [B,T,D] is the normed attention input. Tokens past the last complete block
    produce no entry (they are a compressor tail, kept only by the state path).
    """
    b, t, _ = x.shape
    n = t // ratio
    dim = p.norm.weight.shape[0]
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


class ChunkEntries(NamedTuple):
    """Entries completed by one chunk: rows [B,n,Dc], their indices w i32[B,n], validity bool[B,n]."""

    rows: jax.Array
    index: jax.Array
    valid: jax.Array


def compress_chunk(
    x: jax.Array,
    p: Compressor,
    positions: jax.Array,
    lengths: jax.Array,
    tail: Tail,
    ratio: int,
    cfg: Config,
    *,
    state_start: jax.Array | None = None,
    commit: jax.Array | None = None,
    indexer: bool = False,
    sim_quant: bool = False,
):
    """Advance one compressor over a chunk of tokens using its tail state (§5.5).

    ``x`` [B,T,D] normed input at ``positions`` i32[B,T] (contiguous from each row's
    start), ``lengths`` i32[B] valid tokens, ``tail`` (``Tail``: k, g): f32[B,R,c·Dc] for the
    positions since the start of the previous (overlap) or current block.

    The tail rows and the chunk's rows form one run E of per-position (k, g); every
    block that completes inside the chunk is pooled from E, and the new tail is cut
    from E. Rows at positions below ``state_start`` i32[B] (default 0) are the
    start-of-sequence value (k = 0, g = −∞), so a recycled slot's stale tail is never
    read; a prefix-cache replay passes its first position there.
    ``commit`` i32[B] (default ``lengths``): the new tail is cut after the first ``commit``
    tokens, so draft tokens under verification complete entries but never enter the tail.
    Returns ``(ChunkEntries, new_tail)``.
    """
    m = ratio
    overlap = m == cfg.compress_rate_csa
    b, t, _ = x.shape
    dim = p.norm.weight.shape[0]
    r = tail.k.shape[1]
    k, g = project(x, p, positions, m)  # f32[B,T,c·Dc]
    ek = jnp.concatenate([tail.k, k], axis=1)  # f32[B,R+T,c·Dc]
    eg = jnp.concatenate([tail.g, g], axis=1)
    start = positions[:, 0]
    end = start + lengths
    floor = jnp.zeros_like(start) if state_start is None else state_start
    w0 = start // m
    base = (w0 - 1 if overlap else w0) * m  # position of E row 0

    def rows_at(pos):  # pos i32[B,...] -> k, g f32[B,...,c·Dc]; negative positions are empty
        flat = pos.reshape(b, -1)
        i = jnp.where(flat < start[:, None], flat - base[:, None], r + flat - start[:, None])
        i = jnp.clip(i, 0, r + t - 1)[..., None]
        rk = jnp.take_along_axis(ek, i, axis=1).reshape(*pos.shape, -1)
        rg = jnp.take_along_axis(eg, i, axis=1).reshape(*pos.shape, -1)
        empty = (pos < floor.reshape((b,) + (1,) * (pos.ndim - 1)))[..., None]
        return jnp.where(empty, 0.0, rk), jnp.where(empty, -jnp.inf, rg)

    n_new = t // m + 1  # blocks that can complete in a chunk of t tokens
    w = w0[:, None] + jnp.arange(n_new)  # i32[B,n]
    valid = (w + 1) * m <= end[:, None]
    cur_pos = w[..., None] * m + jnp.arange(m)  # i32[B,n,m]
    ck, cg = rows_at(cur_pos)
    if overlap:
        pk, pg = rows_at(cur_pos - m)
        ck = jnp.concatenate([pk[..., :dim], ck[..., dim:]], axis=2)  # f32[B,n,2m,Dc]
        cg = jnp.concatenate([pg[..., :dim], cg[..., dim:]], axis=2)
    rows = finish(pool(ck, cg), p, w * m, cfg, x.dtype, indexer=indexer, sim_quant=sim_quant)

    kept = end if commit is None else start + commit  # the tail stands after the committed tokens
    new_base = (kept // m - 1 if overlap else kept // m) * m
    tail_pos = new_base[:, None] + jnp.arange(r)  # i32[B,R]
    tk, tg = rows_at(tail_pos)
    keep = (tail_pos < kept[:, None])[..., None]
    new_tail = Tail(jnp.where(keep, tk, 0.0), jnp.where(keep, tg, -jnp.inf))
    return ChunkEntries(rows, w, valid), new_tail
