"""Weight codecs of the published checkpoint (ARCHITECTURE.md §8), in numpy and jnp.

Two formats, one model: a weight is a grid of low-precision *values* times one
power-of-two *scale* per block.

* **FP8 block** (non-expert linears, shared experts, MTP projections): values are
  e4m3fn bytes ``[O, I]`` (max 448); scales are UE8M0 bytes
  ``[ceil(O/128), ceil(I/128)]``, block ``(128, 128)``:
  ``W[i, j] = e4m3(q[i, j]) · 2^(E[i//128, j//128] − 127)``.
* **MXFP4** (routed experts): values are e2m1 nibbles packed two per byte along
  the input axis, ``[O, I/2]``, **low nibble = element 2k, high nibble = 2k+1**;
  scales are UE8M0 bytes ``[O, I/32]``, block ``(1, 32)``:
  ``W[i, j] = e2m1(q[i, j]) · 2^(S[i, j//32] − 127)``.

Both dequantize through the same path (decode values, broadcast the scale grid
over its block, multiply), so one ``QuantizedWeight`` container covers both; its
arrays are plain ``uint8`` (bytes as stored) so orbax and device transfers never
meet an exotic dtype. Every function accepts numpy arrays (host-side loading,
checkpoint writing) or jax arrays (on-device dequantization of packed weights);
the result has the same array type as the input.

The products are exact: an e4m3 value has 4 significant bits and an e2m1 value 2,
and the scale is a power of two, so the dequantized weight is representable in
bfloat16 and float32 alike (barring scales near 2^±127, which real weights lack).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP4_MAX = 6.0  # largest e2m1
FP8_BLOCK = (128, 128)
MXFP4_BLOCK = (1, 32)
E8M0_BIAS = 127

# e2m1 code -> value; bit 3 is the sign (§8). Codes 8..15 are the negatives of 0..7.
E2M1_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32
)
# UE8M0 byte e -> 2^(e-127); 255 is NaN. float32 holds 2^-127 (subnormal) .. 2^127 exactly.
E8M0_VALUES = np.array([math.ldexp(1.0, e - E8M0_BIAS) for e in range(255)] + [math.nan], np.float32)


def _is_jax(x) -> bool:
    return isinstance(x, jax.Array)


def _xp(x):
    return jnp if _is_jax(x) else np


# ----------------------------------------------------------------------------- scalars
def e8m0_decode(e):
    """UE8M0 exponent bytes (uint8, any shape) -> float32 scales ``2^(e-127)``."""
    xp = _xp(e)
    return xp.take(xp.asarray(E8M0_VALUES), e.astype(xp.int32))


def e8m0_encode_exponent(exp):
    """Integer power-of-two exponents ``k`` (scale ``2^k``) -> UE8M0 bytes ``k + 127``."""
    exp = np.asarray(exp)
    if exp.size and (exp.min() < -E8M0_BIAS or exp.max() > E8M0_BIAS):
        raise ValueError(f"scale exponent out of the UE8M0 range [-127, 127]: {exp.min()}..{exp.max()}")
    return (exp + E8M0_BIAS).astype(np.uint8)


def pow2_ceil_exponent(x: np.ndarray) -> np.ndarray:
    """``ceil(log2(x))`` for positive finite float32 ``x``, exactly (no log rounding).

    ``frexp`` writes ``x = m·2^e`` with ``m`` in [0.5, 1); ``x`` is a power of two iff
    ``m == 0.5``, where ``log2 x = e − 1``; otherwise ``ceil(log2 x) = e``.
    """
    m, e = np.frexp(np.asarray(x, np.float32))
    return np.where(m == 0.5, e - 1, e).astype(np.int32)


# ----------------------------------------------------------------------------- fp8 values
def fp8_decode(data):
    """e4m3fn bytes (uint8) -> float32 values."""
    if _is_jax(data):
        return jax.lax.bitcast_convert_type(data.astype(jnp.uint8), jnp.float8_e4m3fn).astype(jnp.float32)
    return np.asarray(data).view(np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)


def fp8_encode(values: np.ndarray) -> np.ndarray:
    """float32 values in [-448, 448] -> e4m3fn bytes (round to nearest even)."""
    v = np.clip(np.asarray(values, np.float32), -FP8_MAX, FP8_MAX)
    return v.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)


# ----------------------------------------------------------------------------- fp4 values
def fp4_unpack(packed):
    """uint8 ``[..., K/2]`` -> e2m1 codes uint8 ``[..., K]``: low nibble first (§8)."""
    xp = _xp(packed)
    p = packed.astype(xp.uint8)
    codes = xp.stack([p & 0x0F, p >> 4], axis=-1)  # [..., K/2, 2]
    return codes.reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def fp4_pack(codes: np.ndarray) -> np.ndarray:
    """e2m1 codes uint8 ``[..., K]`` (K even, each < 16) -> bytes ``[..., K/2]``.

    Element 2k goes to the low nibble and 2k+1 to the high nibble (§8).
    """
    c = np.asarray(codes, np.uint8)
    if c.shape[-1] % 2:
        raise ValueError(f"fp4_pack: last dim must be even, got shape {c.shape}")
    if c.size and c.max() > 15:
        raise ValueError("fp4_pack: codes must be 4-bit (0..15)")
    return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)


def fp4_decode(packed):
    """Packed e2m1 bytes ``[..., K/2]`` -> float32 values ``[..., K]``."""
    xp = _xp(packed)
    return xp.take(xp.asarray(E2M1_VALUES), fp4_unpack(packed).astype(xp.int32))


def fp4_encode(values: np.ndarray) -> np.ndarray:
    """float32 values in [-6, 6] -> packed e2m1 bytes (round to nearest even).

    ml_dtypes stores ``float4_e2m1fn`` one per byte with the e2m1 code in the low
    4 bits, the same code table as ``E2M1_VALUES``.
    """
    v = np.clip(np.asarray(values, np.float32), -FP4_MAX, FP4_MAX)
    codes = v.astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0x0F
    return fp4_pack(codes)


# ----------------------------------------------------------------------------- block scales
def expand_scales(scale, block: tuple[int, int], shape: tuple[int, ...]):
    """Scale grid ``[..., ceil(O/bo), ceil(I/bi)]`` -> per-element scales ``[..., O, I]`` (float32)."""
    xp = _xp(scale)
    bo, bi = block
    s = e8m0_decode(scale)
    if bo > 1:
        s = xp.repeat(s, bo, axis=-2)
    if bi > 1:
        s = xp.repeat(s, bi, axis=-1)
    return s[..., : shape[-2], : shape[-1]]


def _blocked_amax(w: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """max |w| per block of the last two axes: ``[..., ceil(O/bo), ceil(I/bi)]``.

    A trailing partial block is zero-padded; zeros never raise the maximum.
    """
    *lead, o, i = w.shape
    bo, bi = block
    po, pi = (-o) % bo, (-i) % bi
    a = np.abs(w)
    if po or pi:
        a = np.pad(a, [(0, 0)] * len(lead) + [(0, po), (0, pi)])
    a = a.reshape(*lead, (o + po) // bo, bo, (i + pi) // bi, bi)
    return a.max(axis=(-3, -1))


def quantize_blocks(w: np.ndarray, fmt: str, block: tuple[int, int] | None = None):
    """Quantize float weights ``[..., O, I]`` the way §2's QAT does: returns ``(data, scale)``.

    Scale per block: ``2^ceil(log2(amax/qmax))`` with ``amax`` clamped below
    (1e-4 for FP8, 6·2^-126 for FP4, §2) so an all-zero block gets a finite scale.
    """
    w = np.asarray(w, np.float32)
    if fmt == "fp8":
        block, qmax, floor = block or FP8_BLOCK, FP8_MAX, 1e-4
    elif fmt == "mxfp4":
        block, qmax, floor = block or MXFP4_BLOCK, FP4_MAX, FP4_MAX * 2.0**-126
        if w.shape[-1] % 2:
            raise ValueError(f"mxfp4: the input dim must be even (two values per byte), got {w.shape}")
    else:
        raise ValueError(f"unknown format {fmt!r}; expected 'fp8' or 'mxfp4'")
    amax = np.maximum(_blocked_amax(w, block), np.float32(floor))
    exp = pow2_ceil_exponent(amax / np.float32(qmax))
    scale = e8m0_encode_exponent(exp)
    inv = expand_scales(scale, block, w.shape)
    vals = w / inv
    data = fp8_encode(vals) if fmt == "fp8" else fp4_encode(vals)
    return data, scale


def dequantize_blocks(data, scale, fmt: str, block: tuple[int, int], dtype=None):
    """Inverse of ``quantize_blocks``: bytes + UE8M0 grid -> weights ``[..., O, I]``.

    ``dtype`` defaults to float32; the cast is exact for bfloat16 too (module doc).
    """
    vals = fp8_decode(data) if fmt == "fp8" else fp4_decode(data)
    w = vals * expand_scales(scale, block, vals.shape)
    return w if dtype is None else w.astype(dtype)


# ----------------------------------------------------------------------------- container
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A weight kept in its checkpoint form: value bytes plus UE8M0 scale bytes.

    ``fmt`` "fp8": ``data`` u8[..., O, I] (e4m3fn bits), ``scale`` u8[..., ceil(O/bo), ceil(I/bi)].
    ``fmt`` "mxfp4": ``data`` u8[..., O, I/2] (two e2m1 per byte), ``scale`` u8[..., O, I/32].
    Leading axes (stacked experts) are allowed. A jax pytree whose leaves are the
    two arrays; ``fmt`` and ``block`` are static metadata.
    """

    data: Any
    scale: Any
    fmt: str = "fp8"
    block: tuple[int, int] = FP8_BLOCK

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the dequantized weight."""
        s = tuple(self.data.shape)
        return s if self.fmt == "fp8" else (*s[:-1], 2 * s[-1])

    def dequantize(self, dtype=jnp.bfloat16):
        return dequantize_blocks(self.data, self.scale, self.fmt, self.block, dtype)

    @classmethod
    def quantize(cls, w: np.ndarray, fmt: str, block: tuple[int, int] | None = None) -> QuantizedWeight:
        block = tuple(block or (FP8_BLOCK if fmt == "fp8" else MXFP4_BLOCK))
        data, scale = quantize_blocks(w, fmt, block)
        return cls(data, scale, fmt, block)


jax.tree_util.register_dataclass(QuantizedWeight, data_fields=["data", "scale"], meta_fields=["fmt", "block"])


def is_quantized(x) -> bool:
    return isinstance(x, QuantizedWeight)


def dequantize_tree(tree, dtype=jnp.bfloat16):
    """Replace every ``QuantizedWeight`` in a pytree by its dequantized array."""
    return jax.tree.map(lambda x: x.dequantize(dtype) if is_quantized(x) else x, tree, is_leaf=is_quantized)
