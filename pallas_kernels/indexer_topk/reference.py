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

from pallas_kernels import kv_format

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


def paged_keys(keys, block_table: jax.Array) -> jax.Array:
    """Every key slot of each sequence, f32[B, max_blocks·E, D], in entry order."""
    e_per_block = keys.shape[1]
    cap = block_table.shape[1] * e_per_block
    ent = jnp.arange(cap)
    blk = block_table[:, ent // e_per_block]  # [B,C]
    return kv_format.dequantize_indexer_keys(kv_format.read_rows(keys, (blk, ent % e_per_block)))


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
    """Dense scores over every key slot, causal mask, ``lax.top_k``, −1 for invisible picks."""
    validate_indexer_args(q, w, kv_format.logical_shapes(keys), block_table, start, q_lens, ratio, topk)
    t = q.shape[1]
    kd = paged_keys(keys, block_table)  # [B,C,D]
    cap = kd.shape[1]
    kd = jnp.where(jnp.isnan(kd), 0.0, kd)  # unused (poisoned) slots are masked below anyway
    scores = index_scores_reference(q, w, kd)  # [B,T,C]
    pos = start[:, None] + jnp.arange(t)[None, :]
    visible = jnp.where(jnp.arange(t)[None, :] < q_lens[:, None], (pos + 1) // ratio, 0)  # [B,T]
    if cap < topk:
        scores = jnp.pad(scores, ((0, 0), (0, 0), (0, topk - cap)))
    ent = jnp.arange(scores.shape[-1])
    masked = jnp.where(ent[None, None, :] < visible[..., None], scores, -jnp.inf)
    val, idx = jax.lax.top_k(masked, topk)
    ok = idx < visible[..., None]
    return jnp.where(ok, idx, -1).astype(jnp.int32), jnp.where(ok, val, -jnp.inf)
