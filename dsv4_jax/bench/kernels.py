"""Benchmark the Pallas kernels at V4-Flash decode shapes: correctness against the jnp
reference first, then timing, reported against the bytes and FLOPs each kernel must move
(SERVING.md §3 roofline; ARCHITECTURE.md §10.1 row formats).

    python scripts/bench_kernels.py                      # GPU: every kernel, B 1/8/64, 8K/128K/1M
    python scripts/bench_kernels.py --kernels indexer --batch 1 --context 1048576
    python scripts/bench_kernels.py --smoke              # CPU: tiny shapes in interpret mode

Must-move bytes per call (decode, T=1, every sequence at the same context L):
- attention_csa: B·[(W + topk)·row + 4·H·K (q in, o out, bf16) + 4·topk (ids) + 4·topk (block ids)]
- attention_hca: B·[(W + L/128)·row + 4·H·K + 4·⌈L/128/E⌉]
- indexer:       B·[(L/4)·key_row + 2·Hi·D + 4·Hi + 8·topk + 4·⌈L/4/E⌉]
- moe:           touched experts · 3·F·D·17/32 (MXFP4 + UE8M0) + B·D·(2 + 4) + B·k·8
with row = 584 B (fp8_ds_mla) or 1024 B (bf16) and key_row = 132 / 68 / 256 B (fp8/fp4/bf16).
FLOPs: attention 4·H·K per row (QKᵀ and PV), indexer 2·Hi·D per key, moe 6·F·D per (token, expert).

Timing: the kernel runs ``--reps`` times inside one jitted ``fori_loop`` (an optimization
barrier stops XLA hoisting it), so per-call numbers exclude Python dispatch; the median of
``--trials`` such runs is reported. The correctness check uses the first ``--check-batch``
sequences (the reference materializes dense f32 copies of the state).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import statistics
import sys
import time

FLASH = dict(
    H=64,
    K=512,
    R=64,
    W=128,
    E_csa=64,
    E_hca=2,
    ratio_hca=128,
    topk=512,
    Hi=64,
    D=128,
    n_experts=256,
    hidden=4096,
    inter=2048,
    k_experts=6,
)
SMOKE = dict(
    H=16,
    K=64,
    R=16,
    W=16,
    E_csa=8,
    E_hca=2,
    ratio_hca=8,
    topk=16,
    Hi=16,
    D=32,
    n_experts=8,
    hidden=128,
    inter=64,
    k_experts=2,
)
KERNELS = ("attention_csa", "attention_hca", "indexer", "moe")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default=",".join(KERNELS), help=f"comma list of {KERNELS}")
    p.add_argument("--batch", default="1,8,64", help="comma list of batch sizes")
    p.add_argument("--context", default="8192,131072,1048576", help="comma list of context lengths")
    p.add_argument("--kv-format", default="fp8_ds_mla", choices=["fp8_ds_mla", "bf16"])
    p.add_argument("--indexer-format", default="fp8", choices=["fp8", "fp4", "bf16"])
    p.add_argument("--reps", type=int, default=20, help="kernel calls per timed run")
    p.add_argument("--trials", type=int, default=5, help="timed runs; the median is reported")
    p.add_argument("--check-batch", type=int, default=4, help="sequences in the correctness check")
    p.add_argument("--json", default="bench_kernels.json", help="where to write the results")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes in interpret mode, to check the script on a CPU (timings meaningless)",
    )
    return p.parse_args(argv)


@dataclasses.dataclass
class Case:
    name: str
    shape: str
    kernel: object  # callable(*args)
    reference: object  # callable(*args)
    args: tuple
    check_args: tuple
    bytes: float
    flops: float
    compare: object  # (kernel_out, ref_out) -> (error, ok)


def _rel_err(out, ref, bound):
    import numpy as np

    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    err = float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))
    return err, bool(np.isfinite(out).all() and err <= bound)


def _topk_err(out, ref, bound):
    """Scores of the picks must match the reference's top-k scores (ids may differ on near-ties)."""
    import numpy as np

    (_, v), (_, rv) = out, ref
    v, rv = np.asarray(v), np.asarray(rv)
    fin = np.isfinite(rv)
    if not np.array_equal(fin, np.isfinite(v)):
        return math.inf, False
    scale = max(np.abs(rv[fin]).max(), 1e-30) if fin.any() else 1.0
    err = float(np.abs(v[fin] - rv[fin]).max() / scale) if fin.any() else 0.0
    return err, err <= bound


