"""Checkpoint I/O: the published safetensors format in, orbax out, one loader for both.

``load_checkpoint(dir, dtype)`` is what the server calls; it accepts a native
DeepSeek-V4 safetensors directory (ARCHITECTURE.md §8) or an orbax directory
written by ``scripts/convert_checkpoint.py``. Files by role:

* ``safetensors_io``     header parsing, lazy validated tensor reads
* ``layout``             native tensor names/formats a config implies; directory validation
* ``safetensors_loader`` native tensors -> param tree (dequantized or packed)
* ``safetensors_writer`` param tree -> native tensors (demo and synthetic checkpoints)
* ``orbax_io``           chunked, restartable conversion; mesh-agnostic restore
* ``placement``          shardings for loaded arrays; the chunking of the tree
* ``tokenizer``          ``tokenizer.json`` with DeepSeek's special tokens (§9)
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4_jax.checkpoint.errors import CheckpointError
from dsv4_jax.checkpoint.orbax_io import convert, is_orbax_checkpoint, load_orbax
from dsv4_jax.checkpoint.safetensors_loader import SafetensorsLoader, load_safetensors
from dsv4_jax.checkpoint.tokenizer import load_tokenizer
from dsv4_jax.config import Config
from dsv4_jax.parallel.rules import DEFAULT_RULES


def load_checkpoint(
    directory: str | os.PathLike,
    dtype=jnp.bfloat16,
    *,
    storage: str = "dequantized",
    mesh: jax.sharding.Mesh | None = None,
    rules: Mapping[str, str | None] = DEFAULT_RULES,
    include_mtp: bool = True,
) -> tuple[Config, nnx.State]:
    """``(cfg, params)`` from a safetensors or an orbax checkpoint directory; ``params`` is the
    model's ``nnx.State`` (``model.transformer.forward`` takes it).

    ``dtype``: float32 for tests, bfloat16 for serving (leaves ``params.py`` keeps in
    fp32 stay fp32). ``storage="packed"`` keeps FP8/MXFP4 weights as
    ``quant.QuantizedWeight``; the model code needs the default, plain arrays.
    ``mesh``: place every leaf sharded by the logical-axis rules (else one device).
    """
    d = os.fspath(directory)
    if not os.path.isdir(d):
        raise CheckpointError(f"{d}: not a directory")
    if is_orbax_checkpoint(d):
        return load_orbax(d, dtype, storage=storage, mesh=mesh, rules=rules, include_mtp=include_mtp)
    return load_safetensors(d, dtype, storage=storage, mesh=mesh, rules=rules, include_mtp=include_mtp)


__all__ = [
    "CheckpointError",
    "SafetensorsLoader",
    "convert",
    "is_orbax_checkpoint",
    "load_checkpoint",
    "load_orbax",
    "load_safetensors",
    "load_tokenizer",
]
