"""Slot-indexed tables on a state split by sequence shard: the runner's reads and writes of
one slot's rows (penalty tables, SWA snapshots), each a ``shard_map`` manual over the
sequence axes so only the rows involved move (the split itself: ``parallel.dp_attention``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsv4_jax.model import state as kvc
from dsv4_jax.parallel.dp_attention import check_rows, is_split, local_ids, state_specs
from dsv4_jax.parallel.rules import Layout


def take_slot_rows(table: jax.Array, slots: jax.Array, layout: Layout | None) -> jax.Array:
    """``table[slots]`` for a slot-indexed table [num_slots, ...] and batch rows ordered by
    shard (padding slots read some row of their shard; callers ignore them)."""
    if not is_split(layout):
        return table[jnp.clip(slots, 0, table.shape[0] - 1)]
    axes, n = layout.batch_axes, layout.num_seq_shards
    check_rows(slots.shape[0], n)
    n_local = table.shape[0] // n

    def body(t, s):
        return t[local_ids(s, jax.lax.axis_index(axes), n_local, foreign=0)]

    return jax.shard_map(
        body,
        mesh=layout.mesh,
        in_specs=(P(axes), P(axes)),
        out_specs=P(axes),
        axis_names=set(axes),
        check_vma=False,
    )(table, slots)


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
    return jax.shard_map(
        body,
        mesh=layout.mesh,
        in_specs=(specs, P(), P()),
        out_specs=specs,
        axis_names=set(axes),
        check_vma=False,
    )(tuple(tables), slots, entries)


def copy_slot(
    dst: kvc.DecodeState,
    dst_index: jax.Array,
    src: kvc.DecodeState,
    src_index: jax.Array,
    layout: Layout | None,
    dst_split: bool = True,
    src_split: bool = True,
) -> kvc.DecodeState:
    """``state.copy_slot`` (state ↔ snapshot store) with either side split by slot or not
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
        for d, s in zip(dst.layers, src.layers):
            moved = {}
            for key in d.SLOT_FIELDS:
                part = getattr(s, key)
                n_src = jax.tree.leaves(part)[0].shape[0]
                i = local_ids(si, shard, n_src, foreign=0) if src_split else si
                rows = kvc.take_rows(part, i[None])
                if src_split:  # pick the owner's row
                    owner = si // n_src
                    rows = jax.tree.map(lambda r, o=owner: jax.lax.all_gather(r, axes, tiled=False)[o], rows)
                n_dst = jax.tree.leaves(getattr(d, key))[0].shape[0]
                j = local_ids(di, shard, n_dst) if dst_split else di
                moved[key] = kvc.put_rows(getattr(d, key), (j[None],), rows)
            layers.append(dataclasses.replace(d, **moved))
        return kvc.DecodeState(layers)

    dspec = state_specs(layout, dst) if dst_split else P()
    sspec = state_specs(layout, src) if src_split else P()
    fn = jax.shard_map(
        body,
        mesh=layout.mesh,
        in_specs=(dspec, P(), sspec, P()),
        out_specs=dspec,
        axis_names=set(axes),
        check_vma=False,
    )
    return fn(dst, dst_index, src, src_index)
