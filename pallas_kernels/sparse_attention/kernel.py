"""Compressed sparse attention as a Pallas (Triton) kernel: window ring + chunk rows +
CSA top-k / HCA compressed rows + sink, one online softmax (ARCHITECTURE.md §5.4).

Why this shape (SERVING.md §3): decode attention moves ``(W + k)`` rows per CSA query
and ``W + T/128`` per HCA query, 584 B each in "fp8_ds_mla". So the kernel reads every
needed row exactly once per program, straight from the paged pools (block table and
indices are ordinary inputs, rows gathered with masked integer-array loads, so unused
or NaN-poisoned slots are never fetched), dequantizes FP8 rows in registers, and shares
each loaded row tile between all heads of the program (MQA: heads are the M dimension
of both dots; the same tile is the key and the value).

Grid ``(B·T, num_splits, H/block_h)``. Split ``s`` takes a contiguous range of the
compressed tiles (flash-decoding: at batch 1 a single program per query would leave
the GPU idle); split 0 also takes the window. With ``num_splits == 1`` the program adds
the sink and normalizes; otherwise it writes ``(acc, m, l)`` partials that a small jnp
epilogue merges with the sink, so no grid axis accumulates (TOOLCHAIN.md §4, race trap).

The head dim is processed as power-of-two column chunks: one 512-wide chunk for dense
rows; for Fp8Rows one chunk per 64-dim scale block (each with its own UE8M0 scale) and
one for the bf16 RoPE dims, so 448 never has to be a tile width.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _common as cm
from pallas_kernels import kv_format
from pallas_kernels.sparse_attention.reference import validate_attention_args

F32 = jnp.float32
NEG = -1e30  # finite "−inf" for the running max, so exp(m_old − m_new) is never NaN


def _chunks(head_dim: int, rope_dim: int | None) -> list[tuple[int, int, int | None]]:
    """Static ``(offset, width, scale column)`` column chunks of a row (see module doc)."""
    if rope_dim is None:
        out, off = [], 0
        for w in cm.pow2_pieces(head_dim):
            out.append((off, w, None))
            off += w
        return out
    nope = head_dim - rope_dim
    out = []
    for c in range(cm.cdiv(nope, kv_format.KV_SCALE_BLOCK)):
        off = c * kv_format.KV_SCALE_BLOCK
        for w in cm.pow2_pieces(min(kv_format.KV_SCALE_BLOCK, nope - off)):
            out.append((off, w, c))
            off += w
    off = nope
    for w in cm.pow2_pieces(rope_dim):
        out.append((off, w, None))
        off += w
    return out


def _load_chunks(src, rows, valid, chunks, nope_dim, cdt):
    """Row tile of a dense ref or an (nope, rope, scale) ref triple → per-chunk [n, w] in cdt."""
    out = []
    for off, w, c in chunks:
        if not isinstance(src, tuple):
            out.append(cm.gather_rows(src, rows, valid, off, w).astype(cdt))
            continue
        nope_ref, rope_ref, scale_ref = src
        if off >= nope_dim:
            out.append(cm.gather_rows(rope_ref, rows, valid, off - nope_dim, w).astype(cdt))
            continue
        sc = cm.e8m0_to_f32(cm.gather_cols(scale_ref, rows, valid, jnp.full((1,), c, jnp.int32)))
        out.append((cm.gather_rows(nope_ref, rows, valid, off, w).astype(F32) * sc).astype(cdt))
    return out


def _body(
    *refs,
    t_len,
    window,
    e_per_block,
    n_blocks_max,
    ratio,
    mode,
    fp8,
    chunks,
    nope_dim,
    block_k,
    block_h,
    tiles_per_split,
    n_ctiles,
    finalize,
):
    """One program: query ``i = b·T + t``, split ``s``, head block ``hb``."""
    it = iter(refs)
    q_ref, kv_ref, slot_ref, start_ref, qlen_ref, first_ref, sink_ref = (next(it) for _ in range(7))
    ring = tuple(next(it) for _ in range(3)) if fp8 else next(it)
    if mode != "swa":
        pool = tuple(next(it) for _ in range(3)) if fp8 else next(it)
        bt_ref = next(it)
        idx_ref = next(it) if mode == "csa" else None
    outs = list(it)

    i, s, hb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    b, t = i // t_len, i % t_len
    h0 = hb * block_h
    start = start_ref[b]
    qpos = start + t
    live = t < qlen_ref[b]
    cdt = q_ref.dtype
    qc = [q_ref[i, pl.ds(h0, block_h), pl.ds(off, w)] for off, w, _ in chunks]
    scale = (sum(w for _, w, _ in chunks)) ** -0.5

    def step(carry, rows, valid, src):
        m, den, acc = carry
        kc = _load_chunks(src, rows, valid, chunks, nope_dim, cdt)
        sc = sum(jnp.dot(a, k.T, preferred_element_type=F32) for a, k in zip(qc, kc)) * scale
        sc = jnp.where(valid[None, :], sc, -jnp.inf)  # [bh, bk]
        m_new = jnp.maximum(m, jnp.max(sc, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(sc - m_new[:, None])
        den = den * alpha + jnp.sum(p, axis=1)
        pc = p.astype(cdt)
        acc = [a * alpha[:, None] + jnp.dot(pc, k, preferred_element_type=F32) for a, k in zip(acc, kc)]
        return m_new, den, acc

    lane = cm.iota((block_k,), 0)
    carry = (
        jnp.full((block_h,), NEG, F32),
        jnp.zeros((block_h,), F32),
        [jnp.zeros((block_h, w), F32) for _, w, _ in chunks],
    )

    def window_part(carry):
        slot = slot_ref[b]
        first = first_ref[b]  # ring rows below it do not exist (a replay's first position)

        def ring_tile(j, c):
            r = j * block_k + lane
            p = start - 1 - (start - 1 - r + window) % window
            valid = (r < window) & (p >= first) & (p > qpos - window) & live
            return step(c, slot * window + jnp.minimum(r, window - 1), valid, ring)

        c = lax.fori_loop(0, cm.cdiv(window, block_k), ring_tile, carry)
        lo = jnp.maximum(t - window + 1, 0) // block_k

        def chunk_tile(j, c):
            jj = j * block_k + lane
            valid = (jj <= t) & (jj > t - window) & (jj < t_len) & live
            return step(c, b * t_len + jnp.minimum(jj, t_len - 1), valid, kv_ref)

        return lax.fori_loop(lo, t // block_k + 1, chunk_tile, c)

    carry = lax.cond(s == 0, window_part, lambda c: c, carry)

    if mode != "swa":
        cap = n_blocks_max * e_per_block
        lo = s * tiles_per_split
        hi = jnp.minimum(lo + tiles_per_split, n_ctiles)
        if mode == "hca":
            visible = jnp.where(live, (qpos + 1) // ratio, 0)
            hi = jnp.minimum(hi, (visible + block_k - 1) // block_k)

        def comp_tile(j, c):
            if mode == "csa":
                e = idx_ref[i, pl.ds(j * block_k, block_k)]
                valid = (e >= 0) & (e < cap) & live
            else:
                e = j * block_k + lane
                valid = (e < visible) & (e < cap)
            ec = jnp.clip(e, 0, cap - 1)
            blk = bt_ref[b, ec // e_per_block]
            return step(c, blk * e_per_block + ec % e_per_block, valid, pool)

        carry = lax.fori_loop(lo, jnp.maximum(hi, lo), comp_tile, carry)

    m, den, acc = carry
    if finalize:
        (o_ref,) = outs
        sink = sink_ref[pl.ds(h0, block_h)]
        mx = jnp.maximum(m, sink)
        corr = jnp.exp(m - mx)
        inv = corr / (den * corr + jnp.exp(sink - mx))
        for (off, w, _), a in zip(chunks, acc):
            o_ref[i, pl.ds(h0, block_h), pl.ds(off, w)] = (a * inv[:, None]).astype(o_ref.dtype)
    else:
        o_ref, m_ref, l_ref = outs
        for (off, w, _), a in zip(chunks, acc):
            o_ref[s, i, pl.ds(h0, block_h), pl.ds(off, w)] = a
        m_ref[s, i, pl.ds(h0, block_h)] = m
        l_ref[s, i, pl.ds(h0, block_h)] = den


def _flat(rows, lead: int):
    """Merge the ``lead`` leading axes of every leaf: the kernel gathers flat rows."""
    return jax.tree.map(lambda x: x.reshape(-1, *x.shape[lead:]), rows)


def _refs_of(rows) -> list:
    return list(rows) if isinstance(rows, kv_format.Fp8Rows) else [rows]


@functools.partial(
    jax.jit,
    static_argnames=("ratio", "block_k", "block_h", "num_splits", "num_warps", "num_stages", "interpret"),
)
def sparse_attention(
    q: jax.Array,  # [B,T,H,K] roped queries (bf16 or f32)
    kv: jax.Array,  # [B,T,K] the chunk's own roped K=V rows
    ring: kv_format.KvRows,  # [num_slots, W, K] window rings (array or Fp8Rows)
    ring_slot: jax.Array,  # i32[B]
    pool: kv_format.KvRows | None,  # [num_blocks, E, K] compressed entries, or None (SWA-only)
    block_table: jax.Array | None,  # i32[B, max_blocks]
    topk: jax.Array | None,  # i32[B,T,k] CSA entry ids (−1 = none); None: HCA (ratio > 0)
    sink: jax.Array,  # f32[H]
    start: jax.Array,  # i32[B]
    q_lens: jax.Array,  # i32[B]
    *,
    state_start: jax.Array | None = None,  # i32[B] first position the ring holds (None: 0)
    ratio: int = 0,
    block_k: int = 32,
    block_h: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
    interpret: bool | None = None,
) -> jax.Array:  # [B,T,H,K] in q.dtype
    """Kernel version of :func:`sparse_attention_reference` (same data arguments).

    ``block_k`` rows per tile and ``block_h`` heads per program (powers of two ≥ 16; heads
    are zero-padded to ≥ 16 for the Triton dot; ``None``: at most 16K accumulator elements
    per program, 32 heads at K=512), ``num_splits`` programs per query over the compressed
    rows (``None``: enough programs to fill a GPU at small B·T). ``interpret``: ``None``
    picks interpret mode on a CPU backend. Untuned on GPU.
    """
    ring, pool = kv_format.logical(ring), kv_format.logical(pool)  # pools held as bits: a view
    validate_attention_args(
        q, kv, ring, ring_slot, pool, block_table, topk, sink, start, q_lens, ratio, state_start
    )
    state_start = jnp.zeros_like(start) if state_start is None else state_start
    for name, v in (("block_k", block_k), ("block_h", block_h or 16)):
        if not cm.is_pow2(v) or v < 16:
            raise ValueError(f"{name}={v} must be a power of two >= 16")
    b, t, h, k = q.shape
    window = ring.shape[1]
    fp8 = isinstance(ring, kv_format.Fp8Rows)
    chunks = _chunks(k, ring.rope_dim if fp8 else None)
    mode = "swa" if pool is None else ("csa" if topk is not None else "hca")

    hp = max(16, cm.next_pow2(h))
    bh = min(block_h or max(16, 16384 // cm.next_pow2(k)), hp)
    qp = jnp.pad(q, ((0, 0), (0, 0), (0, hp - h), (0, 0))).reshape(b * t, hp, k)
    sinkp = jnp.pad(sink.astype(F32), (0, hp - h))
    args = [qp, kv.reshape(b * t, k), ring_slot, start, q_lens, state_start, sinkp, *_refs_of(_flat(ring, 2))]
    e_per_block, n_blocks_max, n_ctiles = 1, 1, 0
    if mode != "swa":
        e_per_block, n_blocks_max = pool.shape[1], block_table.shape[1]
        args += [*_refs_of(_flat(pool, 2)), block_table]
        if mode == "csa":
            kpad = cm.cdiv(topk.shape[2], block_k) * block_k
            args.append(
                jnp.pad(topk, ((0, 0), (0, 0), (0, kpad - topk.shape[2])), constant_values=-1).reshape(
                    b * t, kpad
                )
            )
            n_ctiles = kpad // block_k
        else:
            n_ctiles = cm.cdiv(n_blocks_max * e_per_block, block_k)
    if num_splits is None:
        want = cm.cdiv(128, b * t * (hp // bh))
        num_splits = max(1, min(want, 16, cm.cdiv(n_ctiles, 4)))
    num_splits = max(1, min(num_splits, max(n_ctiles, 1)))
    tps = cm.cdiv(n_ctiles, num_splits) if n_ctiles else 0
    finalize = num_splits == 1
    if finalize:
        out_shape = [jax.ShapeDtypeStruct((b * t, hp, k), q.dtype)]
    else:
        out_shape = [
            jax.ShapeDtypeStruct((num_splits, b * t, hp, k), F32),
            jax.ShapeDtypeStruct((num_splits, b * t, hp), F32),
            jax.ShapeDtypeStruct((num_splits, b * t, hp), F32),
        ]
    body = functools.partial(
        _body,
        t_len=t,
        window=window,
        e_per_block=e_per_block,
        n_blocks_max=n_blocks_max,
        ratio=ratio,
        mode=mode,
        fp8=fp8,
        chunks=chunks,
        nope_dim=(k - ring.rope_dim) if fp8 else k,
        block_k=block_k,
        block_h=bh,
        tiles_per_split=tps,
        n_ctiles=n_ctiles,
        finalize=finalize,
    )
    warps = num_warps or (8 if bh * k >= 8192 else 4)
    outs = cm.call(
        body,
        grid=(b * t, num_splits, hp // bh),
        out_shape=out_shape,
        interpret=cm.resolve_interpret(interpret),
        num_warps=warps,
        num_stages=num_stages,
        name=f"sparse_attention_{mode}",
    )(*args)
    if finalize:
        o = outs[0]
    else:
        acc, m, den_s = outs
        mx = jnp.maximum(jnp.max(m, axis=0), sinkp[None, :])  # [BT,Hp]
        wgt = jnp.exp(m - mx[None])  # [S,BT,Hp]
        den = jnp.sum(wgt * den_s, axis=0) + jnp.exp(sinkp[None, :] - mx)
        o = (jnp.einsum("sbh,sbhk->bhk", wgt, acc) / den[..., None]).astype(q.dtype)
    return o.reshape(b, t, hp, k)[:, :, :h]
