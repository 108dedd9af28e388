"""Numerics report: each serving configuration's drift from float32, beside the HF port's bf16.

    python scripts/numerics_report.py                      # markdown table (docs/PERF.md)
    python scripts/numerics_report.py --json > numerics.json
    python scripts/numerics_report.py --checkpoints demo,narrow:1 --prompts 16 --configs all

Checkpoints: ``demo`` (the bundled one; prompts are windows of its held-out text) and
``SIZE:SEED[,SEED...]`` random checkpoints in the published format
(``dsv4_jax.bench.checkpoints.SIZES``; written once under ``checkpoints/numerics-*``; prompts
are random token ids). Configurations: ``--configs default|kernels|all``
(``dsv4_jax.bench.numerics.CONFIG_SETS``). Where a bf16 path diverges over the tolerance on a
prompt HF's bf16 keeps, the report reruns it with the float32 reference's router and indexer
picks imposed (``dsv4_jax.model.choices``): what still diverges is a precision loss, the rest
a flipped top-k choice. The HF columns need the ``oracle`` extra
(``make test`` installs it); ``--no-hf`` leaves them out. What each figure means:
``dsv4_jax/bench/numerics.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

DEFAULT_CHECKPOINTS = "demo,tiny:1,flashlike:1,narrow:1,mid:1"


def parse_checkpoints(spec: str) -> list[tuple[str, int | None]]:
    """``demo,narrow:1,2,tiny:3`` → [("demo", None), ("narrow", 1), ("narrow", 2), ("tiny", 3)]."""
    out: list[tuple[str, int | None]] = []
    size = None
    for part in spec.split(","):
        part = part.strip()
        if part == "demo":
            out.append(("demo", None))
            size = None
        elif ":" in part:
            size, seed = part.split(":", 1)
            out.append((size, int(seed)))
        elif part.isdigit() and size is not None:
            out.append((size, int(part)))
        else:
            raise SystemExit(f"--checkpoints: cannot read {part!r} (expected demo or SIZE:SEED)")
    return out


def table(report: dict) -> str:
    """The report as markdown: one row per (checkpoint, configuration), the HF bf16 copy first."""
    head = (
        "| checkpoint | configuration | reference | mean KL | top-1 | max / mean abs Δlogit | "
        "greedy equal (of prompts) | robust prompts: diverged, > 0.05 gap | router / indexer picks flipped | "
        "with the f32 picks imposed: diverged, > 0.05 gap |"
    )
    lines = [head, "|" + "---|" * 10]
    for ck in report["checkpoints"]:
        rows = [{"label": "HF port, model.to(bfloat16)", **ck["hf_bfloat16"]}] if "hf_bfloat16" in ck else []
        for r in rows + ck["rows"]:
            robust = (
                f"{r['robust_diverged']} of {r['robust_prompts']}, {r['robust_over_tolerance']}"
                if "robust_prompts" in r
                else ""
            )
            flips = (
                f"{r['router_pick_flips']:.4f} / {r.get('indexer_pick_flips', 0):.4f}"
                if "router_pick_flips" in r
                else ""
            )
            w = r.get("with_reference_picks")
            imposed = f"{w['robust_diverged']}, {w['robust_over_tolerance']}" if w else ""
            lines.append(
                f"| {ck['name']} | {r['label']} | {r['reference']} | {r['mean_kl']:.2e} | "
                f"{r['top1_agreement']:.4f} | {r['max_abs_logit_drift']:.3f} / {r['mean_abs_logit_drift']:.4f} | "
                f"{r['exact']} / {r['prompts']} | {robust} | {flips} | {imposed} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", default=DEFAULT_CHECKPOINTS, help=f"default {DEFAULT_CHECKPOINTS}")
    ap.add_argument("--configs", default="default", help="default | kernels | all")
    ap.add_argument("--prompts", type=int, default=64, help="prompts per checkpoint")
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt")
    ap.add_argument("--max-len", type=int, default=300, help="longest prompt (lengths uniform from 2)")
    ap.add_argument("--batch", type=int, default=16, help="prompts per state-path step")
    ap.add_argument("--no-hf", action="store_true", help="leave out the HF port's columns (no torch)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)

    import jax.numpy as jnp

    from dsv4_jax.bench import checkpoints as ck
    from dsv4_jax.bench import numerics as nm
    from dsv4_jax.checkpoint import load_checkpoint, load_tokenizer

    if args.configs not in nm.CONFIG_SETS:
        raise SystemExit(f"--configs: one of {sorted(nm.CONFIG_SETS)}")
    t0 = time.monotonic()
    log = lambda msg: print(f"[{time.monotonic() - t0:6.0f} s] {msg}", file=sys.stderr, flush=True)
    report = {
        "configs": args.configs,
        "prompts": args.prompts,
        "new_tokens": args.new_tokens,
        "max_len": args.max_len,
        "checkpoints": [],
    }
    for size, seed in parse_checkpoints(args.checkpoints):
        if size == "demo":
            path, name = ck.DEMO, "demo"
        else:
            name = f"{size} seed {seed}"
            path = ck.build_random(
                os.path.join(ck.ROOT, "checkpoints", f"numerics-{size}-s{seed}"), ck.size_config(size), seed
            )
        cfg, p32 = load_checkpoint(path, jnp.float32)
        _, p16 = load_checkpoint(path, jnp.bfloat16)
        if size == "demo":
            prompts = nm.text_prompts(load_tokenizer(path, cfg), args.prompts, 0, args.max_len)
        else:
            prompts = nm.random_prompts(args.prompts, seed, cfg.vocab_size, args.max_len)
        log(f"{name}: {len(prompts)} prompts")
        res = nm.measure(
            cfg,
            p32,
            p16,
            nm.CONFIG_SETS[args.configs],
            prompts,
            args.new_tokens,
            args.batch,
            hf=not args.no_hf,
            log=lambda m, n=name: log(f"{n}: {m}"),
        )
        report["checkpoints"].append({"name": name, "path": os.path.relpath(path, ck.ROOT), **res})
        report["seconds"] = round(time.monotonic() - t0, 1)
        if args.out:  # after every checkpoint: a run that dies later keeps what it measured
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
    print(json.dumps(report) if args.json else table(report))
    return 0
