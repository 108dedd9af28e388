"""Shared set-up of the sharding tests: a small config, the three layouts, a prefill+decode
scenario run once per layout (its compiled decode step is inspected by the HLO test), and
an HLO reader for collectives.

The config has every layer kind (CSA, HCA, SWA), a hash-routed and a top-k MoE layer,
8 heads in 8 output groups (so ``tensor=8`` really splits heads) and 8 experts (one per
device at ``expert=8``). Three Sinkhorn iterations instead of 20: the unrolled loop is
most of the compile time and changes nothing that sharding touches.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax.config import PRESETS, Config
from dsv4_jax.model import state as kvc
from dsv4_jax.model.params import init_params
from dsv4_jax.model.transformer import ModelOptions, forward
from dsv4_jax.parallel.mesh import parse_mesh
from dsv4_jax.parallel.rules import DEFAULT_RULES, Layout

CFG = Config(
    **{
        **PRESETS["tiny"],
        "num_hidden_layers": 3,
        "compress_ratios": (4, 8, 0, 0),
        "num_hash_layers": 1,
        "num_attention_heads": 8,
        "o_groups": 8,
        "hc_sinkhorn_iters": 3,
    }
)
LAYOUTS = {
    "expert": "data=1,expert=8,tensor=1",  # DP attention over 8, EP 8
    "tensor": "data=1,expert=1,tensor=8",  # heads/groups and expert F over 8, state replicated
    "data_expert": "data=2,expert=4,tensor=1",  # 2 expert replicas of EP 4; DP attention over 8
    "tp_attention": "data=2,expert=4,tensor=1",  # a table edit: heads over 'expert', sequences over 'data'
}
RULE_EDITS = {
    "tp_attention": {
        "batch": "data",
        "kv_slot": "data",
        "kv_block": "data",
        "q_heads": "expert",
        "heads": "expert",
        "o_lora": "expert",
    },
}
CACHE = kvc.CacheConfig(num_slots=8, num_blocks=16, max_blocks_per_seq=2, block_tokens=32, dtype=jnp.float32)
# (slot, blocks, length): slot s and blocks 2s, 2s+1 sit on sequence shard s of an 8-way split
# (and on shard s // 4 of a 2-way split, as does batch row s)
SEQS = {1: (1, [2, 3], 30), 4: (4, [8, 9], 21), 6: (6, [12, 13], 13)}  # batch row -> sequence
ROWS, CHUNK, DECODE_STEPS = 8, 16, 3


@functools.cache
def layout(name: str) -> Layout:
    return Layout.create(parse_mesh(LAYOUTS[name]), {**DEFAULT_RULES, **RULE_EDITS.get(name, {})})


@functools.cache
def params():
    return init_params(CFG, jax.random.PRNGKey(0))


def place(p, lay: Layout | None):
    return p if lay is None else jax.device_put(p, lay.param_shardings(p, CFG))


@functools.cache
def prompts() -> np.ndarray:
    return np.random.RandomState(7).randint(0, CFG.vocab_size, (ROWS, 32)).astype(np.int32)


def _meta(lengths):
    slots = np.full(ROWS, CACHE.num_slots, np.int32)  # padding rows: no slot
    table = np.zeros((ROWS, CACHE.max_blocks_per_seq), np.int32)
    for r, (s, blocks, _) in SEQS.items():
        slots[r], table[r, : len(blocks)] = s, blocks
    zero = np.zeros(ROWS, np.int32)
    return kvc.StepMeta(slots, table, np.asarray(lengths, np.int32), zero, zero)


@functools.cache
def state_run(name: str | None):
    """Chunked prefill (two chunks of <= 16 tokens) then greedy decode steps, every row of the
    batch at once. Returns (prefill logits per chunk, decode logits per step, decode HLO text)."""
    lay = None if name is None else layout(name)
    opts = ModelOptions(layout=lay)
    step = jax.jit(
        lambda p, t, q, s, m: forward(p, t, q, s, m, cfg=CFG, opts=opts, cache=CACHE), donate_argnums=(3,)
    )
    p = place(params(), lay)
    state = kvc.init_state(CFG, CACHE)
    if lay is not None:
        state = jax.device_put(state, lay.state_shardings(state))
    toks = prompts()
    done = np.zeros(ROWS, np.int32)
    prefill = []
    for _ in range(2):
        t = np.zeros((ROWS, CHUNK), np.int32)
        n = np.zeros(ROWS, np.int32)
        for r, (_, _, length) in SEQS.items():
            n[r] = min(CHUNK, length - done[r])
            t[r, : n[r]] = toks[r, done[r] : done[r] + n[r]]
        pos = done[:, None] + np.arange(CHUNK, dtype=np.int32)[None]
        lg, state = step(p, t, pos, state, _meta(n))
        prefill.append(np.asarray(lg))
        done = done + n
    nxt = np.zeros((ROWS, 1), np.int32)
    for r in SEQS:  # each row's last prompt token sits in chunk 0 or 1
        c = int(done[r] > CHUNK)
        nxt[r, 0] = int(np.argmax(prefill[c][r, done[r] - 1 - c * CHUNK]))
    lengths = np.array([1 if r in SEQS else 0 for r in range(ROWS)], np.int32)
    compiled, decode = None, []
    for _ in range(DECODE_STEPS):
        args = (p, nxt, done[:, None].copy(), state, _meta(lengths))
        if compiled is None:
            compiled = step.lower(*args).compile()
        lg, state = compiled(*args)
        lg = np.asarray(lg)
        decode.append(lg)
        nxt = lg[:, -1:].argmax(-1).astype(np.int32)
        done = done + lengths
    return prefill, decode, compiled.as_text()


# ----------------------------------------------------------------------------- HLO
_COLLECTIVE = re.compile(
    r"=\s*(\(?[^=]*?\)?)\s+(all-gather|all-gather-start|all-to-all|all-reduce|"
    r"all-reduce-start|reduce-scatter|collective-permute)\("
)
_ARRAY = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")


def collectives(hlo: str, op: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, shape) of every result of every ``op`` instruction (``all-gather`` also matches its
    async ``-start`` form) in an HLO module's text."""
    out = []
    for m in _COLLECTIVE.finditer(hlo):
        if m.group(2).removesuffix("-start") != op:
            continue
        for dt, dims in _ARRAY.findall(m.group(1)):
            out.append((dt, tuple(int(d) for d in dims.split(",") if d)))
    return out


_HLO_DTYPES = {
    "float32": "f32",
    "bfloat16": "bf16",
    "uint8": "u8",
    "uint16": "u16",
    "int32": "s32",
    "bool": "pred",
    "float8_e4m3fn": "f8e4m3fn",
}


def forbidden(tree) -> set[tuple[str, int]]:
    """(HLO dtype, element count) of every leaf: an all-gather producing as many elements of
    the same type as a whole pool or expert stack moves that whole array to each device,
    whatever shape XLA gives it."""
    leaves = jax.tree.leaves(tree)
    unknown = {str(x.dtype) for x in leaves} - _HLO_DTYPES.keys()
    assert not unknown, f"add the HLO names of {unknown} to _HLO_DTYPES (else those leaves go unchecked)"
    return {(_HLO_DTYPES[str(x.dtype)], int(np.prod(x.shape))) for x in leaves}


def gathered(hlo: str) -> set[tuple[str, int]]:
    return {(dt, int(np.prod(shape))) for dt, shape in collectives(hlo, "all-gather")}
