"""Attention over the decode state: one layer for a chunk of T tokens per sequence
(prefill chunks and T = 1 decode are the same function; ARCHITECTURE.md §5.5).

Per layer, in order:
1. project q and the chunk's K=V rows (as the full forward does);
2. advance the compressor(s) over the chunk from their tails, write every completed
   entry into the paged pools (CSA: main + indexer keys; HCA: main);
3. read the sequence's compressed entries back through its block table (the entries
   this chunk just completed included) and, for CSA, pick top-k with the indexer;
4. attend over [old window rows from the ring ‖ the chunk's own rows ‖ compressed
   rows] with the sink, then write the chunk's rows into the ring.

Rows that do not exist for the sequence (ring rows at negative positions, pool
entries past its length, padding tokens) are zeroed before use and masked, so a
stale or poisoned slot can never leak into the output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from dsv4_jax import attention, compressor, indexer
from dsv4_jax import kv_cache as kvc
from dsv4_jax.attention import Segment
from dsv4_jax.config import Config

F32 = jnp.float32


def _write_entries(pool, entries: compressor.ChunkEntries, block_table, cc: kvc.CacheConfig, ratio: int, enc,
                   cached_until):
    """Scatter completed entries into their (block, row); invalid ones, and entries of the
    shared cache (below ``cached_until``), are dropped."""
    per_block = cc.block_tokens // ratio
    logical = entries.index // per_block  # i32[B,n]
    ok = entries.valid & (logical < block_table.shape[1]) & ((entries.index + 1) * ratio > cached_until[:, None])
    blk = jnp.take_along_axis(block_table, jnp.clip(logical, 0, block_table.shape[1] - 1), axis=1)
    blk = jnp.where(ok, blk, cc.num_blocks)  # out of range: dropped
    return kvc.put_rows(pool, (blk, entries.index % per_block), enc(entries.rows))


def _read_entries(pool, block_table, dec, dtype) -> jax.Array:
    """Every entry slot of each sequence's blocks, in entry order: [B, max_blocks·per_block, Dc]."""
    rows = dec(kvc.take_rows(pool, block_table), dtype)  # [B,MB,per_block,Dc]
    return rows.reshape(rows.shape[0], -1, rows.shape[-1])


def _read_picked(pool, block_table, idx, dec, dtype) -> jax.Array:
    """The entries the indexer picked, and only those: [B,T,k,Dc], zero where idx < 0.

    Reading every entry of the sequence and then picking (``_read_entries``) makes a CSA
    step's cost grow with the context (all of its 4x-compressed rows each step); gathering
    the k picked rows by (block, row) reads the same k rows whatever the context (§5.3).
    """
    per_block = jax.tree.leaves(pool)[0].shape[1]  # pool leaves: [NB, block_tokens / ratio, ...]
    safe = jnp.maximum(idx, 0)  # i32[B,T,k] entry index in the sequence
    blk = jax.vmap(lambda t, i: jnp.take(t, i, mode="clip"))(block_table, safe // per_block)  # i32[B,T,k]
    flat = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), pool)  # [NB·per_block, ...]: a view
    rows = dec(kvc.take_rows(flat, blk * per_block + safe % per_block), dtype)  # [B,T,k,Dc]
    return _zero_missing(rows, idx >= 0)


def _zero_missing(rows: jax.Array, exists: jax.Array) -> jax.Array:
    return jnp.where(exists[..., None], rows, jnp.zeros((), rows.dtype))


def window_segments(kv, ring_rows, positions, lengths, window: int, state_start):
    """The ring's old rows and the chunk's own rows as two key segments (§5.1 window).

    Ring row j holds the latest position ≡ j (mod W) before the chunk's start; rows below
    ``state_start`` (negative positions, or before a replay's first token) do not exist.
    """
    start = positions[:, 0]
    j = jnp.arange(window)
    ring_pos = start[:, None] - 1 - jnp.mod(start[:, None] - 1 - j, window)  # i32[B,W]
    ring_exists = ring_pos >= state_start[:, None]
    ring_mask = ring_exists[:, None, :] & attention.window_mask(positions, ring_pos, window)
    t = kv.shape[1]
    chunk_exists = jnp.arange(t)[None, :] < lengths[:, None]  # bool[B,T]
    chunk_mask = chunk_exists[:, None, :] & attention.window_mask(positions, positions, window)
    return [Segment(_zero_missing(ring_rows, ring_exists), ring_mask),
            Segment(_zero_missing(kv, chunk_exists), chunk_mask)]


def write_window(ring, kv_enc, slots, positions, lengths, window: int):
    """Store the chunk's rows in the ring; only the last W valid tokens, so indices are unique."""
    t = positions.shape[1]
    tok = jnp.arange(t)[None, :]
    keep = (tok < lengths[:, None]) & (tok >= lengths[:, None] - window)
    row = jnp.where(keep, positions % window, window)  # out of range: dropped
    return kvc.put_rows(ring, (jnp.broadcast_to(slots[:, None], row.shape), row), kv_enc)


