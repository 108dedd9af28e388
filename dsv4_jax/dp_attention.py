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
(heads split explicitly, one psum); the slot-table helpers leave the other axes automatic.

Why not let XLA partition the gathers itself: an index into an array split on the
indexed axis, with indices it cannot prove local, is partitioned by gathering the whole
operand, i.e. a full KV pool per step (the HLO test in ``tests/sharding`` checks this
never appears).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsv4_jax import attention_state
from dsv4_jax import kv_cache as kvc
from dsv4_jax.config import Config
from dsv4_jax.sharding import Layout


def is_split(layout: Layout | None) -> bool:
    return layout is not None and layout.num_seq_shards > 1


def local_cache(cc: kvc.CacheConfig, shards: int) -> kvc.CacheConfig:
    """One shard's view of the state sizes (slots and blocks split evenly)."""
    for name in ("num_slots", "num_blocks"):
        if getattr(cc, name) % shards:
            raise ValueError(f"CacheConfig.{name}={getattr(cc, name)} must be a multiple of the {shards} "
                             f"sequence shards of the mesh")
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


def _check_rows(n_rows: int, shards: int) -> None:
    if n_rows % shards:
        raise ValueError(f"batch of {n_rows} rows does not split over {shards} sequence shards; "
                         f"pad it to a multiple (the runner does)")


def attention_chunk(x, positions, p, st: dict, meta: kvc.StepMeta, layer: int, cfg: Config, cc: kvc.CacheConfig,
                    layout: Layout | None, *, sim_quant: bool = False, kernels: str = "reference"):
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
        return attention_state.attention_chunk(x, positions, p, st, meta, layer, cfg, cc, sim_quant=sim_quant,
                                               kernels=kernels)
    axes, n = layout.batch_axes, layout.num_seq_shards
    _check_rows(x.shape[0], n)
    lcc = local_cache(cc, n)
    tp = layout.attn_head_axes(p, cfg)

    def body(x, positions, p, st, meta):
        shard = jax.lax.axis_index(axes) if axes else 0
        # Block ids past a sequence's end are junk the kernels still address (masked): keep
        # them in range. Writes only ever target the sequence's own (local) blocks.
        meta = meta._replace(slots=local_ids(meta.slots, shard, lcc.num_slots),
                             block_table=local_ids(meta.block_table, shard, lcc.num_blocks, foreign=0))
        out, new = attention_state.attention_chunk(x, positions, p, st, meta, layer, cfg, lcc, sim_quant=sim_quant,
                                                   kernels=kernels)
        return (jax.lax.psum(out, tp) if tp else out), new

    rows, sts = P(axes), state_specs(layout, st)
    fn = jax.shard_map(body, mesh=layout.mesh, in_specs=(rows, rows, layout.sublayer_specs("attn", p, cfg, layer),
                                                         sts, rows),
                       out_specs=(rows, sts), check_vma=False)
    return fn(x, positions, p, st, meta)


# ----------------------------------------------------------------------------- slot tables
def take_slot_rows(table: jax.Array, slots: jax.Array, layout: Layout | None) -> jax.Array:
    """``table[slots]`` for a slot-indexed table [num_slots, ...] and batch rows ordered by
    shard (padding slots read some row of their shard; callers ignore them)."""
    if not is_split(layout):
        return table[jnp.clip(slots, 0, table.shape[0] - 1)]
    axes, n = layout.batch_axes, layout.num_seq_shards
    _check_rows(slots.shape[0], n)
    n_local = table.shape[0] // n

    def body(t, s):
        return t[local_ids(s, jax.lax.axis_index(axes), n_local, foreign=0)]

    return jax.shard_map(body, mesh=layout.mesh, in_specs=(P(axes), P(axes)), out_specs=P(axes),
                         axis_names=set(axes), check_vma=False)(table, slots)


def scatter_slots(fn: Callable, tables: tuple, slots: jax.Array, *entries, layout: Layout | None):
    """``fn(*tables, slots, *entries)`` — a slot-indexed scatter with ``mode="drop"`` such as
    ``sampling.update_counts`` — on tables split by slot. Entries are replicated (a handful
    per step); each shard applies the ones whose slot it owns and drops the rest."""
    if not is_split(layout):
        return fn(*tables, slots, *entries)
    axes, n = layout.batch_axes, layout.num_seq_shards
    n_local = tables[0].shape[0] // n

    def body(tables, slots, entries):
        return fn(*tables, local_ids(slots, jax.lax.axis_index(axes), n_local), *entries)

    specs = tuple(P(axes) for _ in tables)
    return jax.shard_map(body, mesh=layout.mesh, in_specs=(specs, P(), P()), out_specs=specs,
                         axis_names=set(axes), check_vma=False)(tuple(tables), slots, entries)


def copy_slot(dst: dict, dst_index: jax.Array, src: dict, src_index: jax.Array, layout: Layout | None,
              dst_split: bool = True, src_split: bool = True) -> dict:
    """``kv_cache.copy_slot`` (state ↔ snapshot store) with either side split by slot or not
    (``*_split``: a snapshot store whose size does not divide is kept replicated).

    The owner of the source row is ``src_index // n_local``; every shard contributes its
    candidate row to one small all-gather and takes the owner's, so only one slot's
    windows and tails cross devices, never a whole store.
    """
    if not is_split(layout):
        return kvc.copy_slot(dst, dst_index, src, src_index)
    axes = layout.batch_axes

    def body(dst, di, src, si):
        shard = jax.lax.axis_index(axes)
        layers = []
        for d, s in zip(dst["layers"], src["layers"]):
            out = dict(d)
            for key in kvc.SLOT_KEYS:
                if key not in s:
                    continue
                n_src = jax.tree.leaves(s[key])[0].shape[0]
                i = local_ids(si, shard, n_src, foreign=0) if src_split else si
                rows = kvc.take_rows(s[key], i[None])
                if src_split:  # pick the owner's row
                    owner = si // n_src
                    rows = jax.tree.map(lambda r, o=owner: jax.lax.all_gather(r, axes, tiled=False)[o], rows)
                n_dst = jax.tree.leaves(d[key])[0].shape[0]
                j = local_ids(di, shard, n_dst) if dst_split else di
                out[key] = kvc.put_rows(d[key], (j[None],), rows)
            layers.append(out)
        return {**dst, "layers": layers}

    dspec = state_specs(layout, dst) if dst_split else P()
    sspec = state_specs(layout, src) if src_split else P()
    fn = jax.shard_map(body, mesh=layout.mesh, in_specs=(dspec, P(), sspec, P()), out_specs=dspec,
                       axis_names=set(axes), check_vma=False)
    return fn(dst, dst_index, src, src_index)
