"""Where the model runner's arrays live on a mesh, and how a step's rows are ordered.

``JaxModelRunner(..., mesh=...)`` holds one ``RunnerLayout``. It

* places the params by the rules table (``Layout.param_shardings``) and allocates the
  decode state, the SWA snapshot store and the penalty tables *directly* in their split
  layout (a jitted initialiser with ``out_shardings``: no device ever holds a whole pool);
* orders each step's batch rows by sequence shard: shard ``s`` owns slots
  ``[s·S/n, (s+1)·S/n)`` and blocks ``[s·N/n, (s+1)·N/n)`` (``dp_attention``), so a work in
  slot ``q`` goes to a row of shard ``q // (S/n)``, every shard gets the same power-of-two
  number of rows, and a work whose blocks are not on its slot's shard is refused before
  anything runs (the block manager must allocate from the slot's shard);
* sends the step metadata to the devices split over the batch axes, one transfer per leaf.

Without a mesh every method reduces to the single-device behaviour.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from dsv4_jax.config import Config
from dsv4_jax.engine.profiles import snapshots_split
from dsv4_jax.intmath import next_pow2
from dsv4_jax.model import moe
from dsv4_jax.model import state as kvc
from dsv4_jax.parallel import dp_attention
from dsv4_jax.parallel import slots as slot_tables
from dsv4_jax.parallel.mesh import validate_for
from dsv4_jax.parallel.rules import Layout

TABLE_AXES = ("kv_slot", "vocab_table")  # penalty tables [num_slots, V]
TABLE_DTYPES = (jnp.int32, jnp.bool_)  # output-token counts, prompt mask (``sampling.update_counts``)


def leaf_bytes(x, sharding=None) -> int:
    """Bytes of ``x`` (an array or a ``ShapeDtypeStruct``) on one device of ``sharding``
    (default: its own; none: the whole array)."""
    sh = getattr(x, "sharding", None) if sharding is None else sharding
    shape = sh.shard_shape(tuple(x.shape)) if sh is not None else tuple(x.shape)
    return math.prod(shape) * jnp.dtype(x.dtype).itemsize


def tree_bytes(tree, shardings=None) -> int:
    """Bytes of a pytree on one device: each leaf by its own sharding, or by ``shardings``
    (a matching tree, as ``Layout.param_shardings`` gives)."""
    leaves = jax.tree.leaves(tree)
    if shardings is None:
        return sum(leaf_bytes(x) for x in leaves)
    shs = jax.tree.leaves(shardings)
    if len(shs) != len(leaves):
        raise ValueError(f"{len(leaves)} leaves but {len(shs)} shardings")
    return sum(leaf_bytes(x, s) for x, s in zip(leaves, shs))


class RunnerLayout:
    def __init__(self, cfg: Config, cc: kvc.CacheConfig, layout: Layout | None, num_snapshots: int):
        self.cfg, self.cc, self.layout = cfg, cc, layout
        self.shards = layout.num_seq_shards if layout is not None else 1
        if layout is not None:
            validate_for(layout.mesh, cfg)
            dp_attention.local_cache(cc, self.shards)  # slots and blocks split evenly
        self.slots_per_shard = cc.num_slots // self.shards
        self.blocks_per_shard = cc.num_blocks // self.shards
        # The store has max(n, 1) entries; one that does not split evenly stays replicated
        # (copies still move one slot). ``PoolPlan.bytes_per_shard`` counts it the same way.
        self.num_snapshots = num_snapshots
        self.snapshots_split = snapshots_split(max(num_snapshots, 1), self.shards)

    # ------------------------------------------------------------------ placement
    def place_params(self, params):
        """The params on the mesh by the rules table. Without a mesh on XLA:CPU the routed
        experts are held one array per expert, gate and up stacked (``moe.split_experts``: a
        decode row then reads its expert in place, not a gathered copy)."""
        if self.layout is None:
            return moe.split_experts(params) if jax.default_backend() == "cpu" else params
        return jax.device_put(params, self.layout.param_shardings(params, self.cfg))

    def _alloc(self, make, shardings_of, abstract: bool):
        """``make()`` evaluated straight into its shardings (each device builds its own part);
        ``abstract``: only its shapes, dtypes and shardings (``memory.allocated``)."""
        if self.layout is not None:
            make = jax.jit(make, out_shardings=shardings_of(jax.eval_shape(make)))
        return jax.eval_shape(make) if abstract else make()

    def state_shardings(self, state):
        return self.layout.state_shardings(state)

    def snapshot_shardings(self, snaps):
        if self.snapshots_split:
            return self.layout.state_shardings(snaps)
        return jax.tree.map(lambda x: self.layout.sharding((None,) * x.ndim), snaps)

    def table_sharding(self, shape):
        return self.layout.sharding(TABLE_AXES, shape)

    def init_state(self, abstract: bool = False):
        return self._alloc(lambda: kvc.init_state(self.cfg, self.cc), self.state_shardings, abstract)

    def init_snapshots(self, abstract: bool = False):
        make = lambda: kvc.init_snapshots(self.cfg, self.cc, self.num_snapshots)
        return self._alloc(make, self.snapshot_shardings, abstract)

    def init_table(self, dtype, abstract: bool = False):
        shape = (self.cc.num_slots, self.cfg.vocab_size)
        return self._alloc(lambda: jnp.zeros(shape, dtype), lambda s: self.table_sharding(s.shape), abstract)

    def pin(self, state, counts, pmask):
        """Inside the step: keep the outputs in the inputs' layout, so donation reuses the
        buffers and the next step's inputs match the compiled shardings."""
        return self.pin_state(state), *self.pin_tables(counts, pmask)

    def pin_state(self, state):
        if self.layout is None:
            return state
        return jax.lax.with_sharding_constraint(state, self.state_shardings(state))

    def pin_tables(self, counts, pmask):
        if self.layout is None:
            return counts, pmask
        wsc = jax.lax.with_sharding_constraint
        return wsc(counts, self.table_sharding(counts.shape)), wsc(pmask, self.table_sharding(pmask.shape))

    def replicate(self, tree):
        """Inside the step: the sampled tokens and logprobs (a few numbers per row) on every
        device, so each process of a multi-host mesh can read them without a collective."""
        if self.layout is None:
            return tree
        return jax.lax.with_sharding_constraint(tree, self.layout.sharding(()))

    # ------------------------------------------------------------------ jitted slot operations
    @functools.cached_property
    def restore_fn(self):
        """state[slot] <- snapshots[n] (state donated)."""
        return jax.jit(
            functools.partial(
                slot_tables.copy_slot, layout=self.layout, dst_split=True, src_split=self.snapshots_split
            ),
            donate_argnums=(0,),
        )

    @functools.cached_property
    def save_fn(self):
        """snapshots[n] <- state[slot] (store donated)."""
        return jax.jit(
            functools.partial(
                slot_tables.copy_slot, layout=self.layout, dst_split=self.snapshots_split, src_split=True
            ),
            donate_argnums=(0,),
        )

    def table_fn(self, fn):
        """A jitted penalty-table scatter ``fn(counts, pmask, slots, *entries)`` over split tables."""

        def run(counts, pmask, slots, *entries):
            return slot_tables.scatter_slots(fn, (counts, pmask), slots, *entries, layout=self.layout)

        return jax.jit(run, donate_argnums=(0, 1))

    # ------------------------------------------------------------------ batch rows
    def shard_of_slot(self, slot: int) -> int:
        return slot // self.slots_per_shard

    def arrange(self, works, max_batch: int) -> tuple[list[int], int]:
        """Row of each work and the padded batch size. One shard: rows in order, a power of two
        (at most ``max_batch`` unless the works need more). Several: each shard's works in its
        own equal, power-of-two band of rows."""
        if self.shards == 1:
            return list(range(len(works))), min(next_pow2(len(works)), max(max_batch, len(works)))
        bands: dict[int, int] = {}
        shard_rank = []
        for w in works:
            s = self.shard_of_slot(w.slot)
            shard_rank.append((s, bands.get(s, 0)))
            bands[s] = bands.get(s, 0) + 1
            lo, hi = s * self.blocks_per_shard, (s + 1) * self.blocks_per_shard
            bad = [b for b in w.block_ids if not lo <= b < hi]
            if bad:
                raise ValueError(
                    f"seq {w.seq_id}: slot {w.slot} is on sequence shard {s} (blocks [{lo}, {hi})) "
                    f"but uses blocks {bad}; allocate a sequence's blocks on its slot's shard"
                )
        band = next_pow2(max(bands.values()))
        return [s * band + r for s, r in shard_rank], band * self.shards

    def put_batch(self, tree):
        """Host step metadata -> device arrays split over the batch axes (one transfer per leaf)."""
        if self.layout is None:
            return tree
        return self.layout.put_batch(tree)

    @property
    def num_devices(self) -> int:
        return 1 if self.layout is None else math.prod(self.layout.mesh.shape.values())
