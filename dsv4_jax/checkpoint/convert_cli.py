"""Convert a native DeepSeek-V4 safetensors directory into an orbax checkpoint.

    python scripts/convert_checkpoint.py SRC_DIR DST_DIR [--storage packed|bfloat16|float32]
                                         [--mesh expert=2,tensor=4] [--max-chunks N]

SRC_DIR is a directory as published (``config.json``, ``model.safetensors.index.json``,
shards; ARCHITECTURE.md §8), e.g. ``checkpoints/demo``. DST_DIR receives one
orbax checkpoint per chunk (globals, each layer, each MTP block) plus the config
and tokenizer files, and loads with ``dsv4_jax.checkpoint.load_checkpoint`` onto
any device mesh. The whole source is validated before anything is written.

Restartable: an interrupted run leaves the finished chunks recorded in
``DST_DIR/dsv4_orbax.json``; rerunning the same command continues from there.
``--storage packed`` (default) keeps FP8 / MXFP4 weights as bytes + UE8M0 scales,
lossless and the size of the source; ``bfloat16`` / ``float32`` store them
dequantized. ``--mesh`` lays arrays out over this host's devices while converting
(useful when one layer does not fit one device); the result restores onto any mesh.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
from tqdm import tqdm

from dsv4_jax.checkpoint import CheckpointError, SafetensorsLoader, convert
from dsv4_jax.checkpoint.orbax_io import STORAGES
from dsv4_jax.checkpoint.placement import chunk_keys


def parse_mesh(spec: str | None) -> jax.sharding.Mesh | None:
    """``expert=2,tensor=4`` -> a Mesh over this host's devices (axis types Auto)."""
    if not spec:
        return None
    try:
        pairs = [p.split("=") for p in spec.split(",")]
        names, sizes = tuple(n.strip() for n, _ in pairs), tuple(int(s) for _, s in pairs)
    except ValueError:
        raise SystemExit(f"--mesh: expected NAME=SIZE[,NAME=SIZE...], got {spec!r}") from None
    return jax.make_mesh(sizes, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", help="native safetensors checkpoint directory")
    ap.add_argument("dst", help="output directory (created; an unfinished conversion there is resumed)")
    ap.add_argument("--storage", choices=sorted(STORAGES), default="packed")
    ap.add_argument("--mesh", default=None, help="e.g. expert=2,tensor=4 (default: one device)")
    ap.add_argument("--max-chunks", type=int, default=None, help="convert at most N chunks, then stop")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    args = ap.parse_args(argv)
    t0 = time.time()
    try:
        loader = SafetensorsLoader(args.src)  # validate and size the source before writing anything
        total = sum(loader.chunk_bytes(k) for k in chunk_keys(loader.cfg))
        with tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=args.no_progress) as bar:

            def on_chunk(key: str, skipped: bool) -> None:
                bar.set_postfix_str(f"{key} {'(done before)' if skipped else 'saved'}")
                if args.no_progress:
                    print(f"{key}: {'already converted' if skipped else 'saved'}", flush=True)

            m = convert(
                args.src,
                args.dst,
                storage=args.storage,
                mesh=parse_mesh(args.mesh),
                max_chunks=args.max_chunks,
                on_bytes=bar.update,
                on_chunk=on_chunk,
            )
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    state = "complete" if m["complete"] else f"stopped after {len(m['done'])}/{len(m['chunks'])} chunks"
    print(f"{args.dst}: {state} ({args.storage}, {time.time() - t0:.1f} s)")
    return 0
