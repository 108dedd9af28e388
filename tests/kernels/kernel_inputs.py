"""Random paged decode state for the kernel tests: dense per-sequence data scattered into
NaN-poisoned pools through shuffled block tables (STYLE.md §2.14), so a kernel that reads
an unused slot, the wrong block, or a ring row outside the window produces NaN or a
visible error. Plain data construction; the math under test lives in ``reference.py``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import kv_format


@dataclasses.dataclass
class AttentionCase:
    q: jax.Array
    kv: jax.Array
    ring: object
    ring_slot: jax.Array
    pool: object
    block_table: jax.Array | None
    topk: jax.Array | None
    sink: jax.Array
    start: jax.Array
    q_lens: jax.Array
    ratio: int
    entries: list  # dense f32 [n_b, K] compressed entries of each sequence, as written to the pool

    def args(self):
        return (
            self.q,
            self.kv,
            self.ring,
            self.ring_slot,
            self.pool,
            self.block_table,
            self.topk,
            self.sink,
            self.start,
            self.q_lens,
        )


def _rows(rng, shape, dtype):
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32), dtype)


def paged_pool(
    rng,
    entries: list[np.ndarray],
    e_per_block: int,
    fmt: str,
    dim: int,
    rope_dim: int,
    max_blocks: int,
    spare_blocks: int = 3,
):
    """Scatter each sequence's dense entries [n_b, dim] into a shuffled, NaN-poisoned pool.

    Returns (pool [num_blocks, E, dim], block_table i32[B, max_blocks]); unused table
    entries are −1 and unused pool rows stay NaN.
    """
    need = [-(-len(e) // e_per_block) for e in entries]
    num_blocks = sum(need) + spare_blocks
    perm = rng.permutation(num_blocks)
    table = np.full((len(entries), max_blocks), -1, np.int32)
    pool = kv_format.allocate_rows((num_blocks, e_per_block), fmt, dim, rope_dim, poison=True)
    at = 0
    blk, off, vals = [], [], []
    for b, e in enumerate(entries):
        if need[b] > max_blocks:
            raise ValueError(f"sequence {b} needs {need[b]} blocks > max_blocks={max_blocks}")
        table[b, : need[b]] = perm[at : at + need[b]]
        at += need[b]
        n = np.arange(len(e))
        blk.append(table[b, n // e_per_block])
        off.append(n % e_per_block)
        vals.append(np.asarray(e, np.float32).reshape(len(e), dim))
    if sum(map(len, vals)):
        pool = kv_format.write_rows(
            pool, (np.concatenate(blk), np.concatenate(off)), jnp.asarray(np.concatenate(vals))
        )
    return pool, jnp.asarray(table)


def attention_case(
    seed: int,
    *,
    mode: str,
    fmt: str,
    dtype,
    starts,
    q_lens,
    T: int,
    H: int = 4,
    K: int = 64,
    R: int = 16,
    W: int = 16,
    ratio: int = 4,
    E: int = 8,
    topk: int = 8,
    max_blocks: int = 8,
) -> AttentionCase:
    """Sequences at ``starts`` with chunks of ``q_lens`` (≤ T) tokens; CSA/HCA/SWA layer."""
    rng = np.random.default_rng(seed)
    B = len(starts)
    starts_np, qlens_np = np.asarray(starts, np.int32), np.asarray(q_lens, np.int32)
    num_slots = B + 2
    slots = rng.permutation(num_slots)[:B].astype(np.int32)
    ring = kv_format.allocate_rows((num_slots, W), fmt, K, R, poison=True)
    written = [np.arange(max(0, s - W), s) for s in starts_np]  # positions held before the chunk
    n_written = sum(map(len, written))
    if n_written:
        slot_of = np.concatenate([np.full(len(p), slots[b]) for b, p in enumerate(written)])
        rows = _rows(rng, (n_written, K), dtype)
        ring = kv_format.write_rows(ring, (slot_of, np.concatenate(written) % W), rows)
    q = _rows(rng, (B, T, H, K), dtype)
    kv = _rows(rng, (B, T, K), dtype)
    sink = jnp.asarray(rng.standard_normal(H).astype(np.float32))
    pool = table = idx = None
    dense = []
    if mode != "swa":
        n_ent = [(s + n) // ratio for s, n in zip(starts_np, qlens_np)]
        dense = [rng.standard_normal((n, K)).astype(np.float32) for n in n_ent]
        if dtype == jnp.bfloat16:
            dense = [np.asarray(jnp.asarray(d, jnp.bfloat16).astype(jnp.float32)) for d in dense]
        pool, table = paged_pool(rng, dense, E, fmt, K, R, max_blocks)
        if mode == "csa":
            ids = np.full((B, T, topk), -1, np.int32)
            for b in range(B):
                for t in range(qlens_np[b]):
                    vis = (starts_np[b] + t + 1) // ratio
                    pick = rng.permutation(vis)[: min(topk, vis)]
                    slots_t = rng.permutation(topk)[: len(pick)]  # −1 anywhere, not only at the tail
                    ids[b, t, slots_t] = pick
            idx = jnp.asarray(ids)
    return AttentionCase(
        q,
        kv,
        ring,
        jnp.asarray(slots),
        pool,
        table,
        idx,
        sink,
        jnp.asarray(starts_np),
        jnp.asarray(qlens_np),
        ratio,
        dense,
    )


@dataclasses.dataclass
class IndexerCase:
    q: jax.Array
    w: jax.Array
    keys: object
    block_table: jax.Array
    start: jax.Array
    q_lens: jax.Array
    ratio: int

    def args(self):
        return self.q, self.w, self.keys, self.block_table, self.start, self.q_lens


def indexer_case(
    seed: int,
    *,
    fmt: str,
    dtype,
    starts,
    q_lens,
    T: int,
    H: int = 16,
    D: int = 32,
    ratio: int = 4,
    E: int = 8,
    max_blocks: int = 8,
    duplicate_every: int = 0,
) -> IndexerCase:
    """Paged indexer keys in ``fmt`` ("bf16", "indexer_fp8", "indexer_fp4"). With
    ``duplicate_every`` = d, entry e copies entry e − (e mod d): exact score ties."""
    rng = np.random.default_rng(seed)
    starts_np, qlens_np = np.asarray(starts, np.int32), np.asarray(q_lens, np.int32)
    dense = []
    for s, n in zip(starts_np, qlens_np):
        k = rng.standard_normal(((s + n) // ratio, D)).astype(np.float32)
        if duplicate_every:
            k = k[np.arange(len(k)) - np.arange(len(k)) % duplicate_every]
        dense.append(k)
    keys, table = paged_pool(rng, dense, E, fmt, D, 0, max_blocks)
    q = _rows(rng, (len(starts), T, H, D), dtype)
    w = jnp.asarray(rng.standard_normal((len(starts), T, H)).astype(np.float32))
    return IndexerCase(q, w, keys, table, jnp.asarray(starts_np), jnp.asarray(qlens_np), ratio)
