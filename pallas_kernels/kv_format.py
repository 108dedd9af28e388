"""Byte formats of the decode state's rows, with jnp codecs and byte accounting
(ARCHITECTURE.md §10.1, SERVING.md §1.1 and §3).

Main KV rows (window ring and compressed pools; one 512-dim K=V row per entry):

- ``"bf16"``: a plain ``bfloat16[..., K]`` array, 1024 B per row at K=512.
- ``"fp8_ds_mla"`` (vLLM-style, :class:`Fp8Rows`): the ``K−R`` non-RoPE ("nope") dims as
  e4m3 with one UE8M0 scale per 64 of them, the ``R`` RoPE dims kept in bf16, the scale
  bytes zero-padded to a multiple of 8: 448 + 128 + 8 = **584 B** at K=512, R=64. A
  trailing partial scale block (tiny test widths, e.g. nope 48) is quantized as if
  zero-padded to 64.

Lightning-indexer key rows (one D=128 key per CSA entry; §5.3):

- ``"bf16"``: plain ``bfloat16[..., D]``, 256 B.
- ``"fp8"`` (:class:`Fp8IndexerKeys`): e4m3 values plus one fp32 scale per row, 132 B.
- ``"fp4"`` (:class:`Fp4IndexerKeys`): packed e2m1 (low nibble first) plus one UE8M0 scale
  per 32 dims, 64 + 4 = **68 B**; the layout of ``mxfp4``.

Scales are powers of two chosen exactly as the model's QAT simulations choose them
(``fp8_sim``: amax/448 with amax ≥ 1e-4; ``fp4_sim``: amax/6), so rows the model has
already rounded (``fp8_sim_nope`` KV, ``fp4_sim`` indexer keys) round-trip exactly. Every
format is a pytree whose leaves share the leading (row-index) axes, so ``jax.tree.map``
slices, gathers and scatters all of its arrays together (see :func:`write_rows`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import mxfp4

F32 = jnp.float32
KV_SCALE_BLOCK = 64  # nope dims per UE8M0 scale in "fp8_ds_mla"
FP8_MAX = 448.0
_FP8_MIN_AMAX = 1e-4  # as dsv4_jax.model.ops.fp8_sim


class Fp8Rows(NamedTuple):
    """Main KV rows in the "fp8_ds_mla" format (584 B per 512-dim row)."""

    nope: jax.Array  # float8_e4m3fn[..., K−R]
    rope: jax.Array  # bfloat16[..., R]
    scale: jax.Array  # uint8[..., round_up(ceil((K−R)/64), 8)], e8m0 bytes; padding bytes 0

    @property
    def head_dim(self) -> int:
        return self.nope.shape[-1] + self.rope.shape[-1]

    @property
    def rope_dim(self) -> int:
        return self.rope.shape[-1]

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical shape ``[..., K]``, as for a dense row array."""
        return (*self.nope.shape[:-1], self.head_dim)


class Fp8IndexerKeys(NamedTuple):
    """Indexer keys as e4m3 plus one fp32 scale per row (132 B per 128-dim key)."""

    values: jax.Array  # float8_e4m3fn[..., D]
    scale: jax.Array  # float32[..., 1], a power of two

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape


class Fp4IndexerKeys(NamedTuple):
    """Indexer keys as MXFP4: packed e2m1 + one UE8M0 per 32 dims (68 B per 128-dim key)."""

    packed: jax.Array  # uint8[..., D/2]
    scale: jax.Array  # uint8[..., D/32], e8m0 bytes

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.packed.shape[:-1], 2 * self.packed.shape[-1])


KvRows = jax.Array | Fp8Rows
IndexerKeys = jax.Array | Fp8IndexerKeys | Fp4IndexerKeys


