"""Orbax form of a checkpoint: restartable conversion and mesh-agnostic restore (TOOLCHAIN.md §7).

Directory layout written by ``convert``::

    DST/config.json, tokenizer.json, ...   copied from the source, unchanged
    DST/dsv4_orbax.json                    manifest: storage, chunk list, chunks done, complete
    DST/params/globals/                    one orbax checkpoint per chunk (placement.chunk_keys):
    DST/params/layers.{i}/                 embed/head/norm/HC head, each main layer,
    DST/params/mtp.{k}/                    each MTP block

One orbax checkpoint per chunk bounds host memory (one layer in flight, never the
whole model: Flash in bf16 is 568 GB) and makes conversion restartable: a chunk
is recorded in the manifest only after orbax has committed it, so a rerun skips
finished chunks and rewrites any partial one. Storage is a choice (``STORAGES``):
``packed`` keeps FP8 / MXFP4 weights as ``QuantizedWeight`` bytes + UE8M0 scales
(lossless, the size of the source), ``bfloat16`` / ``float32`` store dequantized
arrays. Leaves the tree keeps in fp32 (``params.py``) stay fp32 in every storage.

Restore builds abstract ``jax.ShapeDtypeStruct`` targets carrying the shardings of
the *caller's* mesh (``placement.fitted_sharding``), so a checkpoint saved from
any mesh restores onto any other; packed leaves are dequantized on device after
restore unless the caller asks for packed storage.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from dsv4_jax.checkpoint import layout, placement
from dsv4_jax.checkpoint.errors import CheckpointError
from dsv4_jax.checkpoint.safetensors_loader import SafetensorsLoader, read_config
from dsv4_jax.config import Config
from dsv4_jax.model.params import ArrayInfo, from_native, param_infos
from dsv4_jax.parallel.rules import DEFAULT_RULES
from dsv4_jax.quant import QuantizedWeight, is_quantized

MANIFEST = "dsv4_orbax.json"
PARAMS = "params"
FORMAT = "dsv4-jax-orbax"
VERSION = 1
SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
STORAGES = {"packed": jnp.bfloat16, "bfloat16": jnp.bfloat16, "float32": jnp.float32}


def is_orbax_checkpoint(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, MANIFEST))


def _read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from None
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        raise CheckpointError(f"{path}: not a {FORMAT} v{VERSION} manifest (format={m.get('format')!r})")
    return m


def _write_manifest(directory: str, m: dict) -> None:
    tmp = os.path.join(directory, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(m, f, indent=2)
        f.write("\n")
    os.replace(tmp, os.path.join(directory, MANIFEST))  # atomic: a crash leaves the old or the new


def _clear_partial(params_dir: str, key: str) -> None:
    """Remove a chunk's leftovers (a committed-but-unrecorded dir, orbax tmp dirs)."""
    for name in os.listdir(params_dir):
        if name == key or name.startswith(key + ".orbax-checkpoint-tmp"):
            shutil.rmtree(os.path.join(params_dir, name))


