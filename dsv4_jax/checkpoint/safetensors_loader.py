"""Native safetensors directory (ARCHITECTURE.md §8) -> the param pytree of ``params.py``.

Data flow, one leaf at a time so host memory stays near one tensor plus the output:

    config.json ──> Config ──> param_infos(cfg, dtype) ──> LeafSpec per leaf (layout.py)
    index + shard headers ──> validate(): every tensor present, expected, right dtype/shape
    per leaf: read bytes ──> dequantize (quant.py) or keep packed ──> device_put (sharded)

Dequantization follows §8 exactly (``quant.dequantize_blocks``); ``storage="packed"``
keeps FP8 / MXFP4 weights as ``QuantizedWeight`` (bytes + UE8M0 scales, experts
stacked ``[E, ...]``), the form a low-precision kernel consumes. ``tid2eid`` is
read as I64 and stored int32 after a range check (§11.5).

The output dtype of each leaf is the one ``param_infos(cfg, dtype)`` gives it: the
requested ``dtype`` for weights, float32 for the tensors the reference keeps in
fp32 (norms, mHC, sinks, ``ape``, router bias, compressor projections).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv4_jax.checkpoint import layout, placement
from dsv4_jax.checkpoint.errors import CheckpointError
from dsv4_jax.checkpoint.safetensors_io import SafetensorsCheckpoint
from dsv4_jax.config import Config, ConfigError
from dsv4_jax.model.params import ArrayInfo, from_native, param_infos
from dsv4_jax.parallel.rules import DEFAULT_RULES
from dsv4_jax.quant import QuantizedWeight, dequantize_blocks

STORAGES = ("dequantized", "packed")


def read_config(directory: str) -> Config:
    """``config.json`` of a checkpoint directory; config faults become ``CheckpointError``."""
    try:
        return Config.from_json(directory)
    except ConfigError as e:
        raise CheckpointError(f"{directory}/config.json: {e}") from None


def _is_info(x) -> bool:
    return isinstance(x, ArrayInfo)


class SafetensorsLoader:
    """A validated native checkpoint, loadable chunk by chunk (``placement.chunk_keys``).

    Opening reads ``config.json``, the index and all shard headers and runs
    ``layout.validate``; no tensor data is read until ``load_chunk``.
    """

    def __init__(self, directory: str, dtype=jnp.bfloat16, cfg: Config | None = None):
        self.directory = str(directory)
        self.cfg = cfg if cfg is not None else read_config(self.directory)
        self.dtype = jnp.dtype(dtype)
        self.ckpt = SafetensorsCheckpoint(self.directory)
        self.infos = param_infos(self.cfg, self.dtype, include_mtp=True)
        names = placement.leaf_names(self.infos)
        flat_names = jax.tree.leaves(names)
        flat_infos = jax.tree.leaves(self.infos, is_leaf=_is_info)
        specs = layout.leaf_specs(flat_names, flat_infos, self.cfg)
        self.specs = {s.name: s for s in specs}
        self.names = names
        layout.validate(self.ckpt, specs, self.cfg)

    # ------------------------------------------------------------------ host side
    def _read(self, name: str) -> np.ndarray:
        return self.ckpt.read(name)

    def _read_scale(self, weight_name: str) -> np.ndarray:
        name = layout.scale_name(weight_name)
        s = self._read(name)
        if np.any(s == 255):
            raise CheckpointError(
                f"{self.ckpt.entry(name).filename}: tensor {name}: UE8M0 byte 255 (NaN scale)"
            )
        return s

    def read_leaf(self, spec: layout.LeafSpec, storage: str = "dequantized"):
        """One leaf on the host: ``np.ndarray`` or (packed) ``QuantizedWeight`` of numpy arrays."""
        out_dtype = np.dtype(spec.info.dtype)
        if spec.fmt == "index":
            return self._read_index(spec)
        if spec.fmt == "float":
            if not spec.stacked:
                return self._read(spec.sources[0]).astype(out_dtype)
            out = np.empty(spec.info.shape, out_dtype)
            for j, src in enumerate(spec.sources):
                out[j] = self._read(src)
            return out
        if storage == "packed":
            lead = (len(spec.sources),) if spec.stacked else ()
            data = np.empty(lead + spec.data_shape(), np.uint8)
            scale = np.empty(lead + spec.scale_shape(), np.uint8)
            for j, src in enumerate(spec.sources):
                data[j if lead else ...] = self._read(src).view(np.uint8)
                scale[j if lead else ...] = self._read_scale(src)
            return QuantizedWeight(data, scale, spec.fmt, spec.block)
        out = np.empty(spec.info.shape, out_dtype)
        for j, src in enumerate(spec.sources):
            w = dequantize_blocks(self._read(src).view(np.uint8), self._read_scale(src), spec.fmt, spec.block)
            out[j if spec.stacked else ...] = w  # float32 -> out dtype; exact for bf16 (quant.py)
        return out

    def _read_index(self, spec: layout.LeafSpec) -> np.ndarray:
        src = spec.sources[0]
        t = self._read(src)
        e = self.cfg.n_routed_experts
        if t.size and (t.min() < 0 or t.max() >= e):
            raise CheckpointError(
                f"{self.ckpt.entry(src).filename}: tensor {src}: expert ids span [{t.min()}, {t.max()}], "
                f"outside [0, n_routed_experts={e}) of config.json"
            )
        return t.astype(np.int32)

    def source_bytes(self, spec: layout.LeafSpec) -> int:
        return sum(self.ckpt.entry(n).nbytes for n in spec.tensors())

    # ------------------------------------------------------------------ device side
    def load_chunk(
        self,
        key: str,
        storage: str = "dequantized",
        mesh: jax.sharding.Mesh | None = None,
        rules: Mapping[str, str | None] = DEFAULT_RULES,
        on_bytes: Callable[[int], None] | None = None,
    ):
        """The param sub-tree of chunk ``key`` as device arrays (each leaf read, converted, placed)."""
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
        names = placement.get_chunk(self.names, key)

        def load(name: str):
            spec = self.specs[name]
            host = self.read_leaf(spec, storage)
            axes = spec.info.axes
            if isinstance(host, QuantizedWeight):
                dev = QuantizedWeight(
                    placement.put(host.data, axes, mesh, rules),
                    placement.put(host.scale, axes, mesh, rules),
                    host.fmt,
                    host.block,
                )
            else:
                dev = placement.put(host, axes, mesh, rules)
            if on_bytes is not None:
                on_bytes(self.source_bytes(spec))
            return dev

        return jax.tree.map(load, names)

    def chunk_bytes(self, key: str) -> int:
        return sum(
            self.source_bytes(self.specs[n]) for n in jax.tree.leaves(placement.get_chunk(self.names, key))
        )


def load_safetensors(
    directory: str,
    dtype=jnp.bfloat16,
    *,
    storage: str = "dequantized",
    mesh: jax.sharding.Mesh | None = None,
    rules: Mapping[str, str | None] = DEFAULT_RULES,
    include_mtp: bool = True,
) -> tuple[Config, nnx.State]:
    """``(cfg, params)`` from a native safetensors directory (params: the model's ``nnx.State``);
    see the module docstring."""
    loader = SafetensorsLoader(directory, dtype)
    keys = placement.chunk_keys(loader.cfg, include_mtp)
    chunks = {k: loader.load_chunk(k, storage, mesh, rules) for k in keys}
    return loader.cfg, from_native(loader.cfg, placement.assemble(chunks), dtype)
