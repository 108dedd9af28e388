"""Streaming a sequence's paged entries in fixed-size chunks, up to its real length.

The references (``*_reference``: the model's CPU path) read compressed entries the way the
kernels do: a chunk of whole blocks at a time, through the block table, for only as many
chunks as the longest sequence of the batch has entries. Two properties follow, both
required of every path (docs/KERNELS.md "Memory at long context"):

* no intermediate grows with ``max_model_len``: a chunk's temporaries are sized by a fixed
  element budget, whatever the block table's width (1M-token tables included);
* a step's reads and work follow each batch's real context, not the table's capacity: a
  1K-token sequence costs the same under ``max_model_len`` 4096 or 1M.

The trip count is dynamic (a ``while`` loop), so one compiled step serves every length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import kv_format

# Elements of the widest per-chunk temporary (scores or logits, f32): 4M elements, 16 MiB.
CHUNK_ELEMENTS = 1 << 22
MAX_CHUNK_ENTRIES = 512  # more only adds masked work to short sequences


def chunk_blocks(e_per_block: int, max_blocks: int, per_entry: int) -> int:
    """Blocks per chunk: the most whose ``per_entry``-element temporaries fit the budget,
    at most ``MAX_CHUNK_ENTRIES`` entries, at least one block, at most the table."""
    entries = max(1, min(CHUNK_ELEMENTS // max(per_entry, 1), MAX_CHUNK_ENTRIES))
    return max(1, min(entries // e_per_block, max_blocks))


def query_tile(t: int, per_query: int) -> int:
    """Queries per tile: the largest power-of-two divisor of ``t`` (halving from ``t``) whose tile
    of ``per_query`` elements per query fits 4× the budget. A prefill chunk's attention holds,
    per query, its logits over [ring ‖ chunk ‖ CSA picks] and the CSA rows it gathers: at Flash
    widths and an 8K chunk, 17 GB of chunk logits alone if untiled."""
    tq = t
    while tq > 1 and tq % 2 == 0 and tq * per_query > CHUNK_ELEMENTS * 4:
        tq //= 2
    return tq


def padded_table(block_table: jax.Array, per_chunk: int) -> jax.Array:
    """i32[B, n·per_chunk]: the table padded to whole chunks (padding entries are never visible)."""
    pad = -block_table.shape[1] % per_chunk
    return jnp.pad(block_table, ((0, 0), (0, pad))) if pad else block_table


def read_chunk(pool, table: jax.Array, i, per_chunk: int):
    """Chunk ``i`` of every sequence: (rows [B, C, ...] as stored, entry ids i32[C]),
    ``C = per_chunk · E``; ``table`` from :func:`padded_table`."""
    e_per_block = pool.shape[1]
    blk = jax.lax.dynamic_slice_in_dim(table, i * per_chunk, per_chunk, axis=1)  # i32[B,G]
    local = jnp.arange(per_chunk * e_per_block)
    rows = kv_format.read_rows(pool, (blk[:, local // e_per_block], local % e_per_block))  # [B,C,...]
    return rows, i * per_chunk * e_per_block + local


def num_chunks(visible_max: jax.Array, e_per_block: int, per_chunk: int) -> jax.Array:
    """Chunks that hold the first ``visible_max`` entries (dynamic, i32[])."""
    per = per_chunk * e_per_block
    return (jnp.max(visible_max) + per - 1) // per
