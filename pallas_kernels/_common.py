"""Shared helpers for the kernels: sizes, the one interpret/Triton call wrapper, and the
in-kernel decoders of the low-precision formats.

Every kernel in this package follows the GPU-portable subset of TOOLCHAIN.md §4/§11:
all operands are raw ``pl.ANY`` refs (block tables and indices are ordinary inputs,
never scalar prefetch), rows are gathered inside the kernel with integer index arrays,
every grid axis is parallel (no accumulation across programs), every loaded or stored
tile has a power-of-two size, and Triton compiler params are always passed, because the
jax 0.10.2 default GPU backend is Mosaic GPU (TOOLCHAIN.md §4, "default backend trap").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

F32 = jnp.float32
I32 = jnp.int32


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def pow2_pieces(n: int) -> list[int]:
    """``n`` as a sum of descending powers of two (48 → [32, 16]); Triton tiles must be 2^j."""
    return [1 << b for b in reversed(range(n.bit_length())) if n >> b & 1]


def resolve_interpret(interpret: bool | None) -> bool:
    """``None`` means: interpret on a CPU backend (TOOLCHAIN.md §11). The model passes its own
    choice (``ModelOptions.interpret``); nothing is read from the environment."""
    if interpret is not None:
        return bool(interpret)
    return jax.default_backend() == "cpu"


def call(
    body: Callable[..., None],
    *,
    grid: tuple[int, ...],
    out_shape: Sequence[jax.ShapeDtypeStruct],
    interpret: bool,
    num_warps: int,
    num_stages: int,
    name: str,
) -> Callable[..., tuple[jax.Array, ...]]:
    """``pallas_call`` with every operand a whole ``pl.ANY`` ref and explicit Triton params.

    Raw refs let the body gather rows through block tables with plain indexing (the
    portable paged pattern of TOOLCHAIN.md §4); explicit ``plt.CompilerParams`` keep the
    lowering on Triton rather than Mosaic GPU.
    """
    any_spec = pl.BlockSpec(memory_space=pl.ANY)

    def run(*args):
        return pl.pallas_call(
            body,
            grid=grid,
            in_specs=[any_spec] * len(args),
            out_specs=[any_spec] * len(out_shape),
            out_shape=list(out_shape),
            interpret=interpret,
            compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
            name=name,
        )(*args)

    return run


# --------------------------------------------------------------------------- in-kernel loads
def iota(shape: tuple[int, ...], dim: int) -> jax.Array:
    return lax.broadcasted_iota(I32, shape, dim)


def gather_rows(ref, rows: jax.Array, valid: jax.Array, col: int, width: int, other=0):
    """``ref[rows[i], col:col+width]`` for a 2-D ref, masked: invalid rows read nothing.

    rows/valid: [n]. Returns [n, width] in the ref dtype, ``other`` where invalid, so
    NaN-poisoned unused slots never reach a dot (TOOLCHAIN.md §4 gather pattern).
    """
    n = rows.shape[0]
    r = jnp.broadcast_to(rows[:, None], (n, width))
    c = col + iota((n, width), 1)
    m = jnp.broadcast_to(valid[:, None], (n, width))
    return plt.load(ref.at[r, c], mask=m, other=jnp.asarray(other, ref.dtype))


def gather_cols(ref, rows: jax.Array, valid: jax.Array, cols: jax.Array, other=0):
    """``ref[rows[i], cols[j]]`` masked by row: [n, len(cols)] (repeated cols broadcast scales)."""
    n, w = rows.shape[0], cols.shape[0]
    r = jnp.broadcast_to(rows[:, None], (n, w))
    c = jnp.broadcast_to(cols[None, :], (n, w))
    m = jnp.broadcast_to(valid[:, None], (n, w))
    return plt.load(ref.at[r, c], mask=m, other=jnp.asarray(other, ref.dtype))


# --------------------------------------------------------------------------- format decoders
def e8m0_to_f32(e: jax.Array) -> jax.Array:
    """UE8M0 byte ``e`` → ``2^(e−127)`` exactly, by placing ``e`` in the f32 exponent field.

    In-kernel form: byte 0 decodes to 0 and 255 to +inf (neither is produced by the
    quantizers here; ``kv_format`` / ``mxfp4`` decode those two exactly on the jnp side).
    """
    return lax.bitcast_convert_type(e.astype(I32) << 23, F32)


def e2m1_to_f32(nibble: jax.Array) -> jax.Array:
    """FP4 e2m1 code (0..15, bit 3 = sign) → value in {0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6}.

    Arithmetic decode (ARCHITECTURE.md §8 table): only integer and float ops, so it runs
    in any kernel language; ``mxfp4.unpack`` checks it against the ml_dtypes bitcast.
    """
    n = nibble.astype(I32)
    e = (n >> 1) & 3
    m = (n & 1).astype(F32)
    mag = jnp.where(e == 0, 0.5 * m, (1.0 + 0.5 * m) * (1 << jnp.maximum(e - 1, 0)).astype(F32))
    return jnp.where((n & 8) != 0, -mag, mag)


def unpack_fp4_tile(packed: jax.Array) -> jax.Array:
    """Packed bytes u8[n, c/2] → unscaled e2m1 values f32[n, c].

    Low nibble is element 2j, high nibble element 2j+1 (ARCHITECTURE.md §8); the two
    halves are interleaved with a last-axis stack, which Triton lowers to ``tt.join``.
    """
    n, half = packed.shape
    lo = e2m1_to_f32(packed & 0xF)
    hi = e2m1_to_f32(packed >> 4)
    return jnp.stack([lo, hi], axis=-1).reshape(n, 2 * half)


def repeat_cols(x: jax.Array, times: int) -> jax.Array:
    """[n, c] → [n, c·times], each column repeated ``times`` times (broadcast + reshape)."""
    n, c = x.shape
    return jnp.broadcast_to(x[:, :, None], (n, c, times)).reshape(n, c * times)
