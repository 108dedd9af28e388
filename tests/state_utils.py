"""Drive the state path in tests: a jitted step per (config, cache) and a tiny block allocator."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax.model import state as kvc
from dsv4_jax.model.transformer import ModelOptions, forward


@functools.cache
def step_fn(cfg, cc, opts=ModelOptions()):
    """jit(forward) over the state, state donated (the runner's contract)."""
    return jax.jit(
        lambda p, t, q, s, m: forward(p, t, q, s, m, cfg=cfg, opts=opts, cache=cc), donate_argnums=(3,)
    )


def cache(cfg, fmt="bf16", slots=4, blocks=24, max_blocks=6, block_tokens=128, dtype=jnp.float32):
    return kvc.CacheConfig(
        num_slots=slots,
        num_blocks=blocks,
        max_blocks_per_seq=max_blocks,
        block_tokens=block_tokens,
        fmt=kvc.KVFormat.parse(fmt),
        dtype=dtype,
    )


def block_table(ids, max_blocks):
    """A row of the block table: the sequence's blocks, then junk past its end (never read)."""
    row = list(ids) + [0] * (max_blocks - len(ids))
    return np.asarray(row[:max_blocks], np.int32)


def bucket(n: int) -> int:
    """Padded chunk length: 1 (decode) or the next power of two >= 8, as a runner buckets shapes."""
    return 1 if n == 1 else max(8, 1 << (n - 1).bit_length())


def run(cfg, cc, params, state, tokens, chunks, slot, blocks, opts=ModelOptions(), start=0):
    """Feed one sequence's ``tokens`` [L] in ``chunks`` (sizes; 1 = a decode step) from ``start``.

    Returns (logits f32[L,V], state).
    """
    step = step_fn(cfg, cc, opts)
    bt = block_table(blocks, cc.max_blocks_per_seq)[None]
    out, pos = [], 0
    for n in chunks:
        p0 = start + pos
        t = bucket(n)
        tok = np.zeros((1, t), np.int64)
        tok[0, :n] = tokens[pos : pos + n]
        meta = kvc.StepMeta(np.array([slot], np.int32), bt, np.array([n], np.int32))
        lg, state = step(params, tok, np.arange(p0, p0 + t)[None], state, meta)
        out.append(np.asarray(lg[0, :n]))
        pos += n
    assert pos == len(tokens)
    return np.concatenate(out), state
