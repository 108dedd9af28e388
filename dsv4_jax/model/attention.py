"""DeepSeek-V4 attention (ARCHITECTURE.md §5): q-LoRA queries, one shared K=V head
(MQA, head dim 512 with RoPE on the last 64), a per-head sink, and a grouped low-rank
output projection; plus, per layer kind, compressed entries (CSA: top-k chosen by the
lightning indexer; HCA: every visible entry).

The core is one softmax per (query, head) over the union of *key segments* and the
sink logit. A segment is either shared by all queries of a sequence (keys [B,S,K]
with a visibility mask [B,T,S]: the window rows, HCA entries) or gathered per query
(keys [B,T,k,K] with validity [B,T,k]: CSA's top-k rows). The same core serves the
full forward here and the incremental state path.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4_jax.config import Config
from dsv4_jax.intmath import cdiv
from dsv4_jax.model import compressor, indexer, ops
from dsv4_jax.model.compressor import Compressor
from dsv4_jax.model.indexer import Indexer
from dsv4_jax.model.layers import Linear, RMSNorm, dense, param, value

F32 = jnp.float32


class Attention(nnx.Module):
    """One layer's attention (§5): q-LoRA (``wq_a`` → ``q_norm`` → ``wq_b``), the shared K=V
    row (``wkv`` → ``kv_norm``), the grouped output (``wo_a`` [G·R, (H/G)·K], ``wo_b``), the
    per-head ``attn_sink``; a ``compressor`` in CSA / HCA layers and an ``indexer`` in CSA ones."""

    def __init__(self, cfg: Config, layer: int, dtype, rngs: nnx.Rngs):
        d, h, k = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        g, r = cfg.o_groups, cfg.o_lora_rank
        self.wq_a = Linear(cfg.q_lora_rank, d, dtype, ("q_lora", "embed"), rngs)
        self.q_norm = RMSNorm(cfg.q_lora_rank, "q_lora", rngs)
        self.wq_b = Linear(h * k, cfg.q_lora_rank, dtype, ("q_heads", "q_lora"), rngs)
        self.wkv = Linear(k, d, dtype, ("head_dim", "embed"), rngs)
        self.kv_norm = RMSNorm(k, "head_dim", rngs)
        # group g maps heads g·H/G.. to rows g·o_lora.. (§5.1)
        self.wo_a = Linear(g * r, h * k // g, dtype, ("o_lora", "o_group_in"), rngs)
        self.wo_b = Linear(d, g * r, dtype, ("embed", "o_lora"), rngs)
        self.attn_sink = param(rngs, (h,), F32, ("heads",), "normal")
        kind = cfg.attn_kind(layer)
        self.compressor = Compressor(cfg, cfg.compress_ratio(layer), k, rngs) if kind != "swa" else None
        self.indexer = Indexer(cfg, cfg.compress_ratio(layer), dtype, rngs) if kind == "csa" else None


class Segment(NamedTuple):
    """Keys (= values) and which of them each query may see.

    ``keys``: [B,S,K] shared by the sequence's queries, or [B,T,k,K] per query.
    ``mask``: bool[B,T,S] or bool[B,T,k] respectively.
    ``band`` > 0 (``window_segment``): ``keys`` [B,T,K] are the queries' own rows and query
    t sees only the 2·band rows of its block of ``band`` rows and the block before;
    ``mask`` bool[B,T,2·band] says which of those. Logits cost T·2·band, not T².
    """

    keys: jax.Array
    mask: jax.Array
    band: int = 0


def _blocked(x: jax.Array, band: int, front: int = 0, fill=0) -> jax.Array:
    """[B,T,...] → [B,nb,band,...]: T padded at the end to nb·band (and ``front`` blocks before)."""
    t = x.shape[1]
    nb = cdiv(t, band)
    pad = [(0, 0)] * x.ndim
    pad[1] = (front * band, nb * band - t)
    x = jnp.pad(x, pad, constant_values=fill)
    return x.reshape(x.shape[0], nb + front, band, *x.shape[2:])


def _band_rows(x: jax.Array, band: int, fill=0) -> jax.Array:
    """[B,T,...] → [B,nb,2·band,...]: for each block of queries, the rows of the block before it
    (fill before the first) then its own."""
    xb = _blocked(x, band, front=1, fill=fill)
    return jnp.concatenate([xb[:, :-1], xb[:, 1:]], axis=2)


def window_segment(kv: jax.Array, positions: jax.Array, window: int) -> Segment:
    """The sliding-window segment of a full-sequence forward over its own rows ``kv`` [B,T,K].

    Short sequences take the dense [B,T,T] mask. Past 4 windows the keys are read in bands
    (``Segment.band`` = window): the window of a query in block j lies in blocks j−1 and j, so
    logits cost T·2·window instead of T², which is what lets training run at 8K+ tokens.
    Positions must be consecutive along T (a sequence from its first token), as here.
    """
    t = kv.shape[1]
    if t <= 4 * window:
        return Segment(kv, window_mask(positions, positions, window))
    qpos = _blocked(positions, window, fill=-1)  # i32[B,nb,W]
    kpos = _band_rows(positions, window, fill=-(2**30))  # i32[B,nb,2W]
    d = qpos[..., None] - kpos[:, :, None, :]
    mask = (d >= 0) & (d < window)  # [B,nb,W,2W]
    return Segment(kv, mask.reshape(kv.shape[0], -1, 2 * window)[:, :t], window)


def attend(q: jax.Array, segments: list[Segment], sink: jax.Array) -> jax.Array:
    """``o = Σ_j softmax_j(q·kv_j/√K ‖ sink)·kv_j`` over all segments (§5.1): [B,T,H,K].

    The sink is an extra logit per head whose value is zero: it only enlarges the
    denominator. Logits and softmax in fp32.
    """
    scale = q.shape[-1] ** -0.5
    logits, values = [], []
    for seg in segments:
        if seg.band:  # the queries' own rows, read in bands
            qb = _blocked(q, seg.band)  # [B,nb,W,H,K]
            s = jnp.einsum(
                "bnwhk,bnsk->bnwhs",
                qb,
                _band_rows(seg.keys.astype(q.dtype), seg.band),
                preferred_element_type=F32,
            )
            s = s.reshape(s.shape[0], -1, *s.shape[3:])[:, : q.shape[1]]  # [B,T,H,2W]
        elif seg.keys.ndim == 3:  # shared keys [B,S,K]
            s = jnp.einsum("bthk,bsk->bths", q, seg.keys.astype(q.dtype), preferred_element_type=F32)
        else:  # per-query keys [B,T,k,K]
            s = jnp.einsum("bthk,btjk->bthj", q, seg.keys.astype(q.dtype), preferred_element_type=F32)
        logits.append(jnp.where(seg.mask[:, :, None, :], s * scale, -jnp.inf))
        values.append(seg.keys)
    b, t, h, _ = q.shape
    sink_col = jnp.broadcast_to(sink.astype(F32)[None, None, :, None], (b, t, h, 1))
    probs = jax.nn.softmax(jnp.concatenate(logits + [sink_col], axis=-1), axis=-1)
    out = jnp.zeros(q.shape, F32)
    start = 0
    for seg, v in zip(segments, values):
        n = seg.mask.shape[-1]
        pr = probs[..., start : start + n]
        if seg.band:
            o = jnp.einsum(
                "bnwhs,bnsk->bnwhk",
                _blocked(pr, seg.band),
                _band_rows(v.astype(F32), seg.band),
                preferred_element_type=F32,
            )
            out = out + o.reshape(o.shape[0], -1, *o.shape[3:])[:, : q.shape[1]]
        elif v.ndim == 3:
            out = out + jnp.einsum("bths,bsk->bthk", pr, v.astype(F32), preferred_element_type=F32)
        else:
            out = out + jnp.einsum("bthj,btjk->bthk", pr, v.astype(F32), preferred_element_type=F32)
        start += n
    return out.astype(q.dtype)


def project_q(x, p: Attention, positions, cfg: Config, compressed: bool, *, sim_quant: bool = False):
    """``c_q`` [B,T,q_lora] (also the indexer's query input) and roped per-head-normed q [B,T,H,K]."""
    b, t, _ = x.shape
    c_q = ops.rms_norm(
        ops.linear(x, p.wq_a.weight, quant_act=sim_quant), p.q_norm.weight[...], cfg.rms_norm_eps
    )
    q = ops.linear(c_q, p.wq_b.weight, quant_act=sim_quant)
    q = ops.rms_norm(q.reshape(b, t, -1, cfg.head_dim), None, cfg.rms_norm_eps)  # H: all, or a shard's heads
    cos, sin = ops.rope_angles(positions, ops.rope_inv_freq(cfg, compressed))
    return c_q, ops.apply_rope(q, cos[:, :, None], sin[:, :, None])


def project_kv(x, p: Attention, positions, cfg: Config, compressed: bool, *, sim_quant: bool = False):
    """The shared K=V row of each token, normed and roped at its own position: [B,T,K]."""
    kv = ops.rms_norm(
        ops.linear(x, p.wkv.weight, quant_act=sim_quant), p.kv_norm.weight[...], cfg.rms_norm_eps
    )
    cos, sin = ops.rope_angles(positions, ops.rope_inv_freq(cfg, compressed))
    kv = ops.apply_rope(kv, cos, sin)
    if sim_quant:
        kv = ops.fp8_sim_nope(kv, cfg.qk_rope_head_dim)
    return kv


def output_proj(o, p: Attention, positions, cfg: Config, compressed: bool, *, sim_quant: bool = False):
    """Inverse RoPE at the query position, then the grouped low-rank projection (§5.1): [B,T,D]."""
    b, t, h, k = o.shape
    cos, sin = ops.rope_angles(positions, ops.rope_inv_freq(cfg, compressed))
    o = ops.apply_rope(o, cos[:, :, None], sin[:, :, None], inverse=True)
    g = (
        value(p.wo_a.weight).shape[0] // cfg.o_lora_rank
    )  # all groups, or a tensor shard's (then y is partial)
    wo_a = dense(p.wo_a.weight, o.dtype).reshape(g, cfg.o_lora_rank, h * k // g)  # [G,R,(H/G)·K]
    u = jnp.einsum("btgi,gri->btgr", o.reshape(b, t, g, h * k // g), wo_a, preferred_element_type=F32).astype(
        o.dtype
    )
    return ops.linear(u.reshape(b, t, g * cfg.o_lora_rank), p.wo_b.weight, quant_act=sim_quant)


def window_mask(q_pos: jax.Array, k_pos: jax.Array, window: int) -> jax.Array:
    """bool[B,T,S]: key position in ``[q − window + 1, q]`` (128 rows including the query)."""
    d = q_pos[:, :, None] - k_pos[:, None, :]
    return (d >= 0) & (d < window)


def attention_sequence(
    x, positions, p: Attention, layer: int, cfg: Config, *, sim_quant: bool = False, taps: list | None = None
):
    """Full-sequence attention for one layer (sequences start at position 0): [B,T,D].

    ``x`` [B,T,D] is the normed sub-layer input, ``positions`` i32[B,T].

    ``taps`` (training only, ``dsv4_jax.train``): a CSA layer appends what the indexer's KL
    loss needs: the indexer scores f32[B,T,C] (computed from stop-gradient inputs, so that
    loss trains the indexer alone, as in DeepSeek-V3.2), the main queries q [B,T,H,K] and
    the compressed entries [B,C,K]. Values are unchanged: top-k passes no gradient anyway.
    """
    kind = cfg.attn_kind(layer)
    compressed = kind != "swa"
    c_q, q = project_q(x, p, positions, cfg, compressed, sim_quant=sim_quant)
    kv = project_kv(x, p, positions, cfg, compressed, sim_quant=sim_quant)
    segments = [window_segment(kv, positions, cfg.sliding_window)]
    if compressed:
        ratio = cfg.compress_ratio(layer)
        with jax.named_scope("compressor"):
            entries = compressor.compress_sequence(x, p.compressor, ratio, cfg, sim_quant=sim_quant)
        if kind == "hca":
            visible = (positions + 1) // ratio
            mask = jnp.arange(entries.shape[1])[None, None, :] < visible[..., None]
            segments.append(Segment(entries, mask))
        elif entries.shape[1] > 0:
            with jax.named_scope("indexer"):
                ip = p.indexer
                keys = compressor.compress_sequence(
                    x, ip.compressor, ratio, cfg, indexer=True, sim_quant=sim_quant
                )
                if taps is None:
                    idx = indexer.indexer_topk(x, c_q, positions, keys, ip, ratio, cfg, sim_quant=sim_quant)
                else:
                    sg = jax.lax.stop_gradient
                    keys = compressor.compress_sequence(
                        sg(x), ip.compressor, ratio, cfg, indexer=True, sim_quant=sim_quant
                    )
                    qi, wi = indexer.index_queries(sg(x), sg(c_q), positions, ip, cfg, sim_quant=sim_quant)
                    scores = indexer.index_scores(qi, wi, keys)
                    idx = indexer.select_topk(scores, positions, ratio, cfg.index_topk)
                    taps.append({"scores": scores, "q": q, "entries": entries, "ratio": ratio})
            rows = jax.vmap(lambda e, i: e[jnp.maximum(i, 0)])(entries, idx)  # [B,T,k,K]
            segments.append(Segment(rows, idx >= 0))
    with jax.named_scope("core"):
        o = attend(q, segments, p.attn_sink[...])
    return output_proj(o, p, positions, cfg, compressed, sim_quant=sim_quant)
