"""Accuracy cost of quantized KV storage: logit drift of FP8 / FP8+FP4 state against dense
storage, on the demo checkpoint and the tiny configs.

Each config runs the same prompt through the state path (a prefill chunk, then decode
steps) once per storage format, with and without the reference's QAT rounding
(``--sim-quant`` both ways by default). Dense storage uses bf16 rows, as the reference.

    python scripts/kv_format_drift.py              # table
    python scripts/kv_format_drift.py --json out.json
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax.bench.checkpoints import DEMO
from dsv4_jax.checkpoint import load_checkpoint
from dsv4_jax.config import preset
from dsv4_jax.model import state as kvc
from dsv4_jax.model.params import init_params
from dsv4_jax.model.transformer import ModelOptions, forward


def run(cfg, params, tokens, prefill, fmt, sim):
    bt = 128 if all(r in (0, 4, 8, 16, 32, 64, 128) for r in cfg.compress_ratios) else 256
    n_blocks = -(-len(tokens) // bt)
    cc = kvc.CacheConfig(
        num_slots=1,
        num_blocks=n_blocks,
        max_blocks_per_seq=n_blocks,
        block_tokens=bt,
        fmt=kvc.KVFormat.parse(fmt),
        dtype=jnp.bfloat16,
    )
    opts = ModelOptions(sim_quant=sim)
    step = jax.jit(
        lambda p, t, q, s, m: forward(p, t, q, s, m, cfg=cfg, opts=opts, cache=cc), donate_argnums=(3,)
    )
    state = kvc.init_state(cfg, cc)
    table = np.arange(n_blocks, dtype=np.int32)[None]
    lg, state = step(
        params,
        tokens[None, :prefill],
        np.arange(prefill)[None],
        state,
        kvc.StepMeta(np.zeros(1, np.int32), table, np.array([prefill], np.int32)),
    )
    out = [np.asarray(lg[0])]
    for p in range(prefill, len(tokens)):
        lg, state = step(
            params,
            tokens[None, p : p + 1],
            np.array([[p]]),
            state,
            kvc.StepMeta(np.zeros(1, np.int32), table, np.ones(1, np.int32)),
        )
        out.append(np.asarray(lg[0]))
    return np.concatenate(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="demo,tiny,tiny-shipped")
    ap.add_argument("--length", type=int, default=320, help="tokens per sequence (prefill + decode)")
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    args = ap.parse_args(argv)
    rows = []
    for name in args.configs.split(","):
        if name == "demo":
            cfg, params = load_checkpoint(DEMO, jnp.float32)
        else:
            cfg = preset(name)
            params = init_params(cfg, jax.random.PRNGKey(0))
        tokens = np.random.RandomState(0).randint(2, cfg.vocab_size, args.length)
        for sim in (False, True):
            base = run(cfg, params, tokens, args.prefill, "bf16", sim)
            for fmt in ("fp8", "fp8-fp4"):
                got = run(cfg, params, tokens, args.prefill, fmt, sim)
                d = np.abs(got - base)
                rows.append(
                    {
                        "config": name,
                        "sim_quant": sim,
                        "format": fmt,
                        "tokens": args.length,
                        "max_abs_drift": float(d.max()),
                        "mean_abs_drift": float(d.mean()),
                        "logit_scale": float(np.abs(base).max()),
                        "argmax_agreement": float((got.argmax(-1) == base.argmax(-1)).mean()),
                    }
                )
                r = rows[-1]
                print(
                    f"{name:13s} sim_quant={sim!s:5s} {fmt:8s} max|Δ|={r['max_abs_drift']:.4f} "
                    f"mean|Δ|={r['mean_abs_drift']:.5f} (|logits|max {r['logit_scale']:.2f}) "
                    f"argmax agree {r['argmax_agreement']:.3f}",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0
