"""Per-token decode time against context length, in-process through ``dsv4_jax.LLM``.

    python scripts/decode_sweep.py --plot docs/decode_sweep.png --json sweep.json
    python scripts/decode_sweep.py --contexts 1024,2048 --new-tokens 4 --size tiny   # smoke run

Config (``--size sweep``, the default): the shipped attention pattern at small widths — SWA,
CSA (m=4, lightning indexer, top-k 512 as shipped) and HCA (m=128) layers, hash and top-k
MoE, head dim 128 — so a 64K prefill fits in minutes on a CPU. Compressed attention should
keep decode nearly flat in context (ARCHITECTURE.md §5; SERVING.md §3: at batch 1 decode is
weight-bound at every context): per step a CSA layer reads top-k 512 entries plus all T/4
indexer keys, an HCA layer T/128 entries, every layer its 128-row window.

One engine sized for the largest context serves every point (batch 1, bf16 KV rows, prefix
cache off, prefill in 4096-token chunks); each point is a fresh random prompt of that
length followed by ``--new-tokens`` greedy tokens; the per-token time is the decode span
(first token → last token) over the tokens after the first.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from dsv4_jax.bench import decode
from dsv4_jax.bench.checkpoints import ROOT, SIZES, build_random, size_config
from dsv4_jax.config import Config

# The sweep's own size, beside the named ones of ``checkpoints.SIZES`` (not added to that table:
# the other benchmarks' sizes stay as they are): the demo's widths with the shipped top-k 512.
SWEEP_SIZES = {"sweep": ("tiny", {"index_topk": 512})}


def sweep_config(size: str) -> Config:
    """The ``Config`` of ``size``: ``sweep`` (``SWEEP_SIZES``) or a name of ``SIZES``."""
    base, overrides = SWEEP_SIZES.get(size, (size, {}))
    return size_config(base, **overrides)


def plot(points: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([p["context"] for p in points], [p["decode_ms_per_token"] for p in points], "o-")
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode ms / token (batch 1)")
    ax.set_title("decode time against context (CPU)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(argv=None) -> dict:
    """Parse ``argv`` (the script's flags), measure every context, return the points (also
    written with ``--json`` / ``--plot``)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--checkpoint", help="a checkpoint directory (default: build/cache checkpoints/bench-SIZE)"
    )
    ap.add_argument("--size", choices=sorted({*SIZES, *SWEEP_SIZES}), default="sweep")
    ap.add_argument("--contexts", default="1024,2048,4096,8192,16384,32768,65536")
    ap.add_argument("--new-tokens", type=int, default=17)
    ap.add_argument("--chunk", type=int, default=4096, help="prefill tokens per step")
    from dsv4_jax.launch import add_held_args

    add_held_args(ap)  # --weights / --kernels / --dtype
    ap.add_argument("--json", help="write the points here")
    ap.add_argument("--plot", help="write a PNG plot here")
    args = ap.parse_args(argv)
    ckpt = args.checkpoint or build_random(
        os.path.join(ROOT, "checkpoints", f"bench-{args.size}"), sweep_config(args.size)
    )
    contexts = [int(c) for c in args.contexts.split(",")]
    new = args.new_tokens
    held = {"weights": args.weights, "kernels": args.kernels, "dtype": args.dtype}
    llm = decode.make_llm(ckpt, held, 1, max(contexts) + new + 1, args.chunk)
    rng = np.random.RandomState(0)
    vocab = llm.model_config.vocab_size
    decode.run_llm(llm, [rng.randint(2, vocab, min(contexts)).tolist()], new)  # compile decode + chunks
    points = []
    for n in contexts:
        t = time.perf_counter()
        r = decode.run_llm(llm, [rng.randint(2, vocab, n).tolist()], new)
        points.append(
            {
                "context": n,
                "decode_ms_per_token": r["step_ms"],
                "prefill_s": r["prefill_s"],
                "wall_s": time.perf_counter() - t,
            }
        )
        print(
            f"context {n:6d}: decode {r['step_ms']:.2f} ms/token, prefill {r['prefill_s']:.1f} s", flush=True
        )
    first, last = points[0]["decode_ms_per_token"], points[-1]["decode_ms_per_token"]
    res = {
        "checkpoint": ckpt,
        "held": llm.held.describe(),
        "config": {
            "index_topk": llm.model_config.index_topk,
            "compress_ratios": llm.model_config.compress_ratios,
        },
        "max_model_len": max(contexts) + new + 1,
        "new_tokens": new,
        "points": points,
        "ratio_last_to_first": last / first,
    }
    print(f"per-token time at {contexts[-1]} / at {contexts[0]}: {last / first:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    if args.plot:
        plot(points, args.plot)
    return res


def main(argv=None) -> int:
    """``scripts/decode_sweep.py``: the points go to stdout / ``--json`` / ``--plot``; exit status 0."""
    run(argv)
    return 0
