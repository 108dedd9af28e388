"""Manifold-constrained hyper-connections (mHC), ARCHITECTURE.md §3 (HC head) and §4.

Modules: ``MHC`` (one sub-layer's ``fn``/``base``/``scale``: the checkpoint's
``hc_{attn,ffn}_{fn,base,scale}``) and ``HCHead`` (``hc_head_{fn,base,scale}``), all fp32.

The residual is ``n = hc_mult`` streams X: [B, T, n, D]. Before each sub-layer a
24-way projection of the flattened, RMS-normalised streams gives ``pre`` (collapse
weights), ``post`` (expand weights) and a 4×4 ``comb`` mixing matrix projected onto
(approximately) doubly-stochastic matrices by Sinkhorn-Knopp. The sub-layer sees
``Σ_j pre_j X_j``; its output z is written back as ``X'_k = post_k·z + Σ_j C[j,k]·X_j``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4_jax.config import Config
from dsv4_jax.model.layers import RMSNorm, param
from dsv4_jax.model.ops import rms_norm

F32 = jnp.float32


class MHC(nnx.Module):
    """The mixing parameters of one mHC-wrapped sub-layer (§4): ``fn`` [(2+n)·n, n·D] projects
    the flattened streams to pre (n), post (n) and comb (n×n) logits; ``base`` and ``scale``."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs, rows: int | None = None, nscale: int = 3):
        n, d = cfg.hc_mult, cfg.hidden_size
        rows = cfg.hc_dim if rows is None else rows
        self.fn = param(rngs, (rows, n * d), F32, (None, "hc_in"), "linear")
        self.base = param(rngs, (rows,), F32, (None,), "normal")
        self.scale = param(rngs, (nscale,), F32, (None,), "scale")

    def __call__(self, x: jax.Array, norm: RMSNorm, f, cfg: Config):
        """``f`` wrapped by mHC on streams x [B,T,n,D]: ``hc_sublayer``."""
        return hc_sublayer(x, self, norm, f, cfg)


class HCHead(MHC):
    """The final collapse of the streams (§3): ``fn`` [n, n·D], ``base`` [n], ``scale`` [1]."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        super().__init__(cfg, rngs, rows=cfg.hc_mult, nscale=1)

    def __call__(self, x: jax.Array, cfg: Config) -> jax.Array:
        return hc_head(x, self.fn[...], self.base[...], self.scale[...], cfg)


def _project(x: jax.Array, fn: jax.Array, eps: float) -> jax.Array:
    """``(u @ fnᵀ)·rsqrt(mean(u²)+eps)`` with u = flatten(X) in fp32: f32[B,T,rows]."""
    u = x.reshape(*x.shape[:-2], -1).astype(F32)  # f32[B,T,n*D]
    rho = jax.lax.rsqrt(jnp.mean(u * u, axis=-1, keepdims=True) + eps)
    return jnp.einsum("...i,oi->...o", u, fn.astype(F32), preferred_element_type=F32) * rho


def sinkhorn(logits: jax.Array, iters: int, eps: float) -> jax.Array:
    """Row softmax + eps, then one column normalisation and ``iters-1`` row+column rounds (§4.5).

    ``logits``: f32[..., n, n] with rows indexed by the source stream j.
    """
    c = jax.nn.softmax(logits, axis=-1) + eps
    c = c / (jnp.sum(c, axis=-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        c = c / (jnp.sum(c, axis=-1, keepdims=True) + eps)
        c = c / (jnp.sum(c, axis=-2, keepdims=True) + eps)
    return c


def hc_weights(x: jax.Array, fn, base, scale, cfg: Config):
    """pre f32[B,T,n], post f32[B,T,n], comb f32[B,T,n,n] for one sub-layer (§4 steps 1-5)."""
    n = cfg.hc_mult
    a = _project(x, fn, cfg.rms_norm_eps)  # f32[B,T,(2+n)*n]
    base = base.astype(F32)
    scale = scale.astype(F32)
    pre = jax.nn.sigmoid(scale[0] * a[..., :n] + base[:n]) + cfg.hc_eps
    post = 2.0 * jax.nn.sigmoid(scale[1] * a[..., n : 2 * n] + base[n : 2 * n])
    m = scale[2] * a[..., 2 * n :] + base[2 * n :]
    comb = sinkhorn(m.reshape(*m.shape[:-1], n, n), cfg.hc_sinkhorn_iters, cfg.hc_eps)
    return pre, post, comb


def collapse(x: jax.Array, pre: jax.Array) -> jax.Array:
    """``Σ_j pre_j X_j`` in fp32, cast to the stream dtype: [B,T,D]."""
    return jnp.einsum("...n,...nd->...d", pre, x.astype(F32)).astype(x.dtype)


def expand(x: jax.Array, z: jax.Array, post: jax.Array, comb: jax.Array) -> jax.Array:
    """``X'_k = post_k·z + Σ_j C[j,k]·X_j``: the new stream k sums over C's *row* index (§4.7).

    ``post`` and ``comb`` stay fp32 and the mix runs in fp32, cast to the stream dtype once at
    the end, as the reference's ``hc_post`` does. Rounding them to bf16 first (what the HF port
    does) perturbs every stream of every layer by a second bf16 rounding: docs/PERF.md
    "bf16 numerics" measures it.
    """
    mixed = jnp.einsum("...jk,...jd->...kd", comb.astype(F32), x.astype(F32), preferred_element_type=F32)
    out = post.astype(F32)[..., None] * z[..., None, :].astype(F32) + mixed  # f32[B,T,n,D]
    return out.astype(x.dtype)


def hc_sublayer(x: jax.Array, hc: MHC, norm: RMSNorm, f, cfg: Config):
    """One mHC-wrapped sub-layer: weights → collapse → ``f(RMSNorm(x_in))`` → expand.

    ``f`` maps the normed input [B,T,D] to ``(z, aux)``; returns ``(X', aux)``.
    """
    pre, post, comb = hc_weights(x, hc.fn[...], hc.base[...], hc.scale[...], cfg)
    z, aux = f(rms_norm(collapse(x, pre), norm.weight[...], cfg.rms_norm_eps))
    return expand(x, z, post, comb), aux


def hc_head(x: jax.Array, fn, base, scale, cfg: Config) -> jax.Array:
    """Final collapse (§3): ``Σ_j (sigmoid(a_j·scale + base_j) + eps)·X_j``, not renormalised."""
    a = _project(x, fn, cfg.rms_norm_eps)  # f32[B,T,n]
    p = jax.nn.sigmoid(a * scale.astype(F32)[0] + base.astype(F32)) + cfg.hc_eps
    return collapse(x, p)