def convert(
    src: str,
    dst: str,
    *,
    storage: str = "packed",
    mesh: jax.sharding.Mesh | None = None,
    rules: Mapping[str, str | None] = DEFAULT_RULES,
    max_chunks: int | None = None,
    on_bytes: Callable[[int], None] | None = None,
    on_chunk: Callable[[str, bool], None] | None = None,
) -> dict:
    """Convert a native safetensors directory ``src`` into an orbax checkpoint at ``dst``.

    Restartable: rerunning with the same ``storage`` continues after the last
    committed chunk. ``max_chunks`` converts at most that many new chunks in this
    call (a conversion can be split over several runs). ``on_bytes(n)`` reports
    source bytes consumed (progress); ``on_chunk(key, skipped)`` each chunk.
    Returns the manifest.
    """
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {sorted(STORAGES)}, got {storage!r}")
    loader = SafetensorsLoader(src, STORAGES[storage])  # validates the whole source first
    keys = placement.chunk_keys(loader.cfg)
    os.makedirs(os.path.join(dst, PARAMS), exist_ok=True)
    fresh = {
        "format": FORMAT,
        "version": VERSION,
        "storage": storage,
        "config": loader.cfg.to_dict(),
        "chunks": keys,
        "done": [],
        "complete": False,
    }
    if is_orbax_checkpoint(dst):
        m = _read_manifest(dst)
        for field in ("storage", "config", "chunks"):
            old, new = m.get(field) or {}, fresh[field]
            if old != new:
                what = f"{old!r}, now {new!r}"
                if field == "config":
                    what = "differs in " + ", ".join(
                        sorted(k for k in {*old, *new} if old.get(k) != new.get(k))
                    )
                raise CheckpointError(
                    f"{dst}: holds a conversion with a different {field} ({what}); "
                    f"remove the directory or convert with the same options"
                )
    else:
        m = fresh
    for name in SIDE_FILES:
        if os.path.exists(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    _write_manifest(dst, m)
    params_dir = os.path.join(dst, PARAMS)
    ckptr = ocp.StandardCheckpointer()
    converted = 0
    for key in keys:
        if key in m["done"] and os.path.isdir(os.path.join(params_dir, key)):
            if on_bytes:
                on_bytes(loader.chunk_bytes(key))
            if on_chunk:
                on_chunk(key, True)
            continue
        if max_chunks is not None and converted >= max_chunks:
            return m
        if key in m["done"]:  # recorded, but its directory is gone: convert it again
            m["done"].remove(key)
        _clear_partial(params_dir, key)
        tree = loader.load_chunk(
            key, "packed" if storage == "packed" else "dequantized", mesh, rules, on_bytes
        )
        ckptr.save(os.path.join(params_dir, key), tree)
        ckptr.wait_until_finished()
        del tree
        m["done"].append(key)
        _write_manifest(dst, m)
        converted += 1
        if on_chunk:
            on_chunk(key, False)
    m["complete"] = True
    _write_manifest(dst, m)
    return m


# ----------------------------------------------------------------------------- restore
def _sharding(shape, axes, mesh, rules):
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return placement.fitted_sharding(tuple(shape), axes, mesh, rules)


@functools.cache
def _dequantizer(dtype, out_sharding):
    """One jitted dequantize per (dtype, output sharding): compiled once per distinct shape."""
    return jax.jit(lambda q: q.dequantize(dtype), out_shardings=out_sharding)


def _restore_chunk(ckptr, path: str, cfg: Config, key: str, stored: str, storage: str, dtype, mesh, rules):
    """Restore one chunk onto ``mesh``; dequantize packed leaves on device unless ``storage="packed"``.

    Plain leaves restore straight into the requested dtype (orbax casts); packed ones
    come back as bytes with the weight's logical axes (``placement`` fits them).
    """
    full = param_infos(cfg, dtype, include_mtp=True)
    infos = placement.get_chunk(full, key)
    names = placement.get_chunk(placement.leaf_names(full), key)
    specs = {s.name: s for s in layout.chunk_specs(cfg, key)}
    is_info = lambda x: isinstance(x, ArrayInfo)

    def target(name: str, info: ArrayInfo):
        spec = specs[name]
        if stored == "packed" and spec.quantized:
            lead = info.shape[:1] if spec.stacked else ()
            d, s = lead + spec.data_shape(), lead + spec.scale_shape()
            return QuantizedWeight(
                jax.ShapeDtypeStruct(d, jnp.uint8, sharding=_sharding(d, info.axes, mesh, rules)),
                jax.ShapeDtypeStruct(s, jnp.uint8, sharding=_sharding(s, info.axes, mesh, rules)),
                spec.fmt,
                spec.block,
            )
        return jax.ShapeDtypeStruct(
            info.shape, info.dtype, sharding=_sharding(info.shape, info.axes, mesh, rules)
        )

    abstract = jax.tree.map(target, names, infos)
    try:
        tree = ckptr.restore(path, abstract)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"{path}: cannot restore ({type(e).__name__}: {e})") from None
    if storage == "packed":
        return tree

    def dequant(x, info: ArrayInfo):
        if not is_quantized(x):
            return x
        return _dequantizer(jnp.dtype(info.dtype), _sharding(info.shape, info.axes, mesh, rules))(x)

    return jax.tree.map(dequant, tree, infos, is_leaf=lambda x: is_quantized(x) or is_info(x))


def load_orbax(
    directory: str,
    dtype=jnp.bfloat16,
    *,
    storage: str = "dequantized",
    mesh: jax.sharding.Mesh | None = None,
    rules: Mapping[str, str | None] = DEFAULT_RULES,
    include_mtp: bool = True,
) -> tuple[Config, nnx.State]:
    """``(cfg, params)`` from a directory written by ``convert``, placed on ``mesh``.

    ``storage="dequantized"`` returns plain arrays (packed leaves dequantized on
    device); ``"packed"`` returns ``QuantizedWeight`` where the checkpoint is packed.
    """
    m = _read_manifest(directory)
    if not m.get("complete"):
        raise CheckpointError(
            f"{directory}: incomplete conversion ({len(m.get('done', []))} of {len(m.get('chunks', []))} "
            f"chunks); rerun scripts/convert_checkpoint.py to finish it"
        )
    cfg = read_config(directory)
    if cfg.to_dict() != m["config"]:
        raise CheckpointError(
            f"{directory}/config.json: differs from the config the params were converted with"
        )
    ckptr = ocp.StandardCheckpointer()
    chunks = {}
    for key in placement.chunk_keys(cfg, include_mtp):
        path = os.path.join(directory, PARAMS, key)
        if not os.path.isdir(path):
            raise CheckpointError(f"{directory}: missing chunk {PARAMS}/{key}")
        chunks[key] = _restore_chunk(ckptr, path, cfg, key, m["storage"], storage, dtype, mesh, rules)
    return cfg, from_native(cfg, placement.assemble(chunks), dtype)