def attention_chunk(x, positions, p, st: dict, meta: kvc.StepMeta, layer: int, cfg: Config,
                    cc: kvc.CacheConfig, *, sim_quant: bool = False, kernels: str = "reference"):
    """One layer's attention for a chunk ``x`` [B,T,D] (normed): returns ([B,T,D], new layer state).

    ``kernels="pallas"`` runs the indexer top-k and the attention core as the Pallas
    kernels (interpret mode on CPU); ``"reference"`` as the jnp code here. Both read the
    same pools and produce the same result.
    """
    kind = cfg.attn_kind(layer)
    compressed = kind != "swa"
    dtype = x.dtype
    slots, bt, lengths = meta.slots, meta.block_table, meta.lengths
    start = positions[:, 0]
    end = start + lengths
    zero = jnp.zeros_like(start)
    state_start = zero if meta.state_start is None else meta.state_start
    cached_until = zero if meta.cached_until is None else meta.cached_until
    c_q, q = attention.project_q(x, p, positions, cfg, compressed, sim_quant=sim_quant)
    kv = attention.project_kv(x, p, positions, cfg, compressed, sim_quant=sim_quant)
    new = dict(st)
    ratio = cfg.compress_ratio(layer)
    idx = None
    if compressed:
        with jax.named_scope("compressor"):
            tail = kvc.take_rows(st["tail"], slots)
            ent, tail = compressor.compress_chunk(x, p["compressor"], positions, lengths, tail, ratio, cfg,
                                                  state_start=state_start, sim_quant=sim_quant)
            new["tail"] = kvc.put_rows(st["tail"], (slots,), _after(tail, ent))
            new["cmp"] = _write_entries(st["cmp"], ent, bt, cc, ratio, lambda r: kvc.encode_main(r, cfg, cc),
                                        cached_until)
        if kind == "csa":
            with jax.named_scope("indexer"):
                ip = p["indexer"]
                itail = kvc.take_rows(st["itail"], slots)
                ient, itail = compressor.compress_chunk(x, ip["compressor"], positions, lengths, itail, ratio, cfg,
                                                        state_start=state_start, indexer=True, sim_quant=sim_quant)
                new["itail"] = kvc.put_rows(st["itail"], (slots,), _after(itail, ient))
                new["idx"] = _write_entries(st["idx"], ient, bt, cc, ratio, lambda r: kvc.encode_index(r, cc),
                                            cached_until)
                qi, wi = indexer.index_queries(x, c_q, positions, ip, cfg, sim_quant=sim_quant)
                if kernels == "pallas":
                    idx, _ = pk.indexer_topk(qi, wi, kvc.logical(new["idx"]), bt, start, lengths, ratio=ratio,
                                             topk=cfg.index_topk)
                else:
                    keys = _read_entries(new["idx"], bt, kvc.decode_index, dtype)
                    n_ent = jnp.arange(keys.shape[1])
                    keys = _zero_missing(keys, n_ent[None, :] < (end // ratio)[:, None])
                    idx = indexer.select_topk(indexer.index_scores(qi, wi, keys), positions, ratio, cfg.index_topk)
    with jax.named_scope("core"):
        if kernels == "pallas":
            o = pk.sparse_attention(q, kv, kvc.logical(st["window"]), slots, kvc.logical(new.get("cmp")),
                                    bt if compressed else None, idx, p["attn_sink"], start, lengths, ratio=ratio)
        else:
            o = attention.attend(q, _reference_segments(q, kv, st, new, meta, positions, idx, kind, ratio, cfg,
                                                        state_start), p["attn_sink"])
    out = attention.output_proj(o, p, positions, cfg, compressed, sim_quant=sim_quant)  # [B,T,D]
    new["window"] = write_window(st["window"], kvc.encode_main(_after(kv, out), cfg, cc), slots, positions, lengths,
                                 cfg.sliding_window)
    return out, new


def _after(rows, *reads):
    """``rows`` unchanged (each batch row times exactly one), computed from every element of
    the same batch row of ``reads`` (leading axis = batch in both).

    The ring and the compressor tails are read (the slot's old rows) and written in the same
    step. Unless the written rows depend on everything computed from the read, XLA cannot
    order the reads before the scatter and keeps the old buffer alive by copying the whole
    store, every slot, every step (twice per leaf on XLA:CPU; on the mid benchmark model a
    large share of a decode step). An optimization barrier does not order them; a data
    dependency does. Reducing within each batch row keeps it local when rows are split over
    devices (the layer output it reads is whole on each tensor shard); ``nan_to_num`` keeps
    the factor exactly one when a read holds NaN or inf. tests/test_pool_inplace.py checks
    the compiled step."""
    z = sum(jnp.sum(jnp.nan_to_num(r.astype(jnp.float32)).reshape(r.shape[0], -1), axis=1)
            for r in jax.tree.leaves(reads)) * 0.0  # f32[B], zeros  # fmt: skip
    return jax.tree.map(lambda a: a * (1.0 + z.reshape(-1, *[1] * (a.ndim - 1))).astype(a.dtype), rows)


def _reference_segments(q, kv, st, new, meta, positions, idx, kind, ratio, cfg: Config, state_start):
    """Key segments of the jnp path: old ring rows, the chunk's rows, compressed rows."""
    dtype = q.dtype
    ring_rows = kvc.decode_main(kvc.take_rows(st["window"], meta.slots), dtype)  # [B,W,K]
    segments = window_segments(kv, ring_rows, positions, meta.lengths, cfg.sliding_window, state_start)
    if kind == "swa":
        return segments
    if kind == "csa":
        segments.append(Segment(_read_picked(new["cmp"], meta.block_table, idx, kvc.decode_main, dtype), idx >= 0))
        return segments
    entries = _read_entries(new["cmp"], meta.block_table, kvc.decode_main, dtype)  # [B,C,K]
    n_ent = jnp.arange(entries.shape[1])
    end = positions[:, 0] + meta.lengths
    entries = _zero_missing(entries, n_ent[None, :] < (end // ratio)[:, None])
    visible = (positions + 1) // ratio
    segments.append(Segment(entries, n_ent[None, None, :] < visible[..., None]))
    return segments
