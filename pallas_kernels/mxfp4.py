"""MXFP4 codec (jnp, reference grade): e2m1 nibbles, low nibble first, one UE8M0 scale per
32 consecutive elements of the last axis (ARCHITECTURE.md §8, TOOLCHAIN.md §5).

Storage is ``packed: u8[..., n/2]`` (byte j holds element 2j in its low nibble and 2j+1
in its high nibble) plus ``scale: u8[..., n/32]`` holding e8m0 bytes, ``2^(e−127)``. This
is the checkpoint layout of the routed experts (``ffn.experts.{j}.w{1,2,3}``) and of the
FP4 indexer-key cache (``kv_format``). jnp fp4 arrays take one byte per element, so the
packed ``uint8`` form is the only one that saves memory (TOOLCHAIN.md §5).

The quantizer uses the same scale rule as the model's ``fp4_sim`` (smallest power of
two ``s`` with ``amax/s ≤ 6``, amax floored at ``6·2^-126``), so values the model has
already FP4-rounded survive a quantize → dequantize round trip exactly.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

F32 = jnp.float32
BLOCK = 32  # elements per UE8M0 scale
FP4_MAX = 6.0
_MIN_AMAX = FP4_MAX * 2.0**-126  # keeps the scale byte >= 1 for all-zero blocks

# e2m1 code → value (bit 3 = sign): ARCHITECTURE.md §8.
E2M1_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)


class Mxfp4Weight(NamedTuple):
    """A packed MXFP4 tensor, e.g. routed-expert weights ``[E, out, in]`` stored as below."""

    packed: jax.Array  # u8[..., out, in/2]
    scale: jax.Array  # u8[..., out, in/32], e8m0 bytes

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical (unpacked) shape."""
        return (*self.packed.shape[:-1], 2 * self.packed.shape[-1])


# --------------------------------------------------------------------------- e8m0
def e8m0_decode(e: jax.Array) -> jax.Array:
    """UE8M0 bytes → f32 ``2^(e−127)``; byte 0 is ``2^-127`` and 255 is NaN, both exact."""
    e = e.astype(jnp.int32)
    normal = lax.bitcast_convert_type(e << 23, F32)
    return jnp.where(e == 0, F32(2.0**-127), jnp.where(e == 255, F32(jnp.nan), normal))


def e8m0_encode_exponent(n: jax.Array) -> jax.Array:
    """Power-of-two exponent ``n`` (scale ``2^n``) → its e8m0 byte, clamped to 1..254."""
    return jnp.clip(n + 127, 1, 254).astype(jnp.uint8)


def ceil_log2(x: jax.Array) -> jax.Array:
    """``ceil(log2(x))`` of positive normal float32 ``x``, exactly, from its bits: the exponent
    field, plus one unless the mantissa is zero (``x`` a power of two).

    ``jnp.ceil(jnp.log2(x))`` is not exact: one ulp above a power of two the float32 log rounds
    to the integer itself, so the scale came out one step too small and the block's largest
    value saturated at the format's maximum instead of being represented."""
    bits = lax.bitcast_convert_type(x.astype(F32), jnp.uint32)
    exponent = ((bits >> 23) & 0xFF).astype(jnp.int32) - 127
    return exponent + ((bits & 0x7FFFFF) != 0).astype(jnp.int32)


def pow2_exponent(amax: jax.Array, qmax: float, min_amax: float) -> jax.Array:
    """``ceil(log2(max(amax, min_amax)/qmax))``: the exponent of the smallest UE8M0 scale
    that maps ``amax`` into ``[-qmax, qmax]`` (§2's rule, shared by the model's QAT rounding
    and the storage codecs). ``min_amax/qmax`` must be a normal float32."""
    return ceil_log2(jnp.maximum(amax.astype(F32), min_amax) / qmax)


def pow2(n: jax.Array) -> jax.Array:
    """``2^n`` exactly as float32 for integer ``n`` in the normal range (built from bits)."""
    return lax.bitcast_convert_type((n.astype(jnp.int32) + 127) << 23, F32)


# --------------------------------------------------------------------------- nibbles
@jax.jit
def pack(values: jax.Array) -> jax.Array:
    """Values already on the e2m1 grid, f32[..., n] → packed u8[..., n/2] (low nibble first)."""
    n = values.shape[-1]
    if n % 2:
        raise ValueError(f"pack: last dim {n} must be even")
    codes = lax.bitcast_convert_type(values.astype(jnp.float4_e2m1fn), jnp.uint4).astype(jnp.uint8)
    codes = codes.reshape(*values.shape[:-1], n // 2, 2)
    return codes[..., 0] | (codes[..., 1] << 4)


@jax.jit
def unpack(packed: jax.Array) -> jax.Array:
    """Packed u8[..., n/2] → unscaled e2m1 values f32[..., n] (bitcast decode, exact)."""
    lo = lax.bitcast_convert_type((packed & 0xF).astype(jnp.uint4), jnp.float4_e2m1fn)
    hi = lax.bitcast_convert_type((packed >> 4).astype(jnp.uint4), jnp.float4_e2m1fn)
    v = jnp.stack([lo, hi], axis=-1).astype(F32)
    return v.reshape(*packed.shape[:-1], 2 * packed.shape[-1])


# --------------------------------------------------------------------------- blocks
@functools.partial(jax.jit, static_argnames=("block",))
def quantize(x: jax.Array, block: int = BLOCK) -> Mxfp4Weight:
    """f32/bf16[..., n] → MXFP4 with one scale per ``block`` elements (n % block == 0)."""
    n = x.shape[-1]
    if n % block:
        raise ValueError(f"quantize: last dim {n} must be a multiple of {block}")
    xb = x.astype(F32).reshape(*x.shape[:-1], n // block, block)
    exp = pow2_exponent(jnp.max(jnp.abs(xb), axis=-1), FP4_MAX, _MIN_AMAX)
    scale = e8m0_encode_exponent(exp)
    q = jnp.clip(xb / e8m0_decode(scale)[..., None], -FP4_MAX, FP4_MAX)
    return Mxfp4Weight(pack(q.reshape(x.shape)), scale)


@functools.partial(jax.jit, static_argnames=("dtype",))
def dequantize(w: Mxfp4Weight, dtype=F32) -> jax.Array:
    """MXFP4 → dense ``dtype[..., n]``; every value is exact in bf16 (≤ 2 significant bits)."""
    v = unpack(w.packed)
    block = v.shape[-1] // w.scale.shape[-1]
    s = jnp.repeat(e8m0_decode(w.scale), block, axis=-1)
    return (v * s).astype(dtype)


def nbytes(w: Mxfp4Weight) -> int:
    """Stored bytes: 0.5 per element plus one per 32 (4.25 bit/param; SERVING.md §3)."""
    return int(w.packed.size + w.scale.size)
