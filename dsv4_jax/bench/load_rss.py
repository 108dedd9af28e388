"""Peak host memory (RSS) of checkpoint loading, for docs/PERF.md ("Checkpoint loading").

    python scripts/measure_load_rss.py [--workdir /tmp/dsv4_rss] [--skip-synthetic]

Cases, each in a fresh subprocess so its peak (``VmHWM`` of ``/proc/self/status``)
is its own: the bundled demo, and a synthetic 2.1 GB checkpoint in the published
format (8 layers + MTP at hidden 2048, 52 MXFP4 experts per layer, FP8 linears;
one shard per layer as the real one has), loaded as bf16 and as packed weights,
converted to orbax, and loaded back from orbax. The synthetic weights are random
bytes (valid e4m3 codes, any e2m1 nibbles, scales near 1): what is measured is
memory, not numerics, and quantizing 4 G random floats would take minutes.

The claim under test (issue 3): peak - baseline stays near the output plus one
shard, never the whole checkpoint on top of the output. The baseline is the RSS
after importing jax and the loader, before the load starts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
DEMO = os.path.join(ROOT, "checkpoints", "demo")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(args) -> None:
    """Run one case in this process and print a JSON line of measurements."""
    import jax
    import jax.numpy as jnp

    from dsv4_jax.checkpoint import convert, load_checkpoint
    from dsv4_jax.quant import is_quantized

    jax.devices()
    base = _status_kb("VmRSS")
    t = time.time()
    if args.case == "convert":
        convert(args.src, args.dst, storage="packed")
        out_bytes = 0
    else:
        src = args.dst if args.case == "orbax" else args.src
        dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
        _, params = load_checkpoint(src, dtype, storage=args.storage)
        leaves = jax.tree.leaves(
            jax.tree.map(lambda x: (x.data, x.scale) if is_quantized(x) else x, params, is_leaf=is_quantized)
        )
        jax.block_until_ready(leaves)
        out_bytes = sum(x.nbytes for x in leaves)
    print(
        json.dumps(
            {
                "baseline_kb": base,
                "peak_kb": _status_kb("VmHWM"),
                "out_bytes": out_bytes,
                "seconds": round(time.time() - t, 1),
            }
        )
    )


# ----------------------------------------------------------------------------- synthetic checkpoint
def synthetic_config():
    from dsv4_jax.config import Config, YarnScaling

    return Config(
        vocab_size=32768,
        hidden_size=2048,
        num_hidden_layers=8,
        num_attention_heads=16,
        head_dim=512,
        qk_rope_head_dim=64,
        q_lora_rank=512,
        o_groups=4,
        o_lora_rank=512,
        sliding_window=128,
        index_n_heads=16,
        index_head_dim=128,
        index_topk=64,
        compress_ratios=(0, 0, 4, 128, 4, 128, 4, 128, 0),
        n_routed_experts=52,
        num_experts_per_tok=6,
        moe_intermediate_size=1024,
        num_hash_layers=3,
        routed_scaling_factor=1.5,
        rope_scaling=YarnScaling(16.0, 65536, 32.0, 1.0),
        weight_dtype="fp8",
        expert_dtype="fp4",
    )


def random_bytes_tensors(spec, cfg, rng):
    """Native tensors of one leaf made of random valid bytes (no quantization pass)."""
    import ml_dtypes
    import numpy as np

    from dsv4_jax.checkpoint import layout

    out = {}
    if spec.fmt == "index":
        return {spec.sources[0]: rng.integers(0, cfg.n_routed_experts, spec.info.shape, dtype=np.int64)}
    for src in spec.sources:
        if spec.fmt == "float":
            dt = ml_dtypes.bfloat16 if layout.native_float_dtype(spec.name) == "BF16" else np.float32
            out[src] = rng.standard_normal(spec.source_shape, dtype=np.float32).astype(dt)
            continue
        data = rng.integers(0, 256, spec.data_shape(), dtype=np.uint8)
        if spec.fmt == "fp8":
            data[(data & 0x7F) == 0x7F] ^= 1  # 0x7F / 0xFF are e4m3fn NaN
            out[src] = data.view(ml_dtypes.float8_e4m3fn)
        else:
            out[src] = data.view(np.int8)
        scale = rng.integers(118, 128, spec.scale_shape(), dtype=np.uint8)
        out[layout.scale_name(src)] = scale.view(ml_dtypes.float8_e8m0fnu)
    return out


def build_synthetic(path: str) -> None:
    import numpy as np

    from dsv4_jax.checkpoint.placement import chunk_keys
    from dsv4_jax.checkpoint.safetensors_writer import write_native

    cfg = synthetic_config()
    rng = np.random.default_rng(0)
    write_native(path, cfg, [[k] for k in chunk_keys(cfg)], lambda s: random_bytes_tensors(s, cfg, rng))


def dir_bytes(path: str, suffix: str = "") -> tuple[int, int]:
    """(total bytes, largest file) of the files under ``path`` ending in ``suffix``."""
    sizes = [
        os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs if f.endswith(suffix)
    ]
    return sum(sizes), max(sizes)


def run(case: str, src: str, dst: str = "", dtype: str = "bfloat16", storage: str = "dequantized") -> dict:
    cmd = [  # this module's main in a fresh interpreter (``-m``: no script path needed)
        sys.executable,
        "-m",
        "dsv4_jax.bench.load_rss",
        "--child",
        case,
        "--src",
        src,
        "--dst",
        dst,
        "--dtype",
        dtype,
        "--storage",
        storage,
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    """``scripts/measure_load_rss.py``; with ``--child`` (internal), one case in this process."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/dsv4_rss")
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--src", default="", help=argparse.SUPPRESS)
    ap.add_argument("--dst", default="", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    ap.add_argument("--storage", default="dequantized", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.case = args.child
        child(args)
        return 0
    import shutil

    os.makedirs(args.workdir, exist_ok=True)
    targets = [("demo", DEMO)]
    if not args.skip_synthetic:
        syn = os.path.join(args.workdir, "synthetic-2g")
        if not os.path.exists(os.path.join(syn, "config.json")):
            t = time.time()
            build_synthetic(syn)
            print(f"built {syn} in {time.time() - t:.0f} s", file=sys.stderr)
        targets.append(("synthetic", syn))
    rows = []
    for label, src in targets:
        total, shard = dir_bytes(src, ".safetensors")
        orb = os.path.join(args.workdir, f"{label}-orbax")
        shutil.rmtree(orb, ignore_errors=True)
        cases = [
            ("safetensors", "bfloat16", "dequantized"),
            ("safetensors", "float32", "dequantized"),
            ("safetensors", "bfloat16", "packed"),
            ("convert", "", ""),
            ("orbax", "bfloat16", "dequantized"),
            ("orbax", "bfloat16", "packed"),
        ]
        if label == "synthetic":
            cases.remove(("safetensors", "float32", "dequantized"))  # 13 GB of output: beyond this host
        for case, dtype, storage in cases:
            r = run(case, src, orb, dtype or "bfloat16", storage or "dequantized")
            rows.append((label, total, shard, case, dtype, storage, r))
            print(label, case, dtype, storage, r, file=sys.stderr, flush=True)
    mib = lambda b: f"{b / 2**20:,.0f}"
    print(
        "| checkpoint (total / largest shard, MiB) | operation | output dtype / storage | output MiB "
        "| baseline RSS MiB | peak RSS MiB | peak − baseline MiB | (peak − baseline) − output, MiB | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label, total, shard, case, dtype, storage, r in rows:
        base, peak = r["baseline_kb"] * 1024, r["peak_kb"] * 1024
        what = "convert → orbax (packed)" if case == "convert" else f"load {case}"
        kind = "—" if case == "convert" else f"{dtype} / {storage}"
        print(
            f"| {label} ({mib(total)} / {mib(shard)}) | {what} | {kind} | {mib(r['out_bytes'])} | {mib(base)} "
            f"| {mib(peak)} | {mib(peak - base)} | {mib(peak - base - r['out_bytes'])} | {r['seconds']} |"
        )
    return 0


if __name__ == "__main__":  # the children of ``run``
    sys.exit(main())
