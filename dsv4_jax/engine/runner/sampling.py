"""Batched, jittable token sampling with per-request reproducibility (OpenAI / vLLM semantics).

Data flow for one step, ``B`` rows (sequences, padded), ``V`` vocab:

1. **Logprobs** come from the model's *raw* distribution, ``log_softmax(logits)`` before any
   penalty, temperature or filter, as vLLM returns them by default: the chosen token's
   logprob and the top-``n`` alternatives (``n = num_logprobs``, static).
2. **Penalties** on the raw logits, in this order: repetition (tokens seen in the prompt or
   the output: ``x > 0 → x / r``, else ``x · r``), frequency (``− f · count_out``),
   presence (``− p · [count_out > 0]``); then the request's **logit bias** (added, OpenAI's
   semantics) and its **grammar mask** (tokens the grammar forbids become ``−inf``; the mask
   is a bitmask, bit ``t % 32`` of word ``t // 32``, as llguidance fills it on the host).
   Both are data, not code: a batch of any grammars and biases runs the same program; only
   whether the batch has any (the arrays' widths, 0 or full) selects a variant.
3. **Greedy** rows (``temperature == 0``) take ``argmax`` of the penalised logits, exactly,
   whatever the rest of the batch does; none of the steps below touch them.
4. **Temperature** divides the penalised logits (after subtracting the row max, so a tiny
   temperature gives ``-inf``/``0``, never ``inf − inf``).
5. **One descending sort per row**; every filter is a mask over sorted ranks, and each keeps a
   *prefix* of the sorted order, so the survivors are a prefix too:
   top-k (``k <= 0`` or ``k >= V`` disables) → top-p over the top-k-renormalised
   distribution (keep a token while the mass strictly before it is ``< top_p``; ``top_p == 1``
   disables) → min-p (keep ``p >= min_p · p_max``; the ratio does not change under
   renormalisation, so its place in the order does not matter; ``0`` disables). Rank 0, the
   argmax, always survives, so a filter never empties the distribution.
6. **Draw** by inverse CDF: one uniform ``u`` per row and the first sorted rank whose running
   mass exceeds ``u · kept_mass``. One random number per row instead of ``V`` Gumbels, and the
   running mass is the cumsum top-p already needed.

Reproducibility: row b's uniform depends only on ``(seed_b, sample_index_b)``:
``fold_in(key(seed_b), sample_index_b)`` with the threefry2x32 generator pinned (the default
impl is a global flag; a flag flip must not change served tokens). The 64-bit request seed
travels as ``u32[B,2]`` = (high word, low word), which is exactly threefry's key data, so the
key equals ``jax.random.key(seed)`` (under x64) for any seed < 2⁶³. Every other step is
row-local, so a request's tokens do not depend on its batch neighbours or position.

Penalty tables live on device per state slot (``output_counts i32[num_slots,V]``,
``prompt_mask bool[num_slots,V]``); the runner gathers rows by slot for ``sample`` and keeps
them current with ``reset_rows`` and ``update_counts`` (scatters over slot indices).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax.engine.sampling_params import SamplingParams

F32 = jnp.float32
PRNG_IMPL = "threefry2x32"  # pinned: served tokens must not depend on jax_default_prng_impl


class SamplingArrays(NamedTuple):
    """Per-row sampling controls as arrays (one row per batch entry; a pytree for jit)."""

    temperature: jax.Array  # f32[B]; 0 = greedy
    top_k: jax.Array  # i32[B]; <= 0 disables
    top_p: jax.Array  # f32[B]; 1 disables
    min_p: jax.Array  # f32[B]; 0 disables
    repetition_penalty: jax.Array  # f32[B]; 1 disables
    presence_penalty: jax.Array  # f32[B]
    frequency_penalty: jax.Array  # f32[B]
    seed: jax.Array  # u32[B,2]: (seed >> 32, seed & 0xFFFFFFFF) = threefry key data
    sample_index: jax.Array  # i32[B]: tokens this request sampled before
    bias_ids: jax.Array  # i32[B,NB]: logit-bias token ids (NB = 0: no row has a bias); padding id 0
    bias_vals: jax.Array  # f32[B,NB]: their biases (padding 0)
    allow: jax.Array  # i32[B,W]: grammar bitmask (W = 0: no row constrained; free rows all ones)


class SampleResult(NamedTuple):
    tokens: jax.Array  # i32[B]
    logprob: jax.Array  # f32[B]: raw-distribution logprob of ``tokens``
    top_ids: jax.Array  # i32[B,n], most likely first
    top_logprobs: jax.Array  # f32[B,n], raw distribution, descending


def mask_words(vocab_size: int) -> int:
    """Words of a row's grammar bitmask."""
    return (vocab_size + 31) // 32


