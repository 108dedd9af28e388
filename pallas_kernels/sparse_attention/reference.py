"""Compressed sparse attention over paged state: the pure-jnp specification and the
argument validators shared with the kernel (ARCHITECTURE.md §5.1, §5.4, §5.5, §10.1).

For query token ``t`` of sequence ``b`` at position ``p = start[b] + t`` and every head
``h`` (all heads share the single K=V head, MQA), one softmax runs over

1. window rows from the ring (positions ``[p−W+1, p]`` that are ``< start[b]``; the row of
   position ``x`` lives in ring slot ``x mod W`` of ``ring[ring_slot[b]]``),
2. the chunk's own rows ``kv[b, j]`` (position ``start[b]+j``) with ``p−W < start[b]+j ≤ p``,
3. compressed rows of the paged pool, entry ``e`` of sequence ``b`` being
   ``pool[block_table[b, e // E], e % E]``: CSA reads the per-query top-k entries
   ``topk[b, t]`` (−1 = none); HCA reads every entry ``e < (p+1) // ratio``,

plus a per-head sink logit whose value is zero (it only enlarges the denominator):
``o = Σ_j exp(s_j)·kv_j / (Σ_j exp(s_j) + exp(sink_h))``, ``s_j = q·kv_j / √K``. The
kernel consumes already-roped q and kv rows; it neither applies nor inverts RoPE.

The ring holds positions in ``[state_start[b], start[b])`` only (``state_start``: the first
position of a replay that rebuilds the state from a cached prefix; 0 otherwise): write
the chunk's rows into the ring *after* the call (for T = 1 before is equally safe, because the slot it overwrites
holds position ``p−W``, outside the window). Rows ``t ≥ q_lens[b]`` of a padded chunk
are outputs of zeros.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import kv_format, paging

F32 = jnp.float32


# --------------------------------------------------------------------------- validators
def _shape(x) -> tuple[int, ...]:
    return tuple(x.shape)


def _check_rows(name: str, rows, ndim_prefix: int, head_dim: int) -> None:
    if isinstance(rows, kv_format.Fp8Rows):
        pre = {_shape(a)[:-1] for a in rows}
        if len(pre) != 1 or len(next(iter(pre))) != ndim_prefix:
            raise ValueError(
                f"{name}: Fp8Rows leaves must share {ndim_prefix} leading axes, got "
                f"{[_shape(a) for a in rows]}"
            )
        if rows.nope.dtype != jnp.float8_e4m3fn or rows.scale.dtype != jnp.uint8:
            raise ValueError(
                f"{name}: Fp8Rows needs nope float8_e4m3fn and scale uint8, got "
                f"{rows.nope.dtype}, {rows.scale.dtype}"
            )
    elif not hasattr(rows, "shape") or len(rows.shape) != ndim_prefix + 1:
        raise ValueError(f"{name}: expected rows [{'?,' * ndim_prefix}K], got {getattr(rows, 'shape', rows)}")
    if rows.shape[-1] != head_dim:
        raise ValueError(f"{name}: head dim {rows.shape[-1]} != q head dim {head_dim}")


def _check_i32(name: str, x, shape: tuple[int, ...]) -> None:
    if _shape(x) != shape or x.dtype != jnp.int32:
        raise ValueError(f"{name}: expected int32{list(shape)}, got {x.dtype}{list(_shape(x))}")


def validate_attention_args(
    q, kv, ring, ring_slot, pool, block_table, topk, sink, start, q_lens, ratio: int, state_start=None
) -> None:
    """Trace-time shape checks shared by the kernel and the reference; errors name the argument."""
    if q.ndim != 4:
        raise ValueError(f"q: expected [B,T,H,K], got {_shape(q)}")
    b, t, h, k = q.shape
    if _shape(kv) != (b, t, k):
        raise ValueError(f"kv: expected [B,T,K]={[b, t, k]}, got {list(_shape(kv))}")
    _check_rows("ring", ring, 2, k)
    _check_i32("ring_slot", ring_slot, (b,))
    _check_i32("start", start, (b,))
    _check_i32("q_lens", q_lens, (b,))
    if state_start is not None:
        _check_i32("state_start", state_start, (b,))
    if _shape(sink) != (h,):
        raise ValueError(f"sink: expected [H]={[h]}, got {list(_shape(sink))}")
    if pool is None:
        if block_table is not None or topk is not None:
            raise ValueError("block_table/topk: given without a compressed pool")
        return
    _check_rows("pool", pool, 2, k)
    if isinstance(pool, kv_format.Fp8Rows) != isinstance(ring, kv_format.Fp8Rows):
        raise ValueError("pool: storage format must match ring (both bf16/f32 or both Fp8Rows)")
    if isinstance(pool, kv_format.Fp8Rows) and pool.rope_dim != ring.rope_dim:
        raise ValueError(f"pool: rope_dim {pool.rope_dim} != ring rope_dim {ring.rope_dim}")
    if block_table is None or block_table.ndim != 2:
        raise ValueError(f"block_table: expected int32[B, max_blocks], got {block_table}")
    _check_i32("block_table", block_table, (b, block_table.shape[1]))
    if topk is not None:
        if topk.ndim != 3:
            raise ValueError(f"topk: expected int32[B,T,k], got {_shape(topk)}")
        _check_i32("topk", topk, (b, t, topk.shape[2]))
    elif ratio <= 0:
        raise ValueError(f"ratio: HCA (pool without topk) needs ratio > 0, got {ratio=}")


# --------------------------------------------------------------------------- reference
def ring_positions(start: jax.Array, window: int) -> jax.Array:
    """i32[B,W]: the position that ring row ``r`` holds before the chunk (< 0: never written)."""
    r = jnp.arange(window)
    return start[:, None] - 1 - jnp.mod(start[:, None] - 1 - r[None, :], window)


def gather_entries(pool, block_table: jax.Array, entries: jax.Array) -> jax.Array:
    """Entries i32[B,...] of each sequence's compressed list → dense f32[B,...,K] via the block table."""
    e_per_block = pool.shape[1]
    b = block_table.shape[0]
    flat = jnp.maximum(entries, 0).reshape(b, -1)
    blk = jnp.take_along_axis(block_table, jnp.minimum(flat // e_per_block, block_table.shape[1] - 1), 1)
    rows = kv_format.read_rows(pool, (blk, flat % e_per_block))
    return kv_format.dequantize_kv(rows).reshape(*entries.shape, -1)


@functools.partial(jax.jit, static_argnames=("ratio",))
def sparse_attention_reference(
    q: jax.Array,  # [B,T,H,K] roped queries (bf16 or f32)
    kv: jax.Array,  # [B,T,K] the chunk's own roped K=V rows, positions start..start+T−1
    ring: kv_format.KvRows,  # [num_slots, W, K] window rings (array or Fp8Rows)
    ring_slot: jax.Array,  # i32[B] ring of each sequence
    pool: kv_format.KvRows | None,  # [num_blocks, E, K] compressed entries; None: SWA-only layer
    block_table: jax.Array | None,  # i32[B, max_blocks] pool blocks of each sequence
    topk: jax.Array | None,  # i32[B,T,k] CSA entry ids (−1 = none); None with ratio>0: HCA
    sink: jax.Array,  # f32[H] per-head sink logits
    start: jax.Array,  # i32[B] position of chunk token 0
    q_lens: jax.Array,  # i32[B] valid tokens of the chunk (≤ T)
    *,
    state_start: jax.Array | None = None,  # i32[B] first position the ring holds (None: 0)
    ratio: int = 0,
) -> jax.Array:  # [B,T,H,K] in q.dtype
    """Masked softmax over [ring ‖ chunk ‖ compressed ‖ sink]: the model's attention on the
    state path (CPU and the default), and the spec the kernel is tested against. HCA entries
    are streamed in chunks of whole blocks with an online softmax, only up to the longest
    sequence's visible entries (``paging``): memory flat in the table width, work following
    the real context."""
    shapes = kv_format.logical_shapes  # pools may be held as bits (kv_format.logical)
    validate_attention_args(
        q,
        kv,
        shapes(ring),
        ring_slot,
        shapes(pool),
        block_table,
        topk,
        sink,
        start,
        q_lens,
        ratio,
        state_start,
    )
    first = jnp.zeros_like(start) if state_start is None else state_start
    b, t, h, k = q.shape
    window = ring.shape[1]
    ring_keys = kv_format.dequantize_kv(kv_format.read_rows(ring, ring_slot))  # f32[B,W,K]
    chunk_keys = kv.astype(F32)  # f32[B,T,K], shared by every query tile
    p_ring = ring_positions(start, window)  # [B,W]
    scale = k**-0.5
    hca = pool is not None and topk is None

    def attend(q_t, tok, topk_t):
        """Rows ``tok`` i32[Tq] of the chunk (queries ``q_t`` [B,Tq,H,K]) -> f32[B,Tq,H,K]."""
        tq = tok.shape[0]
        pos = start[:, None] + tok[None, :]  # i32[B,Tq]
        live = tok[None, :] < q_lens[:, None]  # bool[B,Tq]
        ring_mask = (p_ring[:, None, :] >= first[:, None, None]) & (
            p_ring[:, None, :] > pos[:, :, None] - window
        )
        d = tok[:, None] - jnp.arange(t)[None, :]
        chunk_mask = jnp.broadcast_to((d >= 0) & (d < window), (b, tq, t))
        segments = [(ring_keys, ring_mask), (chunk_keys, chunk_mask)]  # shared keys [B,S,K]
        if topk_t is not None:
            cap = block_table.shape[1] * pool.shape[1]  # entries the block table can address
            rows = gather_entries(pool, block_table, topk_t)  # [B,Tq,k,K]
            segments.append((rows, (topk_t >= 0) & (topk_t < cap)))
        logits, values = [], []
        for keys, mask in segments:
            mask = mask & live[:, :, None]
            keys = jnp.where(mask[..., None] if keys.ndim == 4 else jnp.any(mask, 1)[..., None], keys, 0.0)
            eq = "bthk,bsk->bths" if keys.ndim == 3 else "bthk,btjk->bthj"
            s = jnp.einsum(eq, q_t, keys.astype(q.dtype), preferred_element_type=F32) * scale
            logits.append(jnp.where(mask[:, :, None, :], s, -jnp.inf))
            values.append(keys)
        sink_col = jnp.broadcast_to(sink.astype(F32)[None, None, :, None], (b, tq, h, 1))
        s_all = jnp.concatenate(logits + [sink_col], axis=-1)  # f32[B,Tq,H,S]
        m = jnp.max(s_all, axis=-1)  # f32[B,Tq,H], finite: the sink is always there
        p = jnp.exp(s_all - m[..., None])
        denom = jnp.sum(p, axis=-1)
        acc = jnp.zeros((b, tq, h, k), F32)
        at = 0
        for v in values:
            n = v.shape[-2]
            eq = "bths,bsk->bthk" if v.ndim == 3 else "bthj,btjk->bthk"
            acc = acc + jnp.einsum(eq, p[..., at : at + n], v, preferred_element_type=F32)
            at += n
        if hca:  # every visible entry, streamed chunk by chunk with an online softmax (paging)
            visible = jnp.where(live, (pos + 1) // ratio, 0)  # i32[B,Tq]
            per_chunk = paging.chunk_blocks(pool.shape[1], block_table.shape[1], b * tq * h)
            table = paging.padded_table(block_table, per_chunk)

            def body(i, carry):
                m, denom, acc = carry
                rows, ent = paging.read_chunk(pool, table, i, per_chunk)
                mask = ent[None, None, :] < visible[..., None]  # bool[B,Tq,C]
                vals = jnp.where(
                    jnp.any(mask, 1)[..., None], kv_format.dequantize_kv(rows), 0.0
                )  # f32[B,C,K]
                s = (
                    jnp.einsum("bthk,bsk->bths", q_t, vals.astype(q.dtype), preferred_element_type=F32)
                    * scale
                )
                s = jnp.where(mask[:, :, None, :], s, -jnp.inf)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                corr = jnp.exp(m - m_new)
                p = jnp.exp(s - m_new[..., None])
                acc = acc * corr[..., None] + jnp.einsum(
                    "bths,bsk->bthk", p, vals, preferred_element_type=F32
                )
                return m_new, denom * corr + jnp.sum(p, axis=-1), acc

            n = paging.num_chunks(visible, pool.shape[1], per_chunk)
            m, denom, acc = jax.lax.fori_loop(0, n, body, (m, denom, acc))
        return jnp.where(live[:, :, None, None], acc / denom[..., None], 0.0)

    kk = 0 if topk is None else topk.shape[-1]
    tq = paging.query_tile(t, b * (h * (window + t + kk) + kk * k))  # logits + CSA rows per query
    if tq == t:
        return attend(q, jnp.arange(t), topk).astype(q.dtype)

    def tile(i):  # queries [i·tq, (i+1)·tq): the CSA rows a tile gathers stay bounded
        tok = i * tq + jnp.arange(tq)
        sl = lambda x: jax.lax.dynamic_slice_in_dim(x, i * tq, tq, axis=1)
        return attend(sl(q), tok, None if topk is None else sl(topk))

    out = jax.lax.map(tile, jnp.arange(t // tq))  # f32[T/tq, B, tq, H, K]
    return jnp.moveaxis(out, 0, 1).reshape(b, t, h, k).astype(q.dtype)
