"""MTP speculative decoding on device: verify a row's drafts, emit the accepted prefix plus one
token, advance the MTP block's window and draft the next step's tokens, in one jitted step
(ARCHITECTURE.md §7; docs/ENGINE.md "MTP speculative decoding").

A row of a speculative step is ``[known tokens ‖ drafts]``: the first ``commit`` tokens are
the sequence's (the tokens emitted by the step before, not yet in the state), the last
``n_drafts`` are the MTP's guesses for the positions after them. The main model runs the
whole row as one chunk; only the known tokens enter the SWA rings and compressor tails
(``StepMeta.commit``), so a rejected draft leaves nothing behind that a later step reads.
Whatever a step accepts is written by the next one, as the known head of its row: the
replay costs the accepted tokens' compute once more, and makes rollback exact by
construction (no scratch rows, no restore).

**Verification is sampling.** Position ``j`` of the row's last ``n_drafts + 1`` is sampled
exactly as a non-speculative decode would sample it: the same logits (the state and every
earlier token are the same), the same penalty counts (the counts plus drafts ``< j``, which
equal the emitted tokens wherever ``j`` is reached), the same uniform
(``fold_in(key(seed), sample_index + j)``). Draft ``j`` is accepted when that sample equals
it; the first position whose sample differs emits its sample and ends the row. With a
one-hot draft distribution (the MTP proposes its argmax, as vLLM's and SGLang's MTP
proposers do) this is standard rejection sampling: a draft ``d`` is accepted with
probability ``p(d)``, and a rejection emits a token drawn from ``p`` without ``d``,
renormalised, which is ``norm(max(0, p − q))``. Because the randomness is the
non-speculative path's own, a seeded request emits the same tokens at every draft depth and
under any load, greedy rows included.

**Drafting.** The MTP block at position i reads the main model's final streams at i and the
token at i+1 (zero embedding at position 0) and predicts the token at i+2. Every step writes
its window rows for each position whose next token is now known: the known head of the
row, the accepted drafts and the emitted token (``lm`` rows), from the main streams of this
very step. Its last row predicts the first draft; each further draft runs the block again
over the drafts so far with its own output streams in place of the main ones (read-only:
``commit = 0``), as the reference feeds them back.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsv4_jax.engine.runner import sampling
from dsv4_jax.model import state as kvc
from dsv4_jax.model.transformer import forward_streams, main_logits, mtp_logits, mtp_streams
from dsv4_jax.parallel import slots as slot_tables


class SpecResult(NamedTuple):
    """What a speculative step returns per row (on device; one transfer per group)."""

    tokens: jax.Array  # i32[B,K+1]: the sample at each verified position; the first a+1 are emitted
    accepted: jax.Array  # i32[B]: drafts accepted (a)
    logprob: jax.Array  # f32[B,K+1]: raw-distribution logprob of each sample
    top_ids: jax.Array  # i32[B,K+1,n]
    top_logprobs: jax.Array  # f32[B,K+1,n]
    drafts: jax.Array  # i32[B,k_draft]: the MTP's drafts for the next step


def _repeat_rows(tree, k: int):
    """Each leading-axis row of every leaf ``k`` times, in place ([B,...] -> [B·k,...])."""
    return jax.tree.map(lambda a: jnp.repeat(a, k, axis=0), tree)


def verify(logits, tokens, commit, n_drafts, sa, counts, pmask, *, num_logprobs: int):
    """Sample every verified position and count the accepted drafts (module doc).

    ``logits`` f32[B,K+1,V] at positions ``commit−1 .. commit−1+K`` of each row, ``tokens``
    i32[B,T] the step's tokens (drafts at ``commit .. commit+n_drafts−1``), ``counts`` /
    ``pmask`` [B,V] the rows' penalty tables. Returns (``SampleResult`` over B·(K+1) rows,
    samples i32[B,K+1], accepted i32[B])."""
    b, k1, v = logits.shape
    j = jnp.arange(k1)
    t = tokens.shape[1]
    drafts = jnp.take_along_axis(tokens, jnp.clip(commit[:, None] + j[None, :-1], 0, t - 1), axis=1)  # [B,K]
    is_draft = j[None, :-1] < n_drafts[:, None]  # bool[B,K]
    # penalty counts at position j: the row's counts plus the drafts before j
    hot = jax.nn.one_hot(drafts, v, dtype=counts.dtype) * is_draft[..., None]  # [B,K,V]
    before = jnp.concatenate([jnp.zeros((b, 1, v), hot.dtype), jnp.cumsum(hot, axis=1)], axis=1)  # [B,K+1,V]
    counts_j = (counts[:, None] + before).reshape(b * k1, v)
    sa_j = _repeat_rows(sa, k1)._replace(sample_index=(sa.sample_index[:, None] + j).reshape(-1))
    res = sampling.sample(
        logits.reshape(b * k1, v),
        sa_j,
        counts_j,
        jnp.repeat(pmask, k1, axis=0),
        num_logprobs=num_logprobs,
    )
    samples = res.tokens.reshape(b, k1)
    match = (samples[:, :-1] == drafts) & is_draft
    accepted = jnp.sum(jnp.cumprod(match.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)
    return res, samples, accepted


def step(
    params,
    state,
    counts,
    pmask,
    tokens,  # i32[B,T]
    positions,  # i32[B,T]
    meta: kvc.StepMeta,  # with ``commit``
    sa: sampling.SamplingArrays,
    sample_mask,  # bool[B]: rows that emit tokens
    n_drafts,  # i32[B]: draft tokens at the end of each row
    next_token,  # i32[B]: for rows that do not sample, the token after the chunk (-1: none)
    *,
    cfg,
    opts,
    cache: kvc.CacheConfig,
    placement,
    num_logprobs: int,
    k_verify: int,
    k_draft: int,
):
    """One speculative step (module doc): ``(SpecResult, state, counts, pmask)``."""
    b, t = tokens.shape
    lay = opts.layout
    commit = meta.commit
    with jax.named_scope("verify"):
        x, state = forward_streams(params, tokens, positions, cfg, opts, state, meta, cache)  # [B,T,n,D]
        at = jnp.clip(commit[:, None] - 1 + jnp.arange(k_verify + 1)[None], 0, t - 1)  # i32[B,K+1]
        xv = jnp.take_along_axis(x, at[:, :, None, None], axis=1)  # [B,K+1,n,D]
        logits = main_logits(params, xv, cfg)  # f32[B,K+1,V]
        res, samples, accepted = verify(
            logits,
            tokens,
            commit,
            n_drafts,
            sa,
            slot_tables.take_slot_rows(counts, meta.slots, lay),
            slot_tables.take_slot_rows(pmask, meta.slots, lay),
            num_logprobs=num_logprobs,
        )
        accepted = jnp.where(sample_mask, accepted, 0)
        emitted = (jnp.arange(k_verify + 1)[None] <= accepted[:, None]) & sample_mask[:, None]  # bool[B,K+1]
        counts, pmask = slot_tables.scatter_slots(
            sampling.update_counts,
            (counts, pmask),
            jnp.repeat(meta.slots, k_verify + 1),
            samples.reshape(-1),
            jnp.zeros((b * (k_verify + 1),), bool),
            emitted.reshape(-1),
            layout=lay,
        )
    bonus = jnp.take_along_axis(samples, accepted[:, None], axis=1)[:, 0]  # i32[B]
    drafts = jnp.zeros((b, k_draft), jnp.int32)
    if cache.mtp_layers:
        with jax.named_scope("draft"):
            state, drafts = _draft(
                params, state, x, tokens, positions, meta, sample_mask, accepted, bonus, next_token,
                cfg=cfg, opts=opts, cache=cache, k_draft=k_draft,
            )  # fmt: skip
    state, counts, pmask = placement.pin(state, counts, pmask)
    out = SpecResult(
        samples,
        accepted,
        res.logprob.reshape(b, -1),
        res.top_ids.reshape(b, k_verify + 1, -1),
        res.top_logprobs.reshape(b, k_verify + 1, -1),
        drafts,
    )
    return placement.replicate(out), state, counts, pmask


def _draft(
    params, state, x, tokens, positions, meta, sample_mask, accepted, bonus, next_token, *, cfg, opts, cache,
    k_draft,
):  # fmt: skip
    """Write the MTP window rows this step made known, then propose ``k_draft`` tokens."""
    b, t = tokens.shape
    commit = meta.commit
    idx = jnp.arange(t)[None]
    # MTP row i needs the token at i+1: the row's own next token, then the emitted one
    lm = jnp.where(sample_mask, commit + accepted, commit - 1 + (next_token >= 0))
    lm = jnp.clip(lm, 0, t)  # i32[B]: MTP rows written (padding rows: none)
    nxt = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), tokens.dtype)], axis=1)  # i32[B,T]
    nxt = jnp.where(sample_mask[:, None] & (idx == lm[:, None] - 1), bonus[:, None], nxt)
    nxt = jnp.where(~sample_mask[:, None] & (idx == commit[:, None] - 1), next_token[:, None], nxt)
    y, state = mtp_streams(
        params,
        x,
        jnp.maximum(nxt, 0),
        positions,
        cfg,
        opts,
        state,
        meta._replace(lengths=lm, commit=lm),
        cache,
    )  # [B,T,n,D]
    if not k_draft:
        return state, jnp.zeros((b, 0), jnp.int32)
    last = jnp.clip(lm - 1, 0, t - 1)
    ys = [jnp.take_along_axis(y, last[:, None, None, None], axis=1)]  # [B,1,n,D] each
    ds = [jnp.argmax(mtp_logits(params, ys[0], cfg)[:, 0], axis=-1).astype(jnp.int32)]
    pos0 = positions[:, 0] + lm  # position of the first draft's MTP row
    for n in range(1, k_draft):  # further drafts: the block over the drafts so far, read-only
        rmeta = meta._replace(lengths=jnp.full((b,), n, jnp.int32), commit=jnp.zeros((b,), jnp.int32))
        pos = pos0[:, None] + jnp.arange(n)[None]
        yr, _ = mtp_streams(
            params, jnp.concatenate(ys, axis=1), jnp.stack(ds, axis=1), pos, cfg, opts, state, rmeta, cache
        )
        ys.append(yr[:, -1:])
        ds.append(jnp.argmax(mtp_logits(params, yr[:, -1:], cfg)[:, 0], axis=-1).astype(jnp.int32))
    return state, jnp.stack(ds, axis=1)
