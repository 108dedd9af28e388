"""MXFP4 grouped (per-expert) matmul as a Pallas (Triton) kernel, with the gate/up pair
fused with the clamped SwiGLU (ARCHITECTURE.md §6, §8).

Why (SERVING.md §3): at batch 1 a decode step reads ~3.45 GB of MXFP4 routed-expert
weights, a third of all bytes. The kernel therefore reads each touched expert's packed
nibbles and UE8M0 scales once per output tile (4.25 bit/param), expands them to the
activation dtype in registers (nibble decode + ``tt.join`` interleave + scale
broadcast) and never writes a dequantized weight; experts no token chose cost nothing.

Tiling (megablox-style, with the schedule as an ordinary input instead of scalar
prefetch, TOOLCHAIN.md §4): the rows are cut into tiles of ``block_m`` rows that never
straddle two experts. A jnp prologue turns ``group_sizes`` into a table ``i32[4,
max_tiles]`` of (expert, first row, end row, number of K steps); the static bound
``max_tiles = cdiv(M, block_m) + min(E, M) + 1`` covers every grouping, and unused table
entries (and the zero-filled padding rows past ``sum(group_sizes)``) do no K steps.
Grid ``(max_tiles, out/block_n)``, K reduced inside the program, rows written with a
masked store, so every grid axis is parallel and no two programs write the same row.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import _common as cm
from pallas_kernels import mxfp4
from pallas_kernels.mxfp4_matmul.reference import sort_by_expert, validate_grouped_args, validate_moe_args

F32 = jnp.float32
I32 = jnp.int32


def tile_schedule(group_sizes: jax.Array, m: int, block_m: int, k_steps: int) -> jax.Array:
    """i32[4, max_tiles]: per tile (expert, row start, row end, K steps); see module doc."""
    e = group_sizes.shape[0]
    max_tiles = cm.cdiv(m, block_m) + min(e, m) + 1
    sizes = group_sizes.astype(I32)
    ends = jnp.cumsum(sizes)
    total = ends[-1]
    row_start = jnp.concatenate([ends - sizes, total[None]])  # E groups + the zero tail
    row_end = jnp.concatenate([ends, jnp.full((1,), m, I32)])
    counts = (row_end - row_start + block_m - 1) // block_m
    tile_end = jnp.cumsum(counts)
    j = jnp.arange(max_tiles, dtype=I32)
    g = jnp.searchsorted(tile_end, j, side="right").astype(I32)  # E: tail; E+1: unused
    gc = jnp.minimum(g, e)
    r0 = row_start[gc] + (j - (tile_end[gc] - counts[gc])) * block_m
    r1 = jnp.minimum(r0 + block_m, row_end[gc])
    used = g <= e
    return jnp.stack(
        [jnp.minimum(g, e - 1), jnp.where(used, r0, 0), jnp.where(used, r1, 0), jnp.where(g < e, k_steps, 0)]
    )


def _body(meta_ref, x_ref, *refs, fused, limit, m_rows, block_m, block_n, block_k):
    if fused:
        p1_ref, s1_ref, p3_ref, s3_ref, rw_ref, o_ref = refs
        streams = ((p1_ref, s1_ref), (p3_ref, s3_ref))
    else:
        p1_ref, s1_ref, o_ref = refs
        streams = ((p1_ref, s1_ref),)
    j, nb = pl.program_id(0), pl.program_id(1)
    g, r0, r1, k_steps = meta_ref[0, j], meta_ref[1, j], meta_ref[2, j], meta_ref[3, j]
    n0 = nb * block_n
    out_rows = r0 + cm.iota((block_m,), 0)  # distinct; masked lanes past M are dropped, never clamped
    valid = out_rows < r1
    rows = jnp.minimum(out_rows, m_rows - 1)  # load addresses
    cdt = x_ref.dtype

    def kstep(kk, accs):
        xk = cm.gather_rows(x_ref, rows, valid, kk * block_k, block_k)  # [bm, bk]
        out = []
        for (p_ref, s_ref), acc in zip(streams, accs):
            packed = p_ref[g, pl.ds(n0, block_n), pl.ds(kk * (block_k // 2), block_k // 2)]
            sc = s_ref[g, pl.ds(n0, block_n), pl.ds(kk * (block_k // 32), block_k // 32)]
            wt = cm.unpack_fp4_tile(packed) * cm.repeat_cols(cm.e8m0_to_f32(sc), 32)  # [bn, bk]
            out.append(acc + jnp.dot(xk, wt.astype(cdt).T, preferred_element_type=F32))
        return tuple(out)

    accs = lax.fori_loop(0, k_steps, kstep, tuple(jnp.zeros((block_m, block_n), F32) for _ in streams))
    if fused:
        gate, up = accs
        gate = jnp.minimum(gate, limit)
        rw = plt.load(rw_ref.at[rows], mask=valid, other=0.0)
        y = gate * jax.nn.sigmoid(gate) * jnp.clip(up, -limit, limit) * rw[:, None]
    else:
        (y,) = accs
    r2 = jnp.broadcast_to(out_rows[:, None], (block_m, block_n))
    c2 = n0 + cm.iota((block_m, block_n), 1)
    plt.store(o_ref.at[r2, c2], y.astype(o_ref.dtype), mask=jnp.broadcast_to(valid[:, None], r2.shape))


def _check_blocks(x, w: mxfp4.Mxfp4Weight, block_m, block_n, block_k) -> tuple[int, int]:
    n, kdim = w.shape[1], w.shape[2]
    for name, v, lo in (("block_m", block_m, 16), ("block_n", block_n, 16), ("block_k", block_k, 32)):
        if not cm.is_pow2(v) or v < lo:
            raise ValueError(f"{name}={v} must be a power of two >= {lo}")
    if n % block_n or kdim % block_k:
        raise ValueError(f"w: out={n} must divide by block_n={block_n} and in={kdim} by block_k={block_k}")
    return n, kdim


def _grouped(
    x,
    streams,
    group_sizes,
    row_weights,
    *,
    limit,
    out_dtype,
    block_m,
    block_n,
    block_k,
    num_warps,
    num_stages,
    interpret,
    name,
):
    m = x.shape[0]
    # tiles no larger than the matrix (small test models); a larger tile would only be masked
    block_n, block_k = min(block_n, streams[0].shape[1]), min(block_k, streams[0].shape[2])
    n, kdim = _check_blocks(x, streams[0], block_m, block_n, block_k)
    meta = tile_schedule(group_sizes, m, block_m, kdim // block_k)
    args = [meta, x]
    for w in streams:
        args += [w.packed, w.scale]
    fused = row_weights is not None
    if fused:
        args.append(row_weights.astype(F32))
    body = functools.partial(
        _body, fused=fused, limit=limit, m_rows=m, block_m=block_m, block_n=block_n, block_k=block_k
    )
    (out,) = cm.call(
        body,
        grid=(meta.shape[1], n // block_n),
        out_shape=[jax.ShapeDtypeStruct((m, n), out_dtype)],
        interpret=cm.resolve_interpret(interpret),
        num_warps=num_warps,
        num_stages=num_stages,
        name=name,
    )(*args)
    return out


_TUNING = ("block_m", "block_n", "block_k", "num_warps", "num_stages", "interpret")


@functools.partial(jax.jit, static_argnames=_TUNING)
def mxfp4_grouped_matmul(
    x: jax.Array,  # [M, in] rows sorted by expert
    w: mxfp4.Mxfp4Weight,  # packed [E, out, in]
    group_sizes: jax.Array,  # i32[E]
    *,
    block_m: int = 16,
    block_n: int = 64,
    block_k: int = 256,
    num_warps: int = 4,
    num_stages: int = 3,
    interpret: bool | None = None,
) -> jax.Array:  # f32[M, out]
    """Kernel version of :func:`mxfp4_grouped_matmul_reference` (the down projection)."""
    validate_grouped_args(x, w, group_sizes)
    return _grouped(
        x,
        (w,),
        group_sizes,
        None,
        limit=0.0,
        out_dtype=F32,
        block_m=block_m,
        block_n=block_n,
        block_k=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        name="mxfp4_grouped_matmul",
    )


@functools.partial(jax.jit, static_argnames=("limit",) + _TUNING)
def mxfp4_swiglu(
    x: jax.Array,  # [M, D] rows sorted by expert
    w1: mxfp4.Mxfp4Weight,  # gate, packed [E, F, D]
    w3: mxfp4.Mxfp4Weight,  # up, packed [E, F, D]
    group_sizes: jax.Array,  # i32[E]
    row_weights: jax.Array,  # f32[M]
    *,
    limit: float,
    block_m: int = 16,
    block_n: int = 64,
    block_k: int = 256,
    num_warps: int = 4,
    num_stages: int = 3,
    interpret: bool | None = None,
) -> jax.Array:  # [M, F] in x.dtype
    """Kernel version of :func:`mxfp4_swiglu_reference`: both weight streams per tile, one pass over x."""
    validate_grouped_args(x, w1, group_sizes)
    validate_grouped_args(x, w3, group_sizes)
    if tuple(row_weights.shape) != (x.shape[0],):
        raise ValueError(f"row_weights: expected [M={x.shape[0]}], got {list(row_weights.shape)}")
    return _grouped(
        x,
        (w1, w3),
        group_sizes,
        row_weights,
        limit=float(limit),
        out_dtype=x.dtype,
        block_m=block_m,
        block_n=block_n,
        block_k=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        name="mxfp4_swiglu",
    )


@functools.partial(jax.jit, static_argnames=("limit",) + _TUNING)
def moe_experts(
    x: jax.Array,  # [N, D] normed tokens
    idx: jax.Array,  # i32[N, k] chosen experts
    weights: jax.Array,  # f32[N, k] routing weights
    w1: mxfp4.Mxfp4Weight,  # [E, F, D]
    w2: mxfp4.Mxfp4Weight,  # [E, D, F]
    w3: mxfp4.Mxfp4Weight,  # [E, F, D]
    *,
    limit: float,
    block_m: int = 16,
    block_n: int = 64,
    block_k: int = 256,
    num_warps: int = 4,
    num_stages: int = 3,
    interpret: bool | None = None,
) -> jax.Array:  # f32[N, D]
    """Kernel version of :func:`moe_experts_reference`: sort, fused gate/up, down, scatter-add."""
    validate_moe_args(x, idx, weights, w1, w2, w3)
    tune = dict(
        block_m=block_m,
        block_n=block_n,
        block_k=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
    )
    order, tok, sizes = sort_by_expert(idx, w1.packed.shape[0])
    h = mxfp4_swiglu(x[tok], w1, w3, sizes, weights.reshape(-1)[order], limit=limit, **tune)
    y = mxfp4_grouped_matmul(h, w2, sizes, **tune)
    return jnp.zeros((x.shape[0], y.shape[1]), F32).at[tok].add(y)