def sampling_arrays(
    params: Sequence[SamplingParams],
    seeds: Sequence[int],
    sample_indices: Sequence[int],
    pad_to: int,
    allow: np.ndarray | None = None,
) -> SamplingArrays:
    """Host-side (numpy) packing of ``len(params)`` rows, padded to ``pad_to`` rows.

    Padded rows are greedy with every penalty and filter off, so whatever logits the model
    produces for padding, they stay finite and cost nothing but an argmax. ``allow``
    i32[pad_to, W]: the grammar bitmasks (None: no row constrained). Logit biases are
    padded to ``SamplingParams.MAX_LOGIT_BIAS`` entries when any row has one, so every
    mix of biases shares one program.
    """
    n = len(params)
    if not len(seeds) == len(sample_indices) == n:
        raise ValueError(f"{len(params)=}, {len(seeds)=}, {len(sample_indices)=} must match")
    if n > pad_to:
        raise ValueError(f"{n=} rows do not fit {pad_to=}")

    def col(values, fill, dtype):
        out = np.full((pad_to,), fill, dtype)
        out[:n] = np.asarray(list(values), dtype) if n else []
        return out

    seed_words = np.zeros((pad_to, 2), np.uint32)
    for i, s in enumerate(seeds):
        if not 0 <= s < 2**64:
            raise ValueError(f"seed {s} must be in [0, 2**64)")
        seed_words[i] = (s >> 32, s & 0xFFFFFFFF)
    nb = SamplingParams.MAX_LOGIT_BIAS if any(p.logit_bias for p in params) else 0
    bias_ids, bias_vals = np.zeros((pad_to, nb), np.int32), np.zeros((pad_to, nb), np.float32)
    for i, p in enumerate(params):
        for j, (t, b) in enumerate(p.logit_bias):
            bias_ids[i, j], bias_vals[i, j] = t, b
    return SamplingArrays(
        temperature=col((p.temperature for p in params), 0.0, np.float32),
        top_k=col((p.top_k for p in params), 0, np.int32),
        top_p=col((p.top_p for p in params), 1.0, np.float32),
        min_p=col((p.min_p for p in params), 0.0, np.float32),
        repetition_penalty=col((p.repetition_penalty for p in params), 1.0, np.float32),
        presence_penalty=col((p.presence_penalty for p in params), 0.0, np.float32),
        frequency_penalty=col((p.frequency_penalty for p in params), 0.0, np.float32),
        seed=seed_words,
        sample_index=col(sample_indices, 0, np.int32),
        bias_ids=bias_ids,
        bias_vals=bias_vals,
        allow=np.zeros((pad_to, 0), np.int32) if allow is None else allow,
    )


