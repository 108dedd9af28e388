"""What serving a checkpoint holds on each device, planned before the pools are allocated.

``LLM`` sizes its pools with ``plan`` and keeps the result (``LLM.memory``);
``scripts/memory_plan.py`` runs the same function on abstract meshes for clusters this
machine does not have (docs/MEMORY_PLAN.md). Per device:

* **weights**: the held param tree (``held.Held``: FP8 / MXFP4 bytes and their scales when
  packed, else dequantized) split by the rules table: each leaf's shard shape on the mesh
  (``NamedSharding.shard_shape``, real or abstract mesh);
* **KV**: ``profiles.plan_pools`` over the state accounting (``model.accounting.kv_bytes``,
  ARCHITECTURE.md §10) and the penalty tables, inside a budget: on accelerators
  ``gpu_memory_utilization`` × device memory − weights − step temporaries; on CPU the stated
  host budget, split over the sequence shards (fake CPU devices share the host);
* **temporaries**: ``TEMP_RESERVE_BYTES`` until the runner has compiled its step shapes, then
  the largest ``memory_analysis().temp_size_in_bytes`` among them
  (``JaxModelRunner.precompile``).

``allocated`` measures what was (or, on abstract values, would be) allocated: a test checks
that it equals the plan, on the demo and at Flash widths on 8 fake devices.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4_jax.checkpoint import layout as ckpt_layout
from dsv4_jax.checkpoint import placement
from dsv4_jax.config import Config
from dsv4_jax.engine.profiles import TEMP_RESERVE_BYTES, EngineConfig, PoolPlan, kv_budget, plan_pools
from dsv4_jax.engine.runner.layout import TABLE_DTYPES, tree_bytes
from dsv4_jax.model.accounting import kv_bytes, mtp_window_bytes
from dsv4_jax.model.params import ArrayInfo, abstract_params, from_native, param_infos
from dsv4_jax.model.state import KVFormat
from dsv4_jax.quant import QuantizedWeight


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes on one device (the figures) and how the KV budget was reached."""

    devices: int
    device_bytes: int  # one accelerator's memory, or the host's on CPU
    weights: int  # held params
    pools: PoolPlan  # sizes; ``pools.bytes_per_shard`` is the KV state on one device
    temps: int  # compiled step temporaries (the reserve until measured)
    temps_source: str
    budget: int  # one device's KV budget

    @property
    def kv(self) -> int:
        return self.pools.bytes_per_shard

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.temps

    def seqs_budget_holds(self, context: int) -> int:
        """Sequences of ``context`` tokens the KV budget alone would hold (each with its slot,
        tables and blocks; the snapshot store set aside), whatever the slot count."""
        p = self.pools
        per_slot = p.bytes_per_slot + p.table_bytes_per_slot
        store = (
            p.bytes_per_shard
            - p.num_blocks // p.shards * p.bytes_per_block
            - p.num_slots // p.shards * per_slot
        )
        need = -(-context // p.block_tokens) * p.bytes_per_block + per_slot
        return p.shards * max(0, (self.budget - store) // need)

    def as_dict(self) -> dict:
        return {
            "devices": self.devices,
            "device_bytes": self.device_bytes,
            "weights": self.weights,
            "kv": self.kv,
            "temps": self.temps,
            "temps_source": self.temps_source,
            "budget": self.budget,
            "total": self.total,
            "pools": dataclasses.asdict(self.pools),
        }

    def describe(self) -> str:
        g = 2**30
        return (
            f"per device: weights {self.weights / g:.2f} GiB, KV {self.kv / g:.2f} GiB "
            f"({self.pools.num_blocks // self.pools.shards} blocks, {self.pools.num_slots // self.pools.shards} slots, "
            f"{self.pools.num_snapshots} snapshots; {self.pools.budget or 'sized by slots x max_model_len'}), "
            f"step temporaries {self.temps / g:.2f} GiB ({self.temps_source})"
        )


def abstract_native(cfg: Config) -> dict:
    """The param tree as the published checkpoint stores it: ``QuantizedWeight`` of uint8
    bytes + UE8M0 scales for FP8/MXFP4 leaves, BF16/F32 arrays for the rest (shapes only)."""
    infos = param_infos(cfg, jnp.bfloat16, include_mtp=True)
    flat, treedef = jax.tree.flatten(infos, is_leaf=lambda x: isinstance(x, ArrayInfo))
    names = treedef.flatten_up_to(placement.leaf_names(infos))
    leaves = []
    for spec in ckpt_layout.leaf_specs(names, flat, cfg):
        if spec.quantized:
            lead = spec.info.shape[:1] if spec.stacked else ()
            leaves.append(
                QuantizedWeight(
                    jax.ShapeDtypeStruct(lead + spec.data_shape(), jnp.uint8),
                    jax.ShapeDtypeStruct(lead + spec.scale_shape(), jnp.uint8),
                    spec.fmt,
                    spec.block,
                )
            )
        elif spec.fmt == "index":
            leaves.append(jax.ShapeDtypeStruct(spec.info.shape, jnp.int32))
        else:
            dt = jnp.float32 if ckpt_layout.native_float_dtype(spec.name) == "F32" else jnp.bfloat16
            leaves.append(jax.ShapeDtypeStruct(spec.info.shape, dt))
    return jax.tree.unflatten(treedef, leaves)


def abstract_weights(cfg: Config, held) -> nnx.State:
    """The params as ``LLM`` would hold them in ``held``'s format (``held.Held``), shapes only:
    packed as the published checkpoint stores them, else dequantized into the compute dtype."""
    if held.weights == "packed":
        return from_native(cfg, abstract_native(cfg))
    return abstract_params(cfg, getattr(jnp, held.dtype), include_mtp=True)


def table_bytes_per_slot(cfg: Config) -> int:
    return sum(jnp.dtype(d).itemsize for d in TABLE_DTYPES) * cfg.vocab_size


def plan(
    cfg: Config,
    ec: EngineConfig,
    params,
    *,
    layout=None,
    backend: str,
    device_bytes: int,
    device_used: int | None = None,
    temps: int | None = None,
    temps_source: str = "",
) -> MemoryPlan:
    """The plan for serving ``params`` (held values, or the same tree abstract) under ``ec``
    (its ``kv_format`` resolved) on ``layout`` (``parallel.rules.Layout``; None: one device).
    ``device_bytes``: one accelerator's memory, or host memory on CPU. ``device_used``: bytes
    in use on a device once the weights are placed (measured by the server; default the
    weights). ``temps``: the measured step temporaries (default: the reserve)."""
    shardings = None if layout is None else layout.param_shardings(params, cfg)
    weights = tree_bytes(params, shardings)
    shards = 1 if layout is None else layout.num_seq_shards
    devices = 1 if layout is None else math.prod(layout.mesh.shape.values())
    if temps is None and backend == "cpu":
        temps, temps_source = 0, "host memory, outside the KV budget; measured once the steps compile"
    elif temps is None:
        temps, temps_source = TEMP_RESERVE_BYTES, "reserve until the steps compile"
    if backend == "cpu":
        b, why = kv_budget(ec, backend, host_total=device_bytes)
        b = b // shards  # fake CPU devices share the host's budget
    else:
        used = weights if device_used is None else device_used
        b, why = kv_budget(ec, backend, device_limit=device_bytes, device_used=used, temps=temps)
    fmt = KVFormat.parse(ec.kv_format)
    acc = kv_bytes(cfg, fmt)
    # MTP speculative decoding: each slot (and each SWA snapshot) also holds the MTP block's window
    mtp = mtp_window_bytes(cfg, fmt) if ec.speculative_tokens else 0
    pools = plan_pools(
        ec,
        acc.bytes_per_token,
        acc.fixed_bytes_per_seq + mtp,
        cfg.max_position_embeddings,
        shards,
        budget=(b, why),
        table_bytes_per_slot=table_bytes_per_slot(cfg),
    )
    return MemoryPlan(devices, device_bytes, weights, pools, temps, temps_source, b)


def allocated(placement) -> int:
    """KV bytes one device holds for a ``runner.layout.RunnerLayout``'s allocations (decode
    state, snapshot store, penalty tables), from the initialisers the runner calls, evaluated
    abstractly: the shard shapes their ``out_shardings`` give, nothing allocated."""
    trees = (
        placement.init_state(abstract=True),
        placement.init_snapshots(abstract=True),
        *(placement.init_table(d, abstract=True) for d in TABLE_DTYPES),
    )
    return tree_bytes(trees)
