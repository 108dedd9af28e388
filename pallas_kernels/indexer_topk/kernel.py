"""Lightning-indexer scores + exact streaming top-k as a Pallas (Triton) kernel
(ARCHITECTURE.md §5.3; why it matters: SERVING.md §3, the indexer scan is ~88% of the
attention-state bytes a decode step reads at 1M context).

Grid ``(B·T, num_splits)``. Program ``(i, s)`` owns query ``i = b·T + t`` and the entry
range ``[s·n, (s+1)·n)`` (``n = split_entries``, a power of two ≥ topk). It streams that
range in tiles of ``block_k`` keys gathered through the block table (masked loads: keys
past the causal limit or in unused slots are never fetched), dequantizes FP8/FP4 keys in
registers, and keeps the range's n scores in registers only: no score row ever goes to
memory. It then selects the range's exact top-k in registers:

1. scores → order-preserving int32 keys; the k-th largest key is found bit by bit (32
   counting passes over the n registers, no sort network: Triton has none);
2. everything above it plus the lowest-index ties at it are taken (exactly k entries);
3. an exclusive prefix sum gives each taken entry its output slot; a masked scatter
   writes ``(score, entry)`` pairs. Untaken lanes aim at slot k, out of bounds: masked
   GPU lanes do not store, and the interpreter drops out-of-bounds scatter updates, so
   no untaken lane can alias a taken one.

A jnp epilogue sorts the ``num_splits·k`` candidates of each query by (score desc,
entry asc) and keeps k, which is exact because every global top-k entry is in its own
range's top-k; the candidates are ``topk/split_entries`` of the score row. Every grid axis
is parallel (TOOLCHAIN.md §4).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import _common as cm
from pallas_kernels import kv_format, paging
from pallas_kernels.indexer_topk.reference import validate_indexer_args

F32 = jnp.float32
I32 = jnp.int32
INT_MIN = -(2**31)


def _load_keys(keys_refs, fmt: str, rows, valid, dim: int, cdt):
    """A tile of ``len(rows)`` keys → [bk, dim] in the compute dtype (0 where invalid)."""
    if fmt == "bf16":
        return cm.gather_rows(keys_refs[0], rows, valid, 0, dim).astype(cdt)
    if fmt == "indexer_fp8":
        vals_ref, scale_ref = keys_refs
        sc = cm.gather_cols(scale_ref, rows, valid, jnp.zeros((1,), I32))  # f32[bk,1]
        return (cm.gather_rows(vals_ref, rows, valid, 0, dim).astype(F32) * sc).astype(cdt)
    packed_ref, scale_ref = keys_refs
    sc = cm.e8m0_to_f32(cm.gather_cols(scale_ref, rows, valid, cm.iota((dim,), 0) // 32))  # [bk,dim]
    return (cm.unpack_fp4_tile(cm.gather_rows(packed_ref, rows, valid, 0, dim // 2)) * sc).astype(cdt)


def _exclusive_cumsum(x: jax.Array) -> jax.Array:
    """Row-major exclusive prefix sum of an int [R, C] array (two 1-axis scans)."""
    inclusive = jnp.cumsum(x, axis=1)
    row_tot = jnp.sum(x, axis=1)
    return inclusive - x + (jnp.cumsum(row_tot, axis=0) - row_tot)[:, None]


def _body(
    q_ref,
    w_ref,
    bt_ref,
    start_ref,
    qlen_ref,
    *refs,
    fmt,
    t_len,
    ratio,
    topk,
    e_per_block,
    cap,
    block_k,
    split_entries,
):
    *keys_refs, val_ref, idx_ref = refs
    i, s = pl.program_id(0), pl.program_id(1)
    b, t = i // t_len, i % t_len
    qpos = start_ref[b] + t
    visible = jnp.where(t < qlen_ref[b], (qpos + 1) // ratio, 0)
    q = q_ref[i, :, :]  # [Hp, D]
    w = w_ref[i, :]  # f32[Hp]
    dim = q.shape[1]
    n_rows = split_entries // block_k
    base = s * split_entries
    lane = cm.iota((block_k,), 0)
    row_id = cm.iota((n_rows, block_k), 0)

    def tile(j, scores):
        e = base + j * block_k + lane
        valid = (e < visible) & (e < cap)
        ec = jnp.clip(e, 0, cap - 1)
        rows = bt_ref[b, ec // e_per_block] * e_per_block + ec % e_per_block
        k = _load_keys(keys_refs, fmt, rows, valid, dim, q.dtype)
        sc = jnp.dot(q, k.T, preferred_element_type=F32)  # [Hp, bk]
        row = jnp.sum(jnp.maximum(sc, 0.0) * w[:, None], axis=0)  # [bk]
        row = jnp.where(valid, jnp.where(row == 0.0, 0.0, row), -jnp.inf)  # −0 → +0: one key per value
        return jnp.where(row_id == j, row[None, :], scores)

    n_tiles = jnp.clip((visible - base + block_k - 1) // block_k, 0, n_rows)
    scores = lax.fori_loop(0, n_tiles, tile, jnp.full((n_rows, block_k), -jnp.inf, F32))

    bits = lax.bitcast_convert_type(scores, I32)
    key = jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # signed order == float order

    def bit_step(j, acc):  # greedy: largest offset-binary threshold with count(key >= thr) >= topk
        cand = acc | (jnp.asarray(1, I32) << (31 - j))
        cnt = jnp.sum((key >= (cand ^ INT_MIN)).astype(I32))
        return jnp.where(cnt >= topk, cand, acc)

    thr = lax.fori_loop(0, 32, bit_step, jnp.asarray(0, I32)) ^ INT_MIN
    above = key > thr
    ties = (key == thr).astype(I32)
    need = topk - jnp.sum(above.astype(I32))
    take = above | ((ties == 1) & (_exclusive_cumsum(ties) < need))
    slot = jnp.where(take, _exclusive_cumsum(take.astype(I32)), topk)
    ii = jnp.full(slot.shape, i, I32)
    ss = jnp.full(slot.shape, s, I32)
    plt.store(val_ref.at[ii, ss, slot], scores, mask=take)
    plt.store(idx_ref.at[ii, ss, slot], base + row_id * block_k + lane[None, :], mask=take)


MAX_SPLITS_PER_CALL = 16  # beyond this, splits run in groups merged by a running top-k


@functools.partial(
    jax.jit,
    static_argnames=("ratio", "topk", "block_k", "split_entries", "num_warps", "num_stages", "interpret"),
)
def indexer_topk(
    q: jax.Array,  # [B,T,Hi,D] indexer queries (bf16 or f32)
    w: jax.Array,  # f32[B,T,Hi] head weights
    keys: kv_format.IndexerKeys,  # [num_blocks, E, D] paged keys (array / Fp8IndexerKeys / Fp4IndexerKeys)
    block_table: jax.Array,  # i32[B, max_blocks]
    start: jax.Array,  # i32[B]
    q_lens: jax.Array,  # i32[B]
    *,
    ratio: int,
    topk: int,
    block_k: int = 128,
    split_entries: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:  # (i32[B,T,topk], f32[B,T,topk])
    """Kernel version of :func:`indexer_topk_reference` (same data arguments and outputs).

    ``split_entries`` (power of two ≥ topk, multiple of ``block_k``) is the entry range of
    one program; ``None`` picks ``max(pow2 ≥ topk, min(4096, pow2 ≥ capacity))``.

    A table wider than ``MAX_SPLITS_PER_CALL`` splits runs as a loop over groups of that many
    splits (a sub-table each, positions shifted so the kernel's causal limit stays exact), up to
    the batch's longest visible entry only, each group's top-k merged into a running top-k
    (``paging``'s scheme): the candidates the epilogue sorts, and the reads, no longer grow
    with the table's width (1M tokens: 64 splits of 4096).
    """
    keys = kv_format.logical(keys)  # keys held as bits: a view
    validate_indexer_args(q, w, keys, block_table, start, q_lens, ratio, topk)
    e_per_block = keys.shape[1]
    cap = block_table.shape[1] * e_per_block
    if split_entries is None:
        split_entries = max(cm.next_pow2(topk), min(4096, cm.next_pow2(cap)), block_k)
    if not (cm.is_pow2(block_k) and cm.is_pow2(split_entries) and split_entries >= max(topk, block_k)):
        raise ValueError(
            f"block_k={block_k} and split_entries={split_entries} must be powers of two "
            f"with split_entries >= max(topk={topk}, block_k)"
        )
    kw = dict(
        ratio=ratio,
        topk=topk,
        block_k=block_k,
        split_entries=split_entries,
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
    )
    group = MAX_SPLITS_PER_CALL * split_entries  # entries per call
    if cap <= group or group % e_per_block:
        return _splits_topk(q, w, keys, block_table, start, q_lens, **kw)
    per_group = group // e_per_block
    table = paging.padded_table(block_table, per_group)
    visible = (start + q_lens) // ratio  # i32[B]: entries any query of the row can see
    b, t = q.shape[:2]

    def body(g, carry):
        val, idx = carry
        sub = lax.dynamic_slice_in_dim(table, g * per_group, per_group, axis=1)
        off = g * group
        i, v = _splits_topk(q, w, keys, sub, start - off * ratio, q_lens, **kw)
        i = jnp.where(i >= 0, i + off, -1)
        val, pick = lax.top_k(jnp.concatenate([val, v], -1), topk)  # running first: lower ids win ties
        return val, jnp.take_along_axis(jnp.concatenate([idx, i], -1), pick, -1)

    init = (jnp.full((b, t, topk), -jnp.inf, F32), jnp.full((b, t, topk), -1, I32))
    val, idx = lax.fori_loop(0, paging.num_chunks(visible, e_per_block, per_group), body, init)
    return jnp.where(val == -jnp.inf, -1, idx).astype(I32), val


def _splits_topk(q, w, keys, block_table, start, q_lens, *, ratio, topk, block_k, split_entries, **launch):
    """One launch over every split of ``block_table``, then the epilogue's exact merge."""
    b, t, h, d = q.shape
    e_per_block = keys.shape[1]
    cap = block_table.shape[1] * e_per_block
    num_splits = cm.cdiv(cap, split_entries)
    hp = max(16, cm.next_pow2(h))
    qp = jnp.pad(q, ((0, 0), (0, 0), (0, hp - h), (0, 0))).reshape(b * t, hp, d)
    wp = jnp.pad(w.astype(F32), ((0, 0), (0, 0), (0, hp - h))).reshape(b * t, hp)
    fmt = kv_format.format_of(keys)
    leaves = [x.reshape(-1, x.shape[-1]) for x in jax.tree.leaves(keys)]
    out_shape = [
        jax.ShapeDtypeStruct((b * t, num_splits, topk), F32),
        jax.ShapeDtypeStruct((b * t, num_splits, topk), I32),
    ]
    body = functools.partial(
        _body,
        fmt=fmt,
        t_len=t,
        ratio=ratio,
        topk=topk,
        e_per_block=e_per_block,
        cap=cap,
        block_k=block_k,
        split_entries=split_entries,
    )
    vals, ids = cm.call(
        body,
        grid=(b * t, num_splits),
        out_shape=out_shape,
        interpret=cm.resolve_interpret(launch["interpret"]),
        num_warps=launch["num_warps"],
        num_stages=launch["num_stages"],
        name=f"indexer_topk_{fmt}",
    )(qp, wp, block_table, start, q_lens, *leaves)
    vals = vals.reshape(b, t, num_splits * topk)
    ids = ids.reshape(b, t, num_splits * topk)
    neg, ids = lax.sort((-vals, ids), dimension=-1, num_keys=2)
    vals, ids = -neg[..., :topk], ids[..., :topk]
    return jnp.where(vals == -jnp.inf, -1, ids).astype(I32), vals