# --------------------------------------------------------------------------- byte accounting
def kv_scale_bytes(nope_dim: int) -> int:
    """Scale bytes of an "fp8_ds_mla" row: one per 64 nope dims, padded to a multiple of 8."""
    nblk = -(-nope_dim // KV_SCALE_BLOCK)
    return -(-nblk // 8) * 8


def bytes_per_row(fmt: str, dim: int = 512, rope_dim: int = 64) -> int:
    """Stored bytes per row. ``fmt``: "bf16", "fp8_ds_mla" (main KV, ``dim``=K, ``rope_dim``=R),
    "indexer_fp8" or "indexer_fp4" (``dim``=D). Flash: 1024 / 584 / 132 / 68 (ARCHITECTURE.md §10.1).
    """
    if fmt == "bf16":
        return 2 * dim
    if fmt == "fp8_ds_mla":
        return (dim - rope_dim) + 2 * rope_dim + kv_scale_bytes(dim - rope_dim)
    if fmt == "indexer_fp8":
        return dim + 4
    if fmt == "indexer_fp4":
        return dim // 2 + dim // mxfp4.BLOCK
    raise ValueError(f"bytes_per_row: unknown fmt {fmt!r}")


def format_of(rows) -> str:
    """The ``bytes_per_row`` name of a row container."""
    if isinstance(rows, Fp8Rows):
        return "fp8_ds_mla"
    if isinstance(rows, Fp8IndexerKeys):
        return "indexer_fp8"
    if isinstance(rows, Fp4IndexerKeys):
        return "indexer_fp4"
    return "bf16"


def nbytes(rows) -> int:
    """Total stored bytes of any row container (all leaves)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(rows)))


# --------------------------------------------------------------------------- main KV rows
@functools.partial(jax.jit, static_argnames=("rope_dim",))
def quantize_kv(x: jax.Array, rope_dim: int = 64) -> Fp8Rows:
    """f32/bf16[..., K] rows (RoPE already applied to the last ``rope_dim``) → :class:`Fp8Rows`."""
    k = x.shape[-1]
    nope_dim = k - rope_dim
    if not 0 <= rope_dim < k:
        raise ValueError(f"quantize_kv: rope_dim={rope_dim} must be in [0, head_dim={k})")
    nope = x[..., :nope_dim].astype(F32)
    nblk = -(-nope_dim // KV_SCALE_BLOCK)
    pad = nblk * KV_SCALE_BLOCK - nope_dim
    xb = jnp.pad(nope, [(0, 0)] * (x.ndim - 1) + [(0, pad)]).reshape(*x.shape[:-1], nblk, KV_SCALE_BLOCK)
    exp = mxfp4.pow2_exponent(jnp.max(jnp.abs(xb), axis=-1), FP8_MAX, _FP8_MIN_AMAX)
    scale = mxfp4.e8m0_encode_exponent(exp)  # u8[..., nblk]
    q = jnp.clip(xb / mxfp4.e8m0_decode(scale)[..., None], -FP8_MAX, FP8_MAX)
    q = q.reshape(*x.shape[:-1], nblk * KV_SCALE_BLOCK)[..., :nope_dim].astype(jnp.float8_e4m3fn)
    scale = jnp.pad(scale, [(0, 0)] * (x.ndim - 1) + [(0, kv_scale_bytes(nope_dim) - nblk)])
    return Fp8Rows(q, x[..., nope_dim:].astype(jnp.bfloat16), scale)


@functools.partial(jax.jit, static_argnames=("dtype",))
def dequantize_kv(rows: KvRows, dtype=F32) -> jax.Array:
    """Any main-KV container → dense ``dtype[..., K]`` (a plain array is just cast)."""
    if not isinstance(rows, Fp8Rows):
        return rows.astype(dtype)
    nope_dim = rows.nope.shape[-1]
    nblk = -(-nope_dim // KV_SCALE_BLOCK)
    s = jnp.repeat(mxfp4.e8m0_decode(rows.scale[..., :nblk]), KV_SCALE_BLOCK, axis=-1)[..., :nope_dim]
    nope = rows.nope.astype(F32) * s
    return jnp.concatenate([nope, rows.rope.astype(F32)], axis=-1).astype(dtype)


# --------------------------------------------------------------------------- indexer keys
@functools.partial(jax.jit, static_argnames=("fmt",))
def quantize_indexer_keys(x: jax.Array, fmt: str) -> IndexerKeys:
    """f32/bf16[..., D] keys → ``fmt`` in {"bf16", "fp8", "fp4"}."""
    if fmt == "bf16":
        return x.astype(jnp.bfloat16)
    if fmt == "fp8":
        amax = jnp.max(jnp.abs(x.astype(F32)), axis=-1, keepdims=True)
        scale = mxfp4.e8m0_decode(
            mxfp4.e8m0_encode_exponent(mxfp4.pow2_exponent(amax, FP8_MAX, _FP8_MIN_AMAX))
        )
        q = jnp.clip(x.astype(F32) / scale, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
        return Fp8IndexerKeys(q, scale)
    if fmt == "fp4":
        w = mxfp4.quantize(x)
        return Fp4IndexerKeys(w.packed, w.scale)
    raise ValueError(f"quantize_indexer_keys: unknown fmt {fmt!r}; expected bf16, fp8 or fp4")


@functools.partial(jax.jit, static_argnames=("dtype",))
def dequantize_indexer_keys(keys: IndexerKeys, dtype=F32) -> jax.Array:
    """Any indexer-key container → dense ``dtype[..., D]``."""
    if isinstance(keys, Fp8IndexerKeys):
        return (keys.values.astype(F32) * keys.scale).astype(dtype)
    if isinstance(keys, Fp4IndexerKeys):
        return mxfp4.dequantize(mxfp4.Mxfp4Weight(keys.packed, keys.scale), dtype)
    return keys.astype(dtype)


# --------------------------------------------------------------------------- pools
def allocate_rows(prefix: tuple[int, ...], fmt: str, dim: int, rope_dim: int = 64, poison: bool = False):
    """An empty pool ``prefix + [dim]`` in ``fmt`` ("bf16", "fp8_ds_mla", "indexer_fp8",
    "indexer_fp4"). ``poison`` fills it with NaN (e8m0 0xFF, e4m3 NaN) so that any read of an
    unwritten slot shows up in tests (STYLE.md §2.14); otherwise zeros.
    """
    p = tuple(prefix)

    def full(shape, dtype, nan_byte=None):
        if not poison:
            return jnp.zeros(shape, dtype)
        if nan_byte is not None:
            return jnp.full(shape, nan_byte, dtype)
        return jnp.full(shape, jnp.nan, dtype)

    if fmt == "bf16":
        return full(p + (dim,), jnp.bfloat16)
    if fmt == "fp8_ds_mla":
        nope = dim - rope_dim
        return Fp8Rows(
            full(p + (nope,), jnp.float8_e4m3fn),
            full(p + (rope_dim,), jnp.bfloat16),
            full(p + (kv_scale_bytes(nope),), jnp.uint8, 0xFF),
        )
    if fmt == "indexer_fp8":
        return Fp8IndexerKeys(full(p + (dim,), jnp.float8_e4m3fn), full(p + (1,), F32))
    if fmt == "indexer_fp4":
        return Fp4IndexerKeys(
            full(p + (dim // 2,), jnp.uint8, 0xFF), full(p + (dim // mxfp4.BLOCK,), jnp.uint8, 0xFF)
        )
    raise ValueError(f"allocate_rows: unknown fmt {fmt!r}")


def encode_like(pool, values: jax.Array):
    """Dense rows f32/bf16[..., dim] → the container type of ``pool``."""
    if isinstance(pool, Fp8Rows):
        return quantize_kv(values, pool.rope_dim)
    if isinstance(pool, Fp8IndexerKeys):
        return quantize_indexer_keys(values, "fp8")
    if isinstance(pool, Fp4IndexerKeys):
        return quantize_indexer_keys(values, "fp4")
    return values.astype(pool.dtype)


@jax.jit
def write_rows(pool, index, values: jax.Array):
    """``pool[index] = encode(values)`` for every leaf; ``index`` indexes the leading axes
    (e.g. ``(block_ids, offsets)`` arrays), ``values`` are dense ``[..., dim]`` rows."""
    enc = encode_like(pool, values)
    return jax.tree.map(lambda p, v: p.at[index].set(v.astype(p.dtype)), pool, enc)


def _view(a, dtype):
    """``a`` with its bits read as ``dtype`` (arrays, tracers or ShapeDtypeStructs)."""
    if a is None or a.dtype == jnp.dtype(dtype):
        return a
    if isinstance(a, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(a.shape, dtype)
    return jax.lax.bitcast_convert_type(a, dtype)


def logical(rows):
    """A row container with its float dtypes.

    Pools at rest may hold bf16 leaves as their bits (uint16) and e4m3 leaves as uint8: the
    serving state does (``dsv4_jax.model.state.stored``), because XLA:CPU copies a whole array
    to bitcast it. Readers gather rows first and view only those (``read_rows``); the kernels
    view whole pools at entry (a free reinterpretation on GPU)."""
    e4m3, bf16 = jnp.float8_e4m3fn, jnp.bfloat16
    if rows is None:
        return None
    if isinstance(rows, Fp8Rows):
        return Fp8Rows(_view(rows.nope, e4m3), _view(rows.rope, bf16), rows.scale)
    if isinstance(rows, Fp8IndexerKeys):
        return Fp8IndexerKeys(_view(rows.values, e4m3), rows.scale)
    if isinstance(rows, Fp4IndexerKeys):
        return rows
    return jax.tree.map(lambda a: _view(a, bf16) if a.dtype == jnp.uint16 else a, rows)


def logical_shapes(rows):
    """Shapes and float dtypes of ``rows`` (for validators), whatever form they are held in."""
    sds = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), rows)
    return logical(sds)


def read_rows(pool, index):
    """``pool[index]`` for every leaf, gathered in the pool's own form, then viewed in its
    float dtypes (only the gathered rows are reinterpreted)."""
    return logical(jax.tree.map(lambda p: p[index], pool))
