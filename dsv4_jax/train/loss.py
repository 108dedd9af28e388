"""The demo's training loss: next-token cross-entropy under sparse selection + the indexer KL.

The model trains exactly as it serves: CSA layers attend to the ``index_topk`` entries the
lightning indexer picks (top-k passes no gradient). The indexer cannot learn through that
choice, so it learns as DeepSeek-V3.2's did: a KL loss pulls its distribution
``softmax_s(I[t,s])`` over the visible compressed entries towards the main attention's,
``p[t,s] ∝ Σ_h softmax_s(q[t,h]·c[s]/√K)`` (the same queries and entries, all of them dense,
stop-gradient). The indexer's inputs are detached inside the model (``attention_sequence``
taps), so that loss trains only the indexer and the LM loss only the rest.

Weights are rounded as the checkpoint stores them (FP8 e4m3 with UE8M0 128x128 block scales;
MXFP4 routed experts, one scale per 32 inputs) with a straight-through gradient, so the
quantized checkpoint computes what training saw.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv4_jax.checkpoint import layout, placement
from dsv4_jax.config import Config
from dsv4_jax.model.params import from_native, param_infos, to_native
from dsv4_jax.model.transformer import ModelOptions, forward
from pallas_kernels import mxfp4

F32 = jnp.float32


def is_trainable(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating)


def split(params):
    """(float leaves, the rest) as two native trees (``model.params.to_native``: the checkpoint's
    names, what training and export work on) with ``None`` holes (``tid2eid`` is not trained)."""
    params = to_native(params) if isinstance(params, nnx.State) else params
    return (
        jax.tree.map(lambda x: x if is_trainable(x) else None, params),
        jax.tree.map(lambda x: None if is_trainable(x) else x, params),
    )


def merge(a, b):
    return jax.tree.map(lambda u, v: v if u is None else u, a, b, is_leaf=lambda x: x is None)


def storage_formats(cfg: Config):
    """A tree like the params whose leaves are ``(fmt, block)`` as the checkpoint stores them."""
    infos = param_infos(cfg, jnp.float32, include_mtp=True)
    names = placement.leaf_names(infos)
    return jax.tree.map(lambda n: layout.leaf_format(n, cfg), names)


def _round_blocks(w, block, qmax: float, floor: float, qdtype):
    """Round w [..., O, I] to ``qdtype`` with a power-of-two scale per (bo, bi) block (quant.py's rule)."""
    *lead, o, i = w.shape
    bo, bi = block
    if o % bo or i % bi:
        raise ValueError(f"fake-quant: shape {w.shape} is not a multiple of the block {block}")
    wb = w.reshape(*lead, o // bo, bo, i // bi, bi)
    s = mxfp4.pow2(mxfp4.pow2_exponent(jnp.max(jnp.abs(wb), axis=(-3, -1), keepdims=True), qmax, floor))
    q = jnp.clip(wb / s, -qmax, qmax).astype(qdtype).astype(F32) * s
    return q.reshape(w.shape)


def fake_quant(w, fmt_block):
    """``w`` rounded to its storage format, straight-through gradient."""
    fmt, block = fmt_block
    if fmt == "fp8":
        q = _round_blocks(w, block, 448.0, 1e-4, jnp.float8_e4m3fn)
    elif fmt == "mxfp4":
        q = _round_blocks(w, block, 6.0, 6.0 * 2.0**-126, jnp.float4_e2m1fn)
    else:
        return w
    return w + jax.lax.stop_gradient(q - w)


def _entry_attention(tap: dict, positions) -> tuple[jax.Array, jax.Array]:
    """(visible bool[B,T,C], the main attention's softmax over the visible compressed entries
    f32[B,T,H,C]): the same queries and entries the CSA layer used, without the window and sink.
    A query that sees no entry gets a uniform row; callers mask it out."""
    q, entries, ratio = tap["q"], tap["entries"], tap["ratio"]
    c = entries.shape[1]
    visible = jnp.arange(c)[None, None, :] < ((positions + 1) // ratio)[..., None]  # [B,T,C]
    logits = jnp.einsum("bthk,bck->bthc", q.astype(F32), entries.astype(F32)) * q.shape[-1] ** -0.5
    return visible, jax.nn.softmax(jnp.where(visible[:, :, None, :], logits, -1e30), axis=-1)


def indexer_kl(tap: dict, positions) -> jax.Array:
    """Mean over queries (that see at least one entry) of KL(p_attention ‖ softmax(indexer scores))."""
    visible, attn = _entry_attention(tap, positions)
    has = visible.any(-1)  # [B,T]
    p = attn.sum(2)  # Σ over heads
    p = jax.lax.stop_gradient(p / p.sum(-1, keepdims=True))
    logq = jax.nn.log_softmax(jnp.where(visible, tap["scores"], -jnp.inf), axis=-1)
    kl = jnp.where(visible, p * (jnp.log(jnp.maximum(p, 1e-30)) - jnp.where(visible, logq, 0.0)), 0.0).sum(-1)
    return jnp.sum(jnp.where(has, kl, 0.0)) / jnp.maximum(has.sum(), 1)


def retrieval_hint(tap: dict, positions, answer_mask, source_mask) -> jax.Array:
    """Mean over answer positions of −log(the main attention's mass on the CSA entries that
    hold the needle's value), the attention taken over the visible compressed entries and
    averaged over heads.

    An auxiliary loss for the first needle phases only: the answer's cross-entropy alone
    gives the query→entry match a gradient proportional to the (at first ~1/C) weight the
    needle's entry already has, and on this machine's budget that plateau did not end (docs/
    NEEDLE.md). Pointing the attention at the entry makes the value readout learnable at once;
    the match itself is still computed from content at inference (nothing here runs when
    serving), and the lightning indexer learns it from the attention by its KL.

    ``source_mask`` f32[B,T]: 1 where the value token sits (the needle's, earlier answers').
    Entry e of an overlapping CSA compressor covers tokens [ratio·(e−1), ratio·(e+1)).
    """
    ratio = tap["ratio"]
    b, c = tap["entries"].shape[:2]
    visible, attn = _entry_attention(tap, positions)
    p = attn.mean(2)  # [B,T,C]
    blk = source_mask[:, : c * ratio].reshape(b, c, ratio).max(-1) > 0  # [B,C]
    holds = blk | jnp.pad(blk[:, :-1], ((0, 0), (1, 0)))  # entry e holds block e or e-1
    target = visible & holds[:, None, :]
    mass = jnp.sum(jnp.where(target, p, 0.0), -1)
    valid = answer_mask * target.any(-1)
    return -jnp.sum(jnp.log(mass + 1e-9) * valid) / jnp.maximum(valid.sum(), 1.0)


def make_loss(
    cfg: Config,
    frozen,
    formats,
    opts: ModelOptions | None = None,
    kl_weight: float = 1.0,
    hint_weight: float = 0.0,
):
    """``loss(trainable, tokens, text_mask, answer_mask, source_mask) -> (total, metrics)``.

    ``tokens`` i32[B,L+1]; masks f32[B,L] (``data.train_batch``). Total = mean natural-text CE
    + mean answer CE + ``kl_weight`` · mean indexer KL over the CSA layers + ``hint_weight`` ·
    the retrieval hint (``retrieval_hint``; 0 switches it off).
    """

    def loss(trainable, tokens, text_mask, answer_mask, source_mask):
        params = jax.tree.map(
            lambda w, f: w if w is None else fake_quant(w, f),
            trainable,
            formats,
            is_leaf=lambda x: x is None,
        )
        params = merge(params, frozen)
        inp, tgt = tokens[:, :-1], tokens[:, 1:]
        positions = jnp.broadcast_to(jnp.arange(inp.shape[1], dtype=jnp.int32), inp.shape)
        taps: list = []
        logits, _ = forward(
            from_native(cfg, params), inp, positions, cfg=cfg, opts=opts or ModelOptions(), taps=taps
        )
        ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tgt[..., None], -1)[..., 0]
        lm = jnp.sum(ce * text_mask) / jnp.maximum(text_mask.sum(), 1.0)
        ans = jnp.sum(ce * answer_mask) / jnp.maximum(answer_mask.sum(), 1.0)
        kl = sum((indexer_kl(t, positions) for t in taps), jnp.zeros((), F32)) / max(len(taps), 1)
        hint = jnp.zeros((), F32)
        if hint_weight:
            hint = sum(retrieval_hint(t, positions, answer_mask, source_mask) for t in taps) / max(
                len(taps), 1
            )
        hit = jnp.sum((jnp.argmax(logits, -1) == tgt) * answer_mask) / jnp.maximum(answer_mask.sum(), 1.0)
        total = lm + ans + kl_weight * kl + hint_weight * hint
        return total, {"lm": lm, "answer": ans, "kl": kl, "hint": hint, "answer_acc": hit}

    return loss


def quantized_float_params(params, formats):
    """The float values the checkpoint will hold (each leaf rounded to its storage format)."""
    return jax.tree.map(
        lambda w, f: np.asarray(fake_quant(w, f)) if is_trainable(w) else np.asarray(w), params, formats
    )
