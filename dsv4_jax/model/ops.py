"""Shared primitives of ARCHITECTURE.md §2: norms, interleaved partial RoPE, YaRN,
Hadamard, and the reference's FP8/FP4 rounding simulations.

Everything numerically delicate (norm statistics, RoPE angles, softmax) runs in fp32
and is cast back to the input dtype, as the reference does.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax.config import Config, yarn_correction_range
from dsv4_jax.model.layers import dense
from pallas_kernels import mxfp4

F32 = jnp.float32


# ----------------------------------------------------------------------------- norms
def rms_norm(x: jax.Array, weight: jax.Array | None, eps: float) -> jax.Array:
    """``w ⊙ x·rsqrt(mean(x²)+eps)`` over the last axis in fp32 (§2); ``weight=None`` is unweighted."""
    xf = x.astype(F32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if weight is not None:
        y = y * weight.astype(F32)
    return y.astype(x.dtype)


# ----------------------------------------------------------------------------- linear
def linear(x: jax.Array, w, *, quant_act: bool = False) -> jax.Array:
    """``x @ wᵀ`` with fp32 accumulation, output in the activation dtype. ``w``: a weight
    variable or array [out, in], plain or packed (``layers.dense``).

    ``quant_act`` rounds the activation to FP8 in 1×128 blocks first, as the reference
    does before every FP8/FP4 GEMM (§2, QAT simulation).
    """
    if quant_act:
        x = fp8_sim(x, 128)
    y = jnp.einsum("...i,oi->...o", x, dense(w, x.dtype), preferred_element_type=F32)
    return y.astype(x.dtype)


# ----------------------------------------------------------------------------- RoPE
def rope_inv_freq(cfg: Config, compressed: bool) -> np.ndarray:
    """Per-pair angular frequencies ω_i, i < r/2 (§2).

    SWA-only layers (and MTP): θ = ``rope_theta``, no YaRN. CSA/HCA layers:
    θ = ``compress_rope_theta`` with the YaRN ramp when ``rope_scaling`` is set.
    No YaRN magnitude factor is applied anywhere.
    """
    r = cfg.qk_rope_head_dim
    theta = cfg.compress_rope_theta if compressed else cfg.rope_theta
    inv = 1.0 / (theta ** (np.arange(0, r, 2, dtype=np.float64) / r))
    if compressed and cfg.rope_scaling is not None:
        low, high = yarn_correction_range(cfg)
        if high == low:
            high += 0.001
        ramp = np.clip((np.arange(r // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
        inv = inv * (1.0 - ramp) + (inv / cfg.rope_scaling.factor) * ramp
    return inv.astype(np.float32)


def rope_angles(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos/sin of ``pos·ω_i``: f32[..., r/2] for integer positions of any shape."""
    ang = positions.astype(F32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, inverse: bool = False) -> jax.Array:
    """Rotate the trailing ``2·cos.shape[-1]`` dims of ``x`` as interleaved pairs (§2).

    Pair ``(x[2i], x[2i+1])`` is the complex number ``a+ib`` times ``exp(±i·angle)``.
    ``cos``/``sin`` broadcast against ``x[..., :-1]`` once a head axis is inserted by
    the caller (e.g. f32[B,T,1,r/2] for x: [B,T,H,K]). ``inverse`` uses the conjugate.
    """
    r = 2 * cos.shape[-1]
    nope, rot = x[..., :-r], x[..., -r:]
    pairs = rot.astype(F32).reshape(*rot.shape[:-1], r // 2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    if inverse:
        sin = -sin
    out = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(rot.shape)
    return jnp.concatenate([nope, out.astype(x.dtype)], axis=-1)


# ----------------------------------------------------------------------------- Hadamard
def hadamard(x: jax.Array) -> jax.Array:
    """``x·H_n/√n`` over the last axis (Sylvester H, n a power of two; §2, indexer only)."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"hadamard: last dim {n} is not a power of two")
    h = np.array([[1.0]], dtype=np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    y = jnp.einsum("...i,ij->...j", x.astype(F32), jnp.asarray(h / math.sqrt(n)), precision="highest")
    return y.astype(x.dtype)


# ----------------------------------------------------------------------------- QAT sims
def _block_round(x: jax.Array, block: int, qmax: float, min_amax: float, qdtype) -> jax.Array:
    """Round to ``qdtype`` with one power-of-two scale per ``block`` values of the last axis.

    A trailing partial block (tiny test widths) is zero-padded; zeros never raise amax.
    """
    shape = x.shape
    n = shape[-1]
    pad = (-n) % block
    xf = x.astype(F32)
    if pad:
        xf = jnp.pad(xf, [(0, 0)] * (len(shape) - 1) + [(0, pad)])
    xb = xf.reshape(*shape[:-1], (n + pad) // block, block)
    s = mxfp4.pow2(mxfp4.pow2_exponent(jnp.max(jnp.abs(xb), axis=-1, keepdims=True), qmax, min_amax))
    q = jnp.clip(xb / s, -qmax, qmax).astype(qdtype).astype(F32)
    return (q * s).reshape(*shape[:-1], n + pad)[..., :n].astype(x.dtype)


def fp8_sim(x: jax.Array, block: int) -> jax.Array:
    """Round to FP8 e4m3 (max 448) with UE8M0 scales per ``block`` values (§2)."""
    return _block_round(x, block, 448.0, 1e-4, jnp.float8_e4m3fn)


def fp4_sim(x: jax.Array, block: int = 32) -> jax.Array:
    """Round to FP4 e2m1 (max 6) with UE8M0 scales per ``block`` values (§2)."""
    return _block_round(x, block, 6.0, 6.0 * 2.0**-126, jnp.float4_e2m1fn)


def fp8_sim_nope(x: jax.Array, rope_dim: int) -> jax.Array:
    """FP8-round the non-RoPE dims of a KV row in blocks of 64; RoPE dims stay exact (§5.1)."""
    nope = x[..., : x.shape[-1] - rope_dim]
    return jnp.concatenate([fp8_sim(nope, 64), x[..., x.shape[-1] - rope_dim :]], axis=-1)
