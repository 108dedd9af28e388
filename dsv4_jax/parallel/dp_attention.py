"""Data-parallel attention over the decode state: each sequence's state lives on one shard.

The rules table maps ``batch``, ``kv_slot`` and ``kv_block`` to the same mesh axes (by
default ``data × expert``), which split every slot-indexed leaf (window rings, compressor
tails, penalty tables) and every block-indexed pool (compressed KV, indexer keys) into
``n`` contiguous ranges: shard ``s`` holds slots ``[s·S/n, (s+1)·S/n)`` and blocks
``[s·N/n, (s+1)·N/n)``. The runner puts a sequence's batch row on the shard of its slot,
and the engine gives it blocks from that shard's range.

Then no step has to move state between devices. Every function here is a ``shard_map``
that is *manual* over the sequence axes: inside, each shard sees its own slots,
blocks and rows, global ids are translated to local ones (a foreign or padding slot
becomes the local "one past the end", which every scatter drops), and the unchanged
single-device code runs. The attention region is manual over the tensor axes too
(heads split explicitly, one psum). The runner's slot-table operations on the same split
state are in ``parallel.slots``.

Why not let XLA partition the gathers itself: an index into an array split on the
indexed axis, with indices it cannot prove local, is partitioned by gathering the whole
operand, i.e. a full KV pool per step (the HLO test in ``tests/sharding`` checks this
never appears).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

import pallas_kernels as pk
from dsv4_jax.config import Config
from dsv4_jax.model import attention_state
from dsv4_jax.model import state as kvc
from dsv4_jax.model.attention import Attention
from dsv4_jax.parallel.rules import Layout


def is_split(layout: Layout | None) -> bool:
    return layout is not None and layout.num_seq_shards > 1


def local_cache(cc: kvc.CacheConfig, shards: int) -> kvc.CacheConfig:
    """One shard's view of the state sizes (slots and blocks split evenly)."""
    for name in ("num_slots", "num_blocks"):
        if getattr(cc, name) % shards:
            raise ValueError(
                f"CacheConfig.{name}={getattr(cc, name)} must be a multiple of the {shards} "
                f"sequence shards of the mesh"
            )
    return dataclasses.replace(cc, num_slots=cc.num_slots // shards, num_blocks=cc.num_blocks // shards)


def local_ids(ids: jax.Array, shard: jax.Array, n_local: int, foreign: int | None = None) -> jax.Array:
    """Global ids -> ids within ``shard``'s range; others -> ``foreign`` (default ``n_local``,
    one past the end: dropped by every ``mode="drop"`` scatter)."""
    loc = ids - shard * n_local
    own = (loc >= 0) & (loc < n_local)
    return jnp.where(own, loc, n_local if foreign is None else foreign).astype(ids.dtype)


def _manual_spec(spec: P, manual: tuple[str, ...]) -> P:
    """Keep only the manual axes of a spec (shard_map specs cannot name automatic axes)."""
    out = []
    for entry in spec:
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        kept = tuple(n for n in names if n in manual)
        out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return P(*out)


def state_specs(layout: Layout, state) -> object:
    """shard_map specs of a (layer or whole) state tree, from the rules table."""
    manual = layout.batch_axes
    return jax.tree.map(lambda s: _manual_spec(s.spec, manual), layout.state_shardings(state))


def check_rows(n_rows: int, shards: int) -> None:
    if n_rows % shards:
        raise ValueError(
            f"batch of {n_rows} rows does not split over {shards} sequence shards; "
            f"pad it to a multiple (the runner does)"
        )


def attention_chunk(
    x,
    positions,
    p: Attention,
    st: kvc.LayerState,
    meta: kvc.StepMeta,
    layer: int,
    cfg: Config,
    cc: kvc.CacheConfig,
    *,
    layout: Layout | None,
    sim_quant: bool = False,
    kernels: pk.Impl = pk.REFERENCE,
):
    """``attention_state.attention_chunk`` on a mesh: sequences split over the sequence axes,
    heads and output groups over the tensor axes (``Layout.attn_head_axes``).

    ``x`` [B,T,D], ``positions`` i32[B,T] and ``meta`` have batch rows ordered by shard
    (row i on shard ``i // (B/n)``), each row's slot and blocks in its shard's ranges.
    Returns ([B,T,D], new layer state), split like the inputs.

    The region is manual over every mesh axis. A tensor shard projects its own heads, keeps
    the (replicated) compressor, indexer and state updates whole, and its output projection
    is partial over its groups: one ``psum`` completes it. Left to XLA, the scatter into the
    replicated tails was partitioned over channels and re-gathered: a full tail store per step.
    """
    if layout is None or layout.mesh.size == 1:
        return attention_state.attention_chunk(
            x, positions, p, st, meta, layer, cfg, cc, sim_quant=sim_quant, kernels=kernels
        )
    axes, n = layout.batch_axes, layout.num_seq_shards
    check_rows(x.shape[0], n)
    lcc = local_cache(cc, n)
    tp = layout.attn_head_axes(p, cfg)
    graph, params = nnx.split(p)  # the module's params cross the shard_map boundary as a pytree

    def body(x, positions, params, st, meta):
        p = nnx.merge(graph, params)
        shard = jax.lax.axis_index(axes) if axes else 0
        # Block ids past a sequence's end are junk the kernels still address (masked): keep
        # them in range. Writes only ever target the sequence's own (local) blocks.
        meta = meta._replace(
            slots=local_ids(meta.slots, shard, lcc.num_slots),
            block_table=local_ids(meta.block_table, shard, lcc.num_blocks, foreign=0),
        )
        out, new = attention_state.attention_chunk(
            x, positions, p, st, meta, layer, cfg, lcc, sim_quant=sim_quant, kernels=kernels
        )
        return (jax.lax.psum(out, tp) if tp else out), new

    rows, sts = P(axes), state_specs(layout, st)
    fn = jax.shard_map(
        body,
        mesh=layout.mesh,
        in_specs=(rows, rows, layout.sublayer_specs("attn", params, cfg), sts, rows),
        out_specs=(rows, sts),
        check_vma=False,
    )
    return fn(x, positions, params, st, meta)
