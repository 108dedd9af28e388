"""The plain (non-speculative) step's device functions: fused, or split at the logits.

* ``fused``: forward → sample → count, one jitted call. The default, and the only path of a
  group whose rows the host has nothing more to say about.
* ``last_logits`` then ``sample_rows``: two jitted calls with the logits left on device
  between them, for groups with **grammar-constrained** rows. A row's mask for token t+1
  depends on token t, so computing it before dispatching the step would idle the device
  for the mask time; split, the host fills the masks (llguidance, engine/constraints.py)
  while the device runs the forward, and the sampler reads them (ENGINE.md "Constrained
  decoding").
* ``logits_and_prompt_logprobs`` then ``sample_rows``: a group with a **prompt-logprobs**
  chunk also needs the logits of every chunk position, not only the last. They are computed
  in blocks of ``PROMPT_LP_BLOCK`` positions (``lax.map``), so the temporaries stay at
  ``B · block · V`` floats however long the chunk, and only each position's logprob of the
  next prompt token and its top-n leave the device.

The sampled token's logits are the same computation on every path (the final streams at each
row's last valid token through the head), so a request's tokens do not depend on which path
its batch took.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsv4_jax.engine.runner import sampling
from dsv4_jax.model.transformer import forward, forward_streams, main_logits
from dsv4_jax.parallel import slots as slot_tables

PROMPT_LP_BLOCK = 128  # chunk positions whose full logits exist at once (prompt logprobs)


class PromptLogprobs(NamedTuple):
    """Per chunk position p of each row: the logprob of the token at p+1 (raw distribution)."""

    logprob: jax.Array  # f32[B,T]
    top_ids: jax.Array  # i32[B,T,n]
    top_logprobs: jax.Array  # f32[B,T,n]


def last_logits(params, state, tokens, positions, meta, *, cfg, opts, cache, placement):
    """Logits f32[B,V] at each row's last valid token, and the advanced state."""
    logits, state = forward(
        params, tokens, positions, state, meta, cfg=cfg, opts=opts, cache=cache, last_only=True
    )
    return logits[:, 0], placement.pin_state(state)


def sample_rows(counts, pmask, logits, slots, sa, sample_mask, *, placement, layout, num_logprobs):
    """Sample every row (``sampling.sample``) and count the sampled tokens of ``sample_mask`` rows."""
    res = sampling.sample(
        logits,
        sa,
        slot_tables.take_slot_rows(counts, slots, layout),
        slot_tables.take_slot_rows(pmask, slots, layout),
        num_logprobs=num_logprobs,
    )
    counts, pmask = slot_tables.scatter_slots(
        sampling.update_counts,
        (counts, pmask),
        slots,
        res.tokens,
        jnp.zeros_like(sample_mask),
        sample_mask,
        layout=layout,
    )
    return placement.replicate(res), *placement.pin_tables(counts, pmask)


def fused(
    params, state, counts, pmask, tokens, positions, meta, sa, sample_mask, *, cfg, opts, cache, placement,
    num_logprobs,
):  # fmt: skip
    logits, state = last_logits(
        params, state, tokens, positions, meta, cfg=cfg, opts=opts, cache=cache, placement=placement
    )
    res, counts, pmask = sample_rows(
        counts, pmask, logits, meta.slots, sa, sample_mask,
        placement=placement, layout=opts.layout, num_logprobs=num_logprobs,
    )  # fmt: skip
    return res, state, counts, pmask


def logits_and_prompt_logprobs(
    params, state, tokens, positions, meta, next_token, *, cfg, opts, cache, placement, num_top
):  # fmt: skip
    """``last_logits`` plus ``PromptLogprobs`` of every chunk position. ``next_token`` i32[B]:
    the token after each row's chunk where the host knows it (a prompt continues), else −1
    (that position's entry is then meaningless and the host drops it)."""
    x, state = forward_streams(params, tokens, positions, cfg, opts, state, meta, cache)  # [B,T,n,D]
    b, t = tokens.shape
    last = jnp.maximum(meta.lengths - 1, 0)
    logits = main_logits(params, jnp.take_along_axis(x, last[:, None, None, None], axis=1), cfg)[:, 0]
    nxt = jnp.concatenate([tokens[:, 1:], jnp.maximum(next_token, 0)[:, None]], axis=1)  # i32[B,T]
    nxt = jnp.where(jnp.arange(t)[None] == last[:, None], jnp.maximum(next_token, 0)[:, None], nxt)
    blk = min(t, PROMPT_LP_BLOCK)  # t is a power of two, so blk divides it
    xs = jnp.swapaxes(x.reshape(b, t // blk, blk, *x.shape[2:]), 0, 1)  # [nb,B,blk,n,D]
    ns = jnp.swapaxes(nxt.reshape(b, t // blk, blk), 0, 1)  # [nb,B,blk]

    def one(args):
        xb, nb = args
        lg = main_logits(params, xb, cfg)  # f32[B,blk,V]
        lse = jax.nn.logsumexp(lg, axis=-1)
        lp = jnp.take_along_axis(lg, nb[..., None], axis=-1)[..., 0] - lse
        if num_top:
            tv, ti = jax.lax.top_k(lg, num_top)
            return lp, ti.astype(jnp.int32), tv - lse[..., None]
        return lp, jnp.zeros((*nb.shape, 0), jnp.int32), jnp.zeros((*nb.shape, 0), jnp.float32)

    lp, ti, tl = jax.lax.map(one, (xs, ns))  # [nb,B,blk(,n)]
    out = PromptLogprobs(
        jnp.swapaxes(lp, 0, 1).reshape(b, t),
        jnp.swapaxes(ti, 0, 1).reshape(b, t, -1),
        jnp.swapaxes(tl, 0, 1).reshape(b, t, -1),
    )
    return logits, placement.replicate(out), placement.pin_state(state)
