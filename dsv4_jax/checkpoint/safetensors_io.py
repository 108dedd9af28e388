"""Lazy, validated reading of a safetensors checkpoint directory (ARCHITECTURE.md §8).

The file format is small enough to read directly: 8 bytes of little-endian header
length ``n``, ``n`` bytes of JSON (``{name: {dtype, shape, data_offsets}}`` plus an
optional ``__metadata__``), then the raw tensor bytes, offsets relative to the end
of the header. We parse it here rather than through ``safetensors.safe_open``
because that library's numpy backend cannot materialize the F8 dtypes a real
checkpoint is made of (``safe_open(framework="numpy").get_tensor`` on an
``F8_E4M3`` tensor raises ``AttributeError: module 'numpy' has no attribute
'float8_e4m3fn'``, safetensors 0.8.0). The library writes the demo checkpoint
and, in the tests, cross-checks this reader byte for byte.

Reading is lazy: opening a directory reads only the index and the shard headers;
``read(name)`` then reads exactly one tensor's bytes with ``readinto`` into a fresh
buffer. Nothing is memory-mapped, so host memory holds the tensors being
converted and the output, never a whole shard or the whole model.

Every structural fault is found when the directory is opened, before any data is
read: a missing shard, an index that disagrees with the shard headers, a tensor
listed twice, an unknown dtype, a size that disagrees with shape × dtype, and a
truncated file (a tensor whose byte range runs past the end of its file).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct

import ml_dtypes
import numpy as np

from dsv4_jax.checkpoint.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MAX_HEADER = 256 << 20  # a 69k-tensor header is ~5 MB; anything near this is corruption

# safetensors dtype string -> numpy dtype of the returned array. F8_E8M0 comes back
# as the raw exponent bytes (uint8), the form quant.py and QuantizedWeight use.
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(np.uint8),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes live: ``offset`` is absolute within ``file``."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def filename(self) -> str:
        return os.path.basename(self.file)


def read_header(path: str) -> tuple[dict[str, TensorEntry], dict]:
    """Parse and validate one ``.safetensors`` header: ``({name: entry}, metadata)``."""
    fname = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{fname}: truncated file ({size} bytes; not even a header length)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{fname}: truncated or corrupt file: header length {n} but the file has {size} bytes"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{fname}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{fname}: corrupt header, not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{fname}: corrupt header, expected a JSON object")
    meta = header.pop("__metadata__", None) or {}
    start = 8 + n
    entries: dict[str, TensorEntry] = {}
    for name, h in header.items():
        try:
            dtype, shape, (b, e) = h["dtype"], tuple(int(s) for s in h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{fname}: tensor {name}: malformed header entry {h!r}") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{fname}: tensor {name}: unsupported dtype {dtype!r}")
        want = math.prod(shape) * DTYPES[dtype].itemsize
        if not (0 <= b <= e) or e - b != want:
            raise CheckpointError(
                f"{fname}: tensor {name}: data_offsets [{b}, {e}] hold {e - b} bytes, "
                f"but {dtype} {list(shape)} needs {want}"
            )
        if start + e > size:
            raise CheckpointError(
                f"{fname}: truncated file: tensor {name} ends at byte {start + e} "
                f"but the file has only {size} bytes"
            )
        entries[name] = TensorEntry(name, path, dtype, shape, start + b, e - b)
    return entries, meta


def read_tensor(entry: TensorEntry) -> np.ndarray:
    """Read one tensor's bytes into a new array of its natural numpy dtype (``DTYPES``)."""
    buf = np.empty(entry.nbytes, np.uint8)
    try:
        with open(entry.file, "rb") as f:
            f.seek(entry.offset)
            got = f.readinto(memoryview(buf)) if entry.nbytes else 0
    except OSError as e:
        raise CheckpointError(
            f"{entry.filename}: tensor {entry.name}: read failed ({e.strerror or e})"
        ) from None
    if got != entry.nbytes:
        raise CheckpointError(
            f"{entry.filename}: truncated file: tensor {entry.name} needs {entry.nbytes} bytes "
            f"at offset {entry.offset}, only {got} could be read"
        )
    return buf.view(DTYPES[entry.dtype]).reshape(entry.shape)


class SafetensorsCheckpoint:
    """The tensors of a checkpoint directory: ``model.safetensors.index.json`` + shards,
    or a single ``model.safetensors``. Headers are read and cross-checked on open."""

    def __init__(self, directory: str):
        self.directory = os.fspath(directory)
        index_path = os.path.join(self.directory, INDEX_FILE)
        if os.path.exists(index_path):
            self.entries = self._open_sharded(index_path)
        elif os.path.exists(os.path.join(self.directory, SINGLE_FILE)):
            self.entries, _ = read_header(os.path.join(self.directory, SINGLE_FILE))
        else:
            raise CheckpointError(
                f"{self.directory}: no {INDEX_FILE} and no {SINGLE_FILE}; not a safetensors checkpoint"
            )

    def _open_sharded(self, index_path: str) -> dict[str, TensorEntry]:
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{INDEX_FILE}: not valid JSON ({e})") from None
        except (KeyError, TypeError):
            raise CheckpointError(f"{INDEX_FILE}: no 'weight_map' object") from None
        by_shard: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            by_shard.setdefault(shard, []).append(name)
        entries: dict[str, TensorEntry] = {}
        for shard, names in by_shard.items():
            path = os.path.join(self.directory, shard)
            if not os.path.exists(path):
                raise CheckpointError(
                    f"missing shard {shard}: {INDEX_FILE} maps {len(names)} tensors to it "
                    f"(e.g. {min(names)}) but the file is not in {self.directory}"
                )
            found, _ = read_header(path)
            listed = set(names)
            for name in names:
                if name not in found:
                    raise CheckpointError(
                        f"{shard}: tensor {name} is listed in {INDEX_FILE} but not in the shard"
                    )
            for name in found:
                if name not in listed:
                    where = weight_map.get(name)
                    extra = f" (the index puts it in {where})" if where else ""
                    raise CheckpointError(
                        f"{shard}: tensor {name} is in the shard but not listed in {INDEX_FILE}{extra}"
                    )
            entries.update(found)
        return entries

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def entry(self, name: str) -> TensorEntry:
        return self.entries[name]

    def read(self, name: str) -> np.ndarray:
        return read_tensor(self.entries[name])

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())
