"""Write a param tree in the published DeepSeek-V4 format (ARCHITECTURE.md §8).

The inverse of ``safetensors_loader``: float weights in, native tensors out, with
the same names, dtypes and layout a real ``DeepSeek-V4-Flash`` directory has.
FP8 linears become F8_E4M3 + F8_E8M0 ``.scale`` (128x128 blocks), routed experts
become I8 packed e2m1 + F8_E8M0 per 32 inputs, one tensor per expert; ``tid2eid``
becomes I64; the rest BF16 or F32 per the §8 table (``layout.native_float_dtype``).
Shards are written with the ``safetensors`` library (``{"format": "pt"}``
metadata, as the published shards carry) plus ``model.safetensors.index.json``.

It builds the bundled demo checkpoint and the synthetic checkpoints of the
memory measurement, so values are produced one chunk at a time through a
callback and host memory holds a single shard.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable, Iterable

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from dsv4_jax.checkpoint import layout, placement
from dsv4_jax.checkpoint.safetensors_io import INDEX_FILE
from dsv4_jax.config import Config
from dsv4_jax.quant import QuantizedWeight

_NP = {"BF16": ml_dtypes.bfloat16, "F32": np.float32}


def native_tensors(spec: layout.LeafSpec, value: np.ndarray) -> dict[str, np.ndarray]:
    """One leaf's value (float, or int for ``tid2eid``) as its native tensors."""
    if spec.fmt == "index":
        return {spec.sources[0]: np.asarray(value, np.int64)}
    parts = list(value) if spec.stacked else [value]
    out: dict[str, np.ndarray] = {}
    for src, w in zip(spec.sources, parts):
        if spec.fmt == "float":
            out[src] = np.asarray(w, np.float32).astype(_NP[layout.native_float_dtype(spec.name)])
            continue
        q = QuantizedWeight.quantize(np.asarray(w, np.float32), spec.fmt, spec.block)
        out[src] = q.data.view(ml_dtypes.float8_e4m3fn) if spec.fmt == "fp8" else q.data.view(np.int8)
        out[layout.scale_name(src)] = q.scale.view(ml_dtypes.float8_e8m0fnu)
    return out


def shard_name(k: int, n: int) -> str:
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def write_native(
    directory: str,
    cfg: Config,
    shards: Iterable[list[str]],
    tensors_for: Callable[[layout.LeafSpec], dict[str, np.ndarray]],
    extra_config: dict | None = None,
) -> None:
    """Write ``config.json``, the shards and the index into ``directory``.

    ``shards``: the chunk keys each shard holds, in order (every key exactly once).
    ``tensors_for(spec)``: the native tensors of one leaf, usually
    ``native_tensors(spec, value)`` of a float value (see ``random_value``).
    ``extra_config``: keys merged into ``config.json`` (e.g. ``torch_dtype``).
    """
    os.makedirs(directory, exist_ok=True)
    plan = [list(s) for s in shards]
    keys = [k for s in plan for k in s]
    want = placement.chunk_keys(cfg, include_mtp=True)
    if sorted(keys) != sorted(want):
        raise ValueError(f"shards must cover each chunk once: got {keys}, need {want}")
    weight_map: dict[str, str] = {}
    total = 0
    for k, chunk_keys in enumerate(plan, start=1):
        fname = shard_name(k, len(plan))
        tensors: dict[str, np.ndarray] = {}
        for key in chunk_keys:
            for spec in layout.chunk_specs(cfg, key):
                tensors.update(tensors_for(spec))
        save_file(tensors, os.path.join(directory, fname), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = fname
            total += t.nbytes
        del tensors
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        f.write("\n")
    conf = {**cfg.to_dict(), **(extra_config or {})}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(conf, f, indent=2, ensure_ascii=False)
        f.write("\n")


def random_value(spec: layout.LeafSpec, cfg: Config, seed: int) -> np.ndarray:
    """Deterministic random value of one leaf (numpy ``RandomState``, seeded per leaf name).

    Same conventions as ``params.init_params``: linears N(0, 1/fan_in), norms 1 ± 0.25,
    mHC scales U(0.5, 1.5), sinks / ape / biases / mHC bases / embeddings N(0, 1), and
    ``tid2eid`` rows of distinct experts (HF_ORACLE.md §8.2). Seeding by name makes each
    leaf independent of the order and sharding it is written in.
    """
    info = spec.info
    rng = np.random.RandomState((seed * 1_000_003 + zlib.crc32(spec.name.encode())) % 2**32)
    shape = info.shape
    if info.init == "tid2eid":
        return np.stack([rng.permutation(cfg.n_routed_experts)[: shape[1]] for _ in range(shape[0])])
    if info.init == "linear":
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
    if info.init == "norm":
        return (1.0 + 0.25 * rng.standard_normal(shape)).astype(np.float32)
    if info.init == "scale":
        return (0.5 + rng.random_sample(shape)).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)