def _sub(tree, n):
    """First n sequences of every batch-leading array (pools and ring pools are shared)."""
    return tree[:n] if tree is not None else None


def _random_fp8(key, shape):
    """Random finite e4m3 values straight from bytes (no f32 temporaries at 1M context)."""
    import jax
    import jax.numpy as jnp

    a, s = jax.random.split(key)
    mag = jax.random.randint(a, shape, 0, 0x7F, jnp.int32)  # 0x7F is NaN
    sign = jax.random.bernoulli(s, 0.5, shape).astype(jnp.int32) << 7
    return jax.lax.bitcast_convert_type((mag | sign).astype(jnp.uint8), jnp.float8_e4m3fn)


def random_kv_rows(key, prefix, fmt, k, r):
    """Random stored rows in ``fmt`` with scales near 2^-6 (values of order 1)."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels import kv_format

    a, b, c = jax.random.split(key, 3)
    if fmt == "bf16":
        return jax.random.normal(a, prefix + (k,), jnp.bfloat16)
    scale = jax.random.randint(c, prefix + (kv_format.kv_scale_bytes(k - r),), 119, 123, jnp.int32)
    return kv_format.Fp8Rows(
        _random_fp8(a, prefix + (k - r,)),
        jax.random.normal(b, prefix + (r,), jnp.bfloat16),
        scale.astype(jnp.uint8),
    )


def random_indexer_keys(key, prefix, fmt, d):
    import jax
    import jax.numpy as jnp

    from pallas_kernels import kv_format

    a, c = jax.random.split(key)
    if fmt == "bf16":
        return jax.random.normal(a, prefix + (d,), jnp.bfloat16)
    if fmt == "fp8":
        return kv_format.Fp8IndexerKeys(
            _random_fp8(a, prefix + (d,)), jnp.full(prefix + (1,), 2.0**-6, jnp.float32)
        )
    packed = jax.random.randint(a, prefix + (d // 2,), 0, 256, jnp.int32).astype(jnp.uint8)
    return kv_format.Fp4IndexerKeys(
        packed, jax.random.randint(c, prefix + (d // 32,), 125, 129, jnp.int32).astype(jnp.uint8)
    )


def must_move(kind: str, b: int, ctx: int, dims: dict, fmt: str, touched: int = 0) -> tuple[float, float]:
    """(bytes, FLOPs) one call must move / do; the formulas of the module docstring."""
    from pallas_kernels import kv_format

    if kind.startswith("attention"):
        csa = kind == "attention_csa"
        ratio = 4 if csa else dims["ratio_hca"]
        e_blk = dims["E_csa"] if csa else dims["E_hca"]
        visible = ctx // ratio
        rows = min(dims["W"], ctx) + (min(dims["topk"], visible) if csa else visible)
        side = 8 * dims["topk"] if csa else 4 * cdiv(visible, e_blk)
        row = kv_format.bytes_per_row(fmt, dims["K"], dims["R"])
        return b * (rows * row + 4 * dims["H"] * dims["K"] + side), b * 4 * dims["H"] * dims["K"] * rows
    if kind == "indexer":
        n, hi, d = ctx // 4, dims["Hi"], dims["D"]
        row = kv_format.bytes_per_row("bf16" if fmt == "bf16" else f"indexer_{fmt}", d)
        extra = 2 * hi * d + 4 * hi + 8 * dims["topk"] + 4 * cdiv(n, dims["E_csa"])
        return b * (n * row + extra), b * (2 * hi * d + 3 * hi) * n
    f, d, k = dims["inter"], dims["hidden"], dims["k_experts"]
    return touched * 3 * f * d * 17 / 32 + b * d * 6 + b * k * 8, 2 * b * k * 3 * f * d


def build_attention(kind, b, ctx, dims, fmt, key, interpret, n_check):
    import jax
    import jax.numpy as jnp

    from pallas_kernels.sparse_attention.kernel import sparse_attention
    from pallas_kernels.sparse_attention.reference import sparse_attention_reference

    H, K, R, W = dims["H"], dims["K"], dims["R"], dims["W"]
    csa = kind == "attention_csa"
    ratio = 4 if csa else dims["ratio_hca"]
    e_blk = dims["E_csa"] if csa else dims["E_hca"]
    visible = ctx // ratio
    max_blocks = cdiv(visible, e_blk)
    ks = jax.random.split(key, 8)
    ring = random_kv_rows(ks[0], (b, W), fmt, K, R)
    pool = random_kv_rows(ks[1], (b * max_blocks, e_blk), fmt, K, R)
    table = jax.random.permutation(ks[2], b * max_blocks).astype(jnp.int32).reshape(b, max_blocks)
    q = jax.random.normal(ks[3], (b, 1, H, K), jnp.bfloat16)
    kv = jax.random.normal(ks[4], (b, 1, K), jnp.bfloat16)
    sink = jax.random.normal(ks[5], (H,), jnp.float32)
    start = jnp.full((b,), ctx - 1, jnp.int32)  # the decoded token is position ctx−1
    qlens = jnp.ones((b,), jnp.int32)
    slot = jnp.arange(b, dtype=jnp.int32)
    topk = jax.random.randint(ks[6], (b, 1, dims["topk"]), 0, visible, jnp.int32) if csa else None
    nbytes, flops = must_move(kind, b, ctx, dims, fmt)
    args = (q, kv, ring, slot, pool, table, topk, sink, start, qlens)
    n = min(b, n_check)
    check = (q[:n], kv[:n], ring, slot[:n], pool, table[:n], _sub(topk, n), sink, start[:n], qlens[:n])
    kern = jax.jit(lambda *a: sparse_attention(*a, ratio=ratio, interpret=interpret))
    ref = jax.jit(lambda *a: sparse_attention_reference(*a, ratio=ratio))
    return Case(
        kind, f"B={b} L={ctx} {fmt}", kern, ref, args, check, nbytes, flops, lambda o, r: _rel_err(o, r, 2e-2)
    )


def build_indexer(b, ctx, dims, fmt, key, interpret, n_check):
    import jax
    import jax.numpy as jnp

    from pallas_kernels.indexer_topk.kernel import indexer_topk
    from pallas_kernels.indexer_topk.reference import indexer_topk_reference

    Hi, D, e_blk, topk = dims["Hi"], dims["D"], dims["E_csa"], dims["topk"]
    n_ent = ctx // 4
    max_blocks = cdiv(n_ent, e_blk)
    ks = jax.random.split(key, 4)
    keys = random_indexer_keys(ks[0], (b * max_blocks, e_blk), fmt, D)
    table = jax.random.permutation(ks[1], b * max_blocks).astype(jnp.int32).reshape(b, max_blocks)
    q = jax.random.normal(ks[2], (b, 1, Hi, D), jnp.bfloat16)
    w = jax.random.normal(ks[3], (b, 1, Hi), jnp.float32) * (D * Hi) ** -0.5
    start = jnp.full((b,), ctx - 1, jnp.int32)
    qlens = jnp.ones((b,), jnp.int32)
    nbytes, flops = must_move("indexer", b, ctx, dims, fmt)
    n = min(b, n_check)
    args = (q, w, keys, table, start, qlens)
    check = (q[:n], w[:n], keys, table[:n], start[:n], qlens[:n])
    kern = jax.jit(lambda *a: indexer_topk(*a, ratio=4, topk=topk, interpret=interpret))
    ref = jax.jit(lambda *a: indexer_topk_reference(*a, ratio=4, topk=topk))
    return Case(
        "indexer",
        f"B={b} L={ctx} {fmt}",
        kern,
        ref,
        args,
        check,
        nbytes,
        flops,
        lambda o, r: _topk_err(o, r, 1e-3),
    )


def build_moe(b, dims, key, interpret):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels import mxfp4
    from pallas_kernels.mxfp4_matmul.kernel import moe_experts
    from pallas_kernels.mxfp4_matmul.reference import moe_experts_reference

    E, D, F, k = dims["n_experts"], dims["hidden"], dims["inter"], dims["k_experts"]
    ks = jax.random.split(key, 8)

    def weight(kk, o, i):  # random nibbles; scales near 2^-3 keep the activations O(1)
        a, s = jax.random.split(kk)
        return mxfp4.Mxfp4Weight(
            jax.random.randint(a, (E, o, i // 2), 0, 256, jnp.int32).astype(jnp.uint8),
            jax.random.randint(s, (E, o, i // 32), 118, 122, jnp.int32).astype(jnp.uint8),
        )

    w1, w2, w3 = weight(ks[0], F, D), weight(ks[1], D, F), weight(ks[2], F, D)
    x = jax.random.normal(ks[3], (b, D), jnp.bfloat16)
    idx = jnp.argsort(jax.random.uniform(ks[4], (b, E)), axis=1)[:, :k].astype(jnp.int32)
    wts = jax.random.uniform(ks[5], (b, k), jnp.float32)
    touched = len(np.unique(np.asarray(idx)))
    nbytes, flops = must_move("moe", b, 0, dims, "mxfp4", touched)
    tune = {} if D >= 256 else dict(block_k=64, block_n=32)
    kern = jax.jit(lambda *a: moe_experts(*a, limit=10.0, interpret=interpret, **tune))
    ref = jax.jit(lambda *a: moe_experts_reference(*a, limit=10.0))
    args = (x, idx, wts, w1, w2, w3)
    return Case(
        "moe",
        f"B={b} E={E} touched={touched}",
        kern,
        ref,
        args,
        args,
        nbytes,
        flops,
        lambda o, r: _rel_err(o, r, 2e-2),
    )


def time_case(case: Case, reps: int, trials: int) -> float:
    """Median seconds per kernel call over ``trials`` runs of ``reps`` in-graph calls."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    def first(out):
        return jax.tree.leaves(out)[0]

    @jax.jit
    def run(args):
        def body(i, acc):
            a = lax.optimization_barrier((i, args))[1]
            return acc + first(case.kernel(*a)).ravel()[0].astype(jnp.float32)

        return lax.fori_loop(0, reps, body, jnp.float32(0))

    jax.block_until_ready(run(case.args))  # compile + warm up
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        jax.block_until_ready(run(case.args))
        times.append((time.perf_counter() - t0) / reps)
    return statistics.median(times)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    backend = jax.default_backend()
    if backend != "gpu" and not args.smoke:
        print(
            f"bench_kernels: the default backend is {backend!r}, not a GPU. No numbers are produced "
            "without a GPU; --smoke runs tiny shapes in interpret mode to check the script.",
            file=sys.stderr,
        )
        return 2
    dims = SMOKE if args.smoke else FLASH
    batches = [int(v) for v in args.batch.split(",")] if not args.smoke else [1, 2]
    contexts = [int(v) for v in args.context.split(",")] if not args.smoke else [64, 256]
    kernels = [k for k in args.kernels.split(",") if k]
    bad = sorted(set(kernels) - set(KERNELS))
    if bad:
        print(f"bench_kernels: unknown kernels {bad}; known: {KERNELS}", file=sys.stderr)
        return 2
    interpret = args.smoke
    key = jax.random.key(0)
    results, failed = [], False
    for name in kernels:
        for b in batches:
            for ctx in contexts if name != "moe" else [0]:
                key, sub = jax.random.split(key)
                if name.startswith("attention"):
                    case = build_attention(
                        name, b, ctx, dims, args.kv_format, sub, interpret, args.check_batch
                    )
                elif name == "indexer":
                    case = build_indexer(b, ctx, dims, args.indexer_format, sub, interpret, args.check_batch)
                else:
                    case = build_moe(b, dims, sub, interpret)
                err, ok = case.compare(case.kernel(*case.check_args), case.reference(*case.check_args))
                failed |= not ok
                sec = time_case(case, args.reps, args.trials)
                rec = dict(
                    kernel=case.name,
                    shape=case.shape,
                    check="ok" if ok else "FAIL",
                    max_rel_err=err,
                    time_us=sec * 1e6,
                    bytes=case.bytes,
                    flops=case.flops,
                    gb_per_s=case.bytes / sec / 1e9,
                    tflop_per_s=case.flops / sec / 1e12,
                )
                results.append(rec)
                print(
                    f"{rec['kernel']:<14} {rec['shape']:<34} {rec['check']:<4} err={err:9.2e} "
                    f"{rec['time_us']:10.1f} us {rec['bytes'] / 1e6:10.2f} MB {rec['gb_per_s']:9.1f} GB/s "
                    f"{rec['tflop_per_s']:8.3f} TFLOP/s",
                    flush=True,
                )
    meta = dict(
        backend=backend,
        device=str(jax.devices()[0].device_kind),
        jax=jax.__version__,
        interpret=interpret,
        smoke=args.smoke,
        kv_format=args.kv_format,
        indexer_format=args.indexer_format,
        reps=args.reps,
        trials=args.trials,
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )
    with open(args.json, "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    print(f"wrote {args.json} ({len(results)} rows; device {meta['device']}; interpret={interpret})")
    return 1 if failed else 0


from dsv4_jax.intmath import cdiv