def allowed(allow: jax.Array, vocab: int) -> jax.Array:  # i32[B,W] -> bool[B,V]
    """Unpack grammar bitmasks: token t is allowed iff bit t % 32 of word t // 32 is set."""
    t = jnp.arange(vocab, dtype=jnp.int32)
    return (jnp.right_shift(allow[:, t // 32], t % 32) & 1).astype(bool)


def apply_bias_and_mask(x: jax.Array, sa: SamplingArrays) -> jax.Array:  # f32[B,V] -> f32[B,V]
    """Add each row's logit bias, then forbid what its grammar forbids (module doc step 2)."""
    if sa.bias_ids.shape[1]:
        x = x.at[jnp.arange(x.shape[0])[:, None], sa.bias_ids].add(sa.bias_vals.astype(F32))
    if sa.allow.shape[1]:
        x = jnp.where(allowed(sa.allow, x.shape[1]), x, -jnp.inf)
    return x


def apply_penalties(
    logits: jax.Array,  # f32[B,V], raw
    sa: SamplingArrays,
    output_counts: jax.Array,  # i32[B,V]: times each token was sampled by this request
    prompt_mask: jax.Array,  # bool[B,V]: token occurs in the prompt
) -> jax.Array:  # f32[B,V]
    """Repetition (prompt ∪ output), then frequency and presence (output only), on raw logits."""
    x = logits.astype(F32)
    counts = output_counts.astype(F32)
    r = sa.repetition_penalty.astype(F32)[:, None]
    seen = prompt_mask | (output_counts > 0)
    x = jnp.where(seen, jnp.where(x > 0, x / r, x * r), x)
    x = x - sa.frequency_penalty.astype(F32)[:, None] * counts
    return x - sa.presence_penalty.astype(F32)[:, None] * (output_counts > 0).astype(F32)


def row_uniforms(sa: SamplingArrays) -> jax.Array:  # f32[B] in [0, 1)
    """One uniform per row from ``fold_in(key(seed), sample_index)``; nothing else enters."""

    def one(seed_words, index):  # u32[2], i32[]
        key = jax.random.wrap_key_data(seed_words.astype(jnp.uint32), impl=PRNG_IMPL)
        return jax.random.uniform(jax.random.fold_in(key, index), (), F32)

    return jax.vmap(one)(sa.seed, sa.sample_index)


def _sample_filtered(x: jax.Array, sa: SamplingArrays) -> jax.Array:  # f32[B,V] -> i32[B]
    """Temperature → sort → top-k / top-p / min-p masks → inverse-CDF draw (module doc 4–6)."""
    B, V = x.shape
    temp = jnp.where(sa.temperature > 0, sa.temperature, 1.0).astype(F32)[:, None]  # greedy rows: 1
    x = (x - jnp.max(x, axis=-1, keepdims=True)) / temp  # f32[B,V], max is exactly 0
    ids = jax.lax.broadcasted_iota(jnp.int32, (B, V), 1)
    # Descending by value, ties by ascending id (stable sort of −x), so rank 0 is the argmax.
    neg_sorted, sorted_ids = jax.lax.sort((-x, ids), dimension=1, is_stable=True, num_keys=1)
    ratio = jnp.exp(-neg_sorted)  # f32[B,V]: p / p_max, 1 at rank 0, descending
    rank = ids  # the same iota, read as sorted rank

    k = jnp.where(sa.top_k > 0, jnp.minimum(sa.top_k, V), V)[:, None]
    weight = jnp.where(rank < k, ratio, 0.0)  # f32[B,V]: unnormalised top-k distribution
    cum = jnp.cumsum(weight, axis=-1)  # f32[B,V]
    top_p = sa.top_p.astype(F32)[:, None]
    keep_p = (top_p >= 1.0) | (cum - weight < top_p * cum[:, -1:])  # mass before < top_p
    keep = (rank < k) & keep_p & (ratio >= sa.min_p.astype(F32)[:, None])
    keep = keep | (rank == 0)  # filters never empty the distribution
    num_kept = jnp.sum(keep, axis=-1)  # i32[B], >= 1; ``keep`` is a prefix of ranks
    # Inside the kept prefix the running mass is ``cum``; past it ``cum`` only grows, so the
    # first rank with cum > target is found by counting and clipping to the prefix.
    kept_mass = jnp.take_along_axis(cum, (num_kept - 1)[:, None], axis=-1)  # f32[B,1]
    target = row_uniforms(sa)[:, None] * kept_mass
    pick = jnp.minimum(jnp.sum(cum <= target, axis=-1), num_kept - 1)  # i32[B]
    return jnp.take_along_axis(sorted_ids, pick[:, None], axis=-1)[:, 0]


def sample(
    logits: jax.Array,  # f32[B,V] (any float dtype), raw model output
    sa: SamplingArrays,
    output_counts: jax.Array,  # i32[B,V], rows gathered by slot
    prompt_mask: jax.Array,  # bool[B,V], rows gathered by slot
    *,
    num_logprobs: int,
) -> SampleResult:
    """Sample one token per row; see the module docstring for order and conventions.

    Jit with ``num_logprobs`` static (the batch maximum; rows that asked for fewer slice on
    the host). When every row is greedy a ``lax.cond`` skips the sort at run time; the
    trace is the same for any mix of parameters.
    """
    raw = logits.astype(F32)
    lse = jax.nn.logsumexp(raw, axis=-1)  # f32[B]
    x = apply_penalties(raw, sa, output_counts, prompt_mask)  # f32[B,V]
    x = apply_bias_and_mask(x, sa)
    greedy_tokens = jnp.argmax(x, axis=-1).astype(jnp.int32)  # i32[B]
    is_greedy = sa.temperature <= 0
    sampled = jax.lax.cond(jnp.all(is_greedy), lambda: greedy_tokens, lambda: _sample_filtered(x, sa))
    tokens = jnp.where(is_greedy, greedy_tokens, sampled)  # i32[B]
    logprob = jnp.take_along_axis(raw, tokens[:, None], axis=-1)[:, 0] - lse
    B = raw.shape[0]
    if num_logprobs > 0:
        top_vals, top_ids = jax.lax.top_k(raw, num_logprobs)  # f32[B,n], i32[B,n]
        top_logprobs = top_vals - lse[:, None]
    else:
        top_ids, top_logprobs = jnp.zeros((B, 0), jnp.int32), jnp.zeros((B, 0), F32)
    return SampleResult(tokens, logprob, top_ids.astype(jnp.int32), top_logprobs)


# ----------------------------------------------------------------------------- penalty tables
def _drop_invalid(slots: jax.Array, valid: jax.Array, num_slots: int) -> jax.Array:
    """Invalid entries point one past the table; ``mode="drop"`` then skips them."""
    return jnp.where(valid, slots, num_slots).astype(jnp.int32)


def reset_rows(
    output_counts: jax.Array,  # i32[num_slots,V]
    prompt_mask: jax.Array,  # bool[num_slots,V]
    slots: jax.Array,  # i32[N]: slots taken by a fresh sequence (``SeqWork.fresh``)
    valid: jax.Array,  # bool[N]: False for padding entries
) -> tuple[jax.Array, jax.Array]:
    """Clear the rows of ``slots`` before a sequence (or a recompute replay) starts in them."""
    idx = _drop_invalid(slots, valid, output_counts.shape[0])
    return (
        output_counts.at[idx].set(0, mode="drop"),
        prompt_mask.at[idx].set(False, mode="drop"),
    )


def update_counts(
    output_counts: jax.Array,  # i32[num_slots,V]
    prompt_mask: jax.Array,  # bool[num_slots,V]
    slots: jax.Array,  # i32[N]: each token's slot (one per token: packed chunks or a batch)
    tokens: jax.Array,  # i32[N]
    is_prompt: jax.Array,  # bool[N]: True → mark in prompt_mask, False → count as output
    valid: jax.Array,  # bool[N]: False for padding entries (dropped)
) -> tuple[jax.Array, jax.Array]:
    """Record tokens in the penalty tables with one scatter per table.

    Every token must be recorded exactly once: prompt tokens as their prefill chunk runs
    (``is_prompt=True``; on a prefix-cache hit the skipped prefix too), each sampled token
    right after ``sample`` (``is_prompt=False``), and on a recompute replay into a fresh slot
    the replayed outputs (position >= ``prompt_len``, ``is_prompt=False``). A decode step's
    input token is the previous step's sample, already counted: do not record it again.
    Repeated (slot, token) pairs accumulate.
    """
    num_slots = output_counts.shape[0]
    out_idx = _drop_invalid(slots, valid & ~is_prompt, num_slots)
    prompt_idx = _drop_invalid(slots, valid & is_prompt, num_slots)
    tokens = tokens.astype(jnp.int32)
    return (
        output_counts.at[out_idx, tokens].add(1, mode="drop"),
        prompt_mask.at[prompt_idx, tokens].set(True, mode="drop"),
    )
