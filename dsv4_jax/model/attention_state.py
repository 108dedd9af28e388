"""Attention over the decode state: one layer for a chunk of T tokens per sequence
(prefill chunks and T = 1 decode are the same function; ARCHITECTURE.md §5.5).

Per layer, in order:
1. project q and the chunk's K=V rows (as the full forward does);
2. advance the compressor(s) over the chunk from their tails, write every completed
   entry into the paged pools (CSA: main + indexer keys; HCA: main);
3. read the sequence's compressed entries back through its block table (the entries
   this chunk just completed included) and, for CSA, pick top-k with the indexer;
4. attend over [old window rows from the ring ‖ the chunk's own rows ‖ compressed
   rows] with the sink (``sparse_attention``), then write the chunk's rows into the ring.

Rows that do not exist for the sequence (ring rows before ``state_start``, pool entries
past its length, padding tokens) are masked, and never read into a dot, so a stale or
poisoned slot can never leak into the output.

Speculative verification (``meta.commit`` < ``lengths``): the draft tokens past ``commit``
are attended to as chunk rows but write no ring row and no tail row. Compressed entries they
complete are written to the pools, because the chunk's later queries read them there; such an
entry sits at a position past the committed length, which no query of a later step reads
before the step that feeds that position again recomputes it from committed tokens (every
chunk rewrites the entries it completes). docs/ENGINE.md "MTP" has the whole argument.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from dsv4_jax.config import Config
from dsv4_jax.model import attention, choices, compressor, indexer
from dsv4_jax.model import state as kvc
from dsv4_jax.model.attention import Attention

F32 = jnp.float32


def _write_entries(
    pool, entries: compressor.ChunkEntries, block_table, cc: kvc.CacheConfig, ratio: int, enc, cached_until
):
    """Scatter completed entries into their (block, row); invalid ones, and entries of the
    shared cache (below ``cached_until``), are dropped."""
    per_block = cc.block_tokens // ratio
    logical = entries.index // per_block  # i32[B,n]
    ok = (
        entries.valid
        & (logical < block_table.shape[1])
        & ((entries.index + 1) * ratio > cached_until[:, None])
    )
    blk = jnp.take_along_axis(block_table, jnp.clip(logical, 0, block_table.shape[1] - 1), axis=1)
    blk = jnp.where(ok, blk, cc.num_blocks)  # out of range: dropped
    return kvc.put_rows(pool, (blk, entries.index % per_block), enc(entries.rows))


def ring_rows(lengths, commit):
    """How many leading tokens of each row write their K=V rows into the ring: the committed
    ones, never a draft under verification (module doc)."""
    del lengths
    return commit


def write_window(ring, kv_enc, slots, positions, commit, window: int):
    """Store the chunk's committed rows (the first ``commit`` i32[B] tokens) in the ring; only
    the last W of them, so indices are unique. A draft token's row never enters the ring: the
    j-th draft after the committed tokens (position n + j) would overwrite the row of position
    n + j − W, which the next step's first query (position n, window n − W + 1 .. n) still
    reads for every j ≥ 1 if the draft is rejected."""
    t = positions.shape[1]
    tok = jnp.arange(t)[None, :]
    keep = (tok < commit[:, None]) & (tok >= commit[:, None] - window)
    row = jnp.where(keep, positions % window, window)  # out of range: dropped
    return kvc.put_rows(ring, (jnp.broadcast_to(slots[:, None], row.shape), row), kv_enc)


def attention_chunk(
    x,
    positions,
    p: Attention,
    st: kvc.LayerState,
    meta: kvc.StepMeta,
    layer: int,
    cfg: Config,
    cc: kvc.CacheConfig,
    *,
    sim_quant: bool = False,
    kernels: pk.Impl = pk.REFERENCE,
):
    """One layer's attention for a chunk ``x`` [B,T,D] (normed): returns ([B,T,D], new layer state).

    The indexer top-k and the attention core are ``kernels``' (``pallas_kernels.Impl``): the
    Pallas kernels, or their jnp references, which are this path's CPU code and the kernels'
    spec. Both read the same pools through the block table.
    """
    kind = cfg.attn_kind(layer)
    compressed = kind != "swa"
    slots, bt, lengths = meta.slots, meta.block_table, meta.lengths
    start = positions[:, 0]
    zero = jnp.zeros_like(start)
    state_start = zero if meta.state_start is None else meta.state_start
    cached_until = zero if meta.cached_until is None else meta.cached_until
    commit = lengths if meta.commit is None else meta.commit
    c_q, q = attention.project_q(x, p, positions, cfg, compressed, sim_quant=sim_quant)
    kv = attention.project_kv(x, p, positions, cfg, compressed, sim_quant=sim_quant)
    new: dict = {}
    ratio = cfg.compress_ratio(layer)
    idx = None
    if compressed:
        with jax.named_scope("compressor"):
            tail = kvc.take_rows(st.tail, slots)
            ent, tail = compressor.compress_chunk(
                x,
                p.compressor,
                positions,
                lengths,
                tail,
                ratio,
                cfg,
                state_start=state_start,
                commit=commit,
                sim_quant=sim_quant,
            )
            new["tail"] = kvc.put_rows(st.tail, (slots,), _after(tail, ent))
            new["cmp"] = _write_entries(
                st.cmp, ent, bt, cc, ratio, lambda r: kvc.encode_main(r, cfg, cc), cached_until
            )
        if kind == "csa":
            with jax.named_scope("indexer"):
                ip = p.indexer
                itail = kvc.take_rows(st.itail, slots)
                ient, itail = compressor.compress_chunk(
                    x,
                    ip.compressor,
                    positions,
                    lengths,
                    itail,
                    ratio,
                    cfg,
                    state_start=state_start,
                    commit=commit,
                    indexer=True,
                    sim_quant=sim_quant,
                )
                new["itail"] = kvc.put_rows(st.itail, (slots,), _after(itail, ient))
                new["idx"] = _write_entries(
                    st.idx, ient, bt, cc, ratio, lambda r: kvc.encode_index(r, cc), cached_until
                )
                qi, wi = indexer.index_queries(x, c_q, positions, ip, cfg, sim_quant=sim_quant)
                # A sequence addresses at most max_blocks · block_tokens/ratio entries: picking more
                # would only add −1 columns, each gathered and attended over (8x the CSA work of a
                # short-context engine with the shipped top-k 512).
                topk = min(cfg.index_topk, bt.shape[1] * (cc.block_tokens // ratio))
                idx, _ = kernels.indexer_topk(
                    qi, wi, new["idx"], bt, start, lengths, ratio=ratio, topk=topk
                )  # i32[B,T,topk], −1: none
                idx = choices.pick("indexer", idx)
    with jax.named_scope("core"):
        o = kernels.sparse_attention(
            q,
            kv,
            st.window,
            slots,
            new.get("cmp"),
            bt if compressed else None,
            idx,
            p.attn_sink[...],
            start,
            lengths,
            state_start=state_start,
            ratio=ratio,
        )  # [B,T,H,K]
    out = attention.output_proj(o, p, positions, cfg, compressed, sim_quant=sim_quant)  # [B,T,D]
    new["window"] = write_window(
        st.window,
        kvc.encode_main(_after(kv, out), cfg, cc),
        slots,
        positions,
        ring_rows(lengths, commit),
        cfg.sliding_window,
    )
    return out, dataclasses.replace(st, **new)


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
    z = (
        sum(
            jnp.sum(jnp.nan_to_num(r.astype(jnp.float32)).reshape(r.shape[0], -1), axis=1)
            for r in jax.tree.leaves(reads)
        )
        * 0.0
    )  # f32[B], zeros
    return jax.tree.map(lambda a: a * (1.0 + z.reshape(-1, *[1] * (a.ndim - 1))).astype(a.dtype), rows)
