"""Lightning-indexer scores + causal top-k over paged indexer keys: the pure-jnp
specification and the validators shared with the kernel (ARCHITECTURE.md §5.3).

For query ``t`` of sequence ``b`` at position ``p = start[b] + t`` and compressed entry
``e`` (key ``keys[block_table[b, e // E], e % E]``):
``I[t,e] = Σ_h w[t,h]·ReLU(q[t,h]·K[e])``, visible iff ``e < (p+1) // ratio``. The result
is the ``topk`` visible entries with the highest scores, ordered by score (ties: lower
entry first, as ``lax.top_k``), and −1 (score −inf) where fewer than ``topk`` are visible.
The output width is always ``topk``: unlike ``dsv4_jax.model.indexer.select_topk`` (``min(topk,
S)`` for a dense cache of S entries) a paged cache has no meaningful static S. Query rows
``t ≥ q_lens[b]`` (padding of a ragged chunk) return all −1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import kv_format, paging

F32 = jnp.float32


def validate_indexer_args(q, w, keys, block_table, start, q_lens, ratio: int, topk: int) -> None:
    """Trace-time shape checks shared by the kernel and the reference; errors name the argument."""
    if q.ndim != 4:
        raise ValueError(f"q: expected [B,T,Hi,D], got {tuple(q.shape)}")
    b, t, h, d = q.shape
    if tuple(w.shape) != (b, t, h):
        raise ValueError(f"w: expected [B,T,Hi]={[b, t, h]}, got {list(w.shape)}")
    shapes = [tuple(x.shape) for x in jax.tree.leaves(keys)]
    if len({s[:-1] for s in shapes}) != 1 or len(shapes[0]) != 3:
        raise ValueError(f"keys: expected [num_blocks, E, D] leaves with shared leading axes, got {shapes}")
    if keys.shape[-1] != d:
        raise ValueError(f"keys: dim {keys.shape[-1]} != q dim {d}")
    if isinstance(keys, kv_format.Fp4IndexerKeys) and d % 32:
        raise ValueError(f"keys: FP4 keys need D % 32 == 0, got {d}")
    for name, x, shape in (
        ("block_table", block_table, (b, block_table.shape[-1])),
        ("start", start, (b,)),
        ("q_lens", q_lens, (b,)),
    ):
        if tuple(x.shape) != shape or x.dtype != jnp.int32:
            raise ValueError(f"{name}: expected int32{list(shape)}, got {x.dtype}{list(x.shape)}")
    if block_table.ndim != 2:
        raise ValueError(f"block_table: expected int32[B, max_blocks], got {block_table.shape}")
    if ratio <= 0 or topk <= 0:
        raise ValueError(f"ratio={ratio} and topk={topk} must be positive")


def index_scores_reference(q: jax.Array, w: jax.Array, keys: jax.Array) -> jax.Array:
    """``Σ_h w·ReLU(q·K)``, f32[B,T,S], for dense keys [B,S,D]: the math of ``index_scores``."""
    s = jnp.einsum("bthd,bsd->bths", q, keys.astype(q.dtype), preferred_element_type=F32)
    return jnp.einsum("bths,bth->bts", jax.nn.relu(s), w.astype(F32))


@functools.partial(jax.jit, static_argnames=("ratio", "topk"))
def indexer_topk_reference(
    q: jax.Array,  # [B,T,Hi,D] indexer queries (roped; Hadamard + FP4 simulation done by caller)
    w: jax.Array,  # f32[B,T,Hi] head weights, already scaled by D^-½·Hi^-½
    keys: kv_format.IndexerKeys,  # [num_blocks, E, D] paged keys: array, Fp8IndexerKeys, Fp4IndexerKeys
    block_table: jax.Array,  # i32[B, max_blocks]
    start: jax.Array,  # i32[B] position of chunk token 0
    q_lens: jax.Array,  # i32[B] valid tokens of the chunk
    *,
    ratio: int,
    topk: int,
) -> tuple[jax.Array, jax.Array]:  # (i32[B,T,topk] entry ids, f32[B,T,topk] their scores)
    """Scores chunk by chunk of whole blocks (``paging``) with a running top-k, only up to
    the longest sequence's visible entries: memory flat in the table width, work following
    the real context. Merging ``[running ‖ chunk]`` keeps ``lax.top_k``'s lower-entry-first
    tie order (running entries are all earlier), so the result is the dense top-k's."""
    validate_indexer_args(q, w, kv_format.logical_shapes(keys), block_table, start, q_lens, ratio, topk)
    b, t, h, _ = q.shape
    e_per_block = keys.shape[1]
    pos = start[:, None] + jnp.arange(t)[None, :]
    visible = jnp.where(jnp.arange(t)[None, :] < q_lens[:, None], (pos + 1) // ratio, 0)  # i32[B,T]
    per_chunk = paging.chunk_blocks(e_per_block, block_table.shape[1], b * t * h)
    table = paging.padded_table(block_table, per_chunk)

    def body(i, carry):
        val, idx = carry  # f32[B,T,k], i32[B,T,k]
        rows, ent = paging.read_chunk(keys, table, i, per_chunk)  # [B,C,D], i32[C]
        kd = kv_format.dequantize_indexer_keys(rows)
        kd = jnp.where(jnp.isnan(kd), 0.0, kd)  # unused (poisoned) slots are masked below anyway
        s = index_scores_reference(q, w, kd)  # f32[B,T,C]
        s = jnp.where(ent[None, None, :] < visible[..., None], s, -jnp.inf)
        ids = jnp.broadcast_to(ent.astype(jnp.int32), s.shape)
        val, pick = jax.lax.top_k(jnp.concatenate([val, s], -1), topk)
        return val, jnp.take_along_axis(jnp.concatenate([idx, ids], -1), pick, -1)

    init = (jnp.full((b, t, topk), -jnp.inf, F32), jnp.full((b, t, topk), -1, jnp.int32))
    val, idx = jax.lax.fori_loop(0, paging.num_chunks(visible, e_per_block, per_chunk), body, init)
    ok = jnp.isfinite(val)
    return jnp.where(ok, idx, -1), jnp.where(ok, val, -jnp.inf)
