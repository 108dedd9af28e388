"""Decode-sized dots on XLA:CPU: the read bandwidth of a matrix-vector product by the size of
its weight, and of one routed expert held with gate and up apart or stacked.

Why it exists: ``moe.split_experts`` stacks each expert's gate and up rows because XLA:CPU runs
a small dot as a one-thread GEMV and a larger one on every core; this measures where that line
lies on the machine at hand (docs/PERF.md "Gate and up stacked").

    python scripts/bench_gemv.py --json --out gemv.json

Each figure is a chain of dependent ``[1, D] x [F, D]ᵀ`` and ``[1, F] x [D, F]ᵀ`` dots (each
waits for the one before, as in a layer) over ~700 MB of distinct float32 weights, so every
byte comes from DRAM, not from the last-level cache; best of 5 passes. The expert rows run
six experts a step through ``moe._switched_experts``' ``lax.map`` over a ``lax.switch``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

WORKING_SET = 700e6  # bytes of distinct weights per pass: past a 480 MiB L3


def _best(fn, groups, x, passes: int = 5) -> float:
    fn(x, groups[0]).block_until_ready()
    best = float("inf")
    for _ in range(passes):
        t = time.perf_counter()
        for g in groups:
            r = fn(x, g)
        r.block_until_ready()
        best = min(best, (time.perf_counter() - t) / len(groups))
    return best


def chain_rows(d: int, widths, seed: int = 0) -> list[dict]:
    """GB/s of a chain of dependent GEMVs whose weights are [F, D] and [D, F], per F."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def chain(x, ws):  # f32[1, D], ((F, D), (D, F), ...) -> f32[1, D]
        for i in range(0, len(ws), 2):
            h = jnp.einsum("nd,fd->nf", x, ws[i])
            x = jnp.tanh(jnp.einsum("nf,df->nd", h, ws[i + 1]))
        return x

    rng = np.random.default_rng(seed)
    x = jnp.ones((1, d), jnp.float32)
    rows = []
    for f in widths:
        per = f * d * 4
        k = max(2, 2 * int(40e6 // (2 * per)))  # ~40 MB of dots per call
        n = max(k, int(WORKING_SET // per) // k * k)
        ws = [
            jnp.asarray(rng.standard_normal((f, d) if i % 2 == 0 else (d, f), np.float32)) for i in range(n)
        ]
        t = _best(chain, [tuple(ws[i : i + k]) for i in range(0, n, k)], x)
        rows.append({"kind": "gemv chain", "shape": [f, d], "weight_bytes": per, "GBps": k * per / t / 1e9})
        del ws
    return rows


def expert_rows(d: int, f: int, experts: int = 32, top_k: int = 6, seed: int = 0) -> list[dict]:
    """GB/s of ``top_k`` routed experts per step, gate and up apart vs stacked ([2F, D])."""
    import jax
    import jax.numpy as jnp

    from dsv4_jax.model import moe

    rng = np.random.default_rng(seed)
    copies = max(1, int(WORKING_SET // (experts * 3 * f * d * 4)))

    def held(stacked: bool):
        out = []
        for _ in range(copies):
            mk = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32) / np.sqrt(s[-1]))
            w1, w3, w2 = mk(experts, f, d), mk(experts, f, d), mk(experts, d, f)
            if stacked:
                out.append((tuple(jnp.concatenate([w1[e], w3[e]]) for e in range(experts)), (), tuple(w2)))
            else:
                out.append((tuple(w1), tuple(w3), tuple(w2)))
        return out

    def step(x, ws):  # one decode row through top_k experts (the split path's structure)
        w1, w3, w2 = ws
        idx = (jnp.arange(top_k) * 5) % experts

        def branch(e):
            def run(xr):
                up = lambda w: jnp.einsum("nd,fd->nf", xr, w)
                g, u = moe.gate_up(up, w1[e], w3[e] if w3 else ())
                return jnp.einsum("nf,df->nd", moe.swiglu(g, u, 10.0), w2[e])

            return run

        branches = [branch(e) for e in range(experts)]
        xs = jnp.broadcast_to(x, (top_k, d))
        return jax.lax.map(lambda a: jax.lax.switch(a[0], branches, a[1][None])[0], (idx, xs)).sum(0)

    rows = []
    x = jnp.ones((1, d), jnp.float32)
    for stacked in (False, True):
        t = _best(jax.jit(step), held(stacked), x)
        rows.append(
            {
                "kind": "experts, gate+up " + ("stacked" if stacked else "apart"),
                "shape": [f, d],
                "weight_bytes": top_k * 3 * f * d * 4,
                "GBps": top_k * 3 * f * d * 4 / t / 1e9,
                "ms": t * 1e3,
            }
        )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=768, help="D (the mid benchmark checkpoint's)")
    ap.add_argument("--widths", default="256,512,640,704,1024,2048,4096", help="F of the chain rows")
    ap.add_argument("--moe-width", type=int, default=512, help="the experts' F")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    import jax

    rows = chain_rows(args.hidden, [int(w) for w in args.widths.split(",")])
    rows += expert_rows(args.hidden, args.moe_width)
    report = {"backend": jax.default_backend(), "rows": rows}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)
    if args.json:
        print(json.dumps(report))
    else:
        print("| dots | weight [out, in] | MiB per dot | GB/s |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['kind']} | {r['shape']} | {r['weight_bytes'] / 2**20:.2f} | {r['GBps']:.1f} |")
    return 0
