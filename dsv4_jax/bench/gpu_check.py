"""One call that says whether a GPU serves V4 right and how fast (issue 19; docs/PERF.md "GPU check").

    python scripts/gpu_check.py --json            # one H100 / H200 / B200, at most ~8 minutes
    python scripts/gpu_check.py --tiny            # CPU: the same steps at tiny shapes (make test)

In this order, each step timed, stopping early only when the time budget is spent:

1. **kernels**: each Pallas kernel (CSA / HCA attention, indexer top-k, MXFP4 experts) against
   its jnp reference at Flash decode shapes (``bench.kernels``' cases);
2. **bandwidth**: the same cases timed, in GB/s of the bytes each must move, beside the device's
   measured copy bandwidth (a jitted ``x + 1`` over 1 GiB: read + write);
3. **engine**: a random checkpoint in the published format (``mid`` size; ``tiny`` in tiny mode)
   served by float32 + references, packed + Pallas in float32 (must give the same greedy tokens:
   the same math), bf16 + references and packed + Pallas in bf16 (the GPU default); each run's
   greedy tokens against the first, and where they part, the reference's top-2 logprob gap
   (random checkpoints are flat: bf16 alone flips some of their greedy choices, and the
   kernel's P·V runs in bf16, docs/KERNELS.md; tiny mode runs the float32 pair only);
4. **decode**: tokens/s of the packed + Pallas engine at batch 1 / 8 / 64 and the share of the
   weight-read roofline (bytes each step must read ÷ the copy bandwidth).

The exit status is 1 if a kernel check fails or float32 packed + Pallas serving parts from the
reference path beyond a near-tie.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from dsv4_jax.bench import decode, kernels
from dsv4_jax.bench.checkpoints import ROOT, build_random, size_config

EXACT_TIE = 1e-3  # float32: packed + Pallas may take the other token only under this logprob gap


def copy_bandwidth(mib: int) -> float:
    """Bytes/s of a jitted ``x + 1`` over ``mib`` MiB of f32 (read + write), best of 5."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((mib * 2**18,), jnp.float32)
    f = jax.jit(lambda a: a + 1)
    f(x).block_until_ready()
    best = min(decode._timed(lambda: f(x).block_until_ready()) for _ in range(5))
    return 2 * x.nbytes / best


def kernel_rows(tiny: bool, interpret: bool, reps: int, trials: int) -> list[dict]:
    import jax

    dims = kernels.SMOKE if tiny else kernels.FLASH
    b, ctx = (2, 256) if tiny else (8, 65536)
    key, rows = jax.random.key(0), []
    for name in kernels.KERNELS:
        key, sub = jax.random.split(key)
        if name.startswith("attention"):
            case = kernels.build_attention(name, b, ctx, dims, "fp8_ds_mla", sub, interpret, 4)
        elif name == "indexer":
            case = kernels.build_indexer(b, ctx, dims, "fp4", sub, interpret, 4)
        else:
            case = kernels.build_moe(b, dims, sub, interpret)
        err, ok = case.compare(case.kernel(*case.check_args), case.reference(*case.check_args))
        sec = kernels.time_case(case, reps, trials)
        rows.append(
            dict(
                kernel=case.name,
                shape=case.shape,
                ok=ok,
                max_rel_err=err,
                time_us=sec * 1e6,
                gb_s=case.bytes / sec / 1e9,
            )
        )
    return rows


def _first_difference(got, want) -> dict:
    first = next((i for i, (a, b) in enumerate(zip(got.token_ids, want.token_ids)) if a != b), None)
    gap = None
    if first is not None:
        top = want.logprobs[first][1]
        gap = top[0][1] - top[1][1] if len(top) > 1 else None
    return dict(equal=first is None, first_difference=first, reference_top2_gap=gap)


# (weights, kernels, dtype): float32 pairs must agree; bf16 pairs are each compared with float32
RUNS = {
    "f32+reference": ("f32", "reference", None),
    "packed+pallas f32": ("packed", "pallas", "float32"),
    "bf16+reference": ("bf16", "reference", None),
    "packed+pallas (GPU default)": ("packed", "pallas", None),
}


def engine_rows(
    ckpt: str, prompts: list[list[int]], new: int, batches: list[int], bw: float, tiny: bool
) -> dict:
    """Each serving configuration's greedy tokens against float32 + references (the float32
    packed + Pallas run must equal it; bf16 runs may part at near-ties), then the decode speed of
    the last configuration built (the GPU default; tiny mode: packed + Pallas in float32)."""
    from dsv4_jax import LLM, SamplingParams

    common = dict(max_batch=max(batches), max_model_len=max(map(len, prompts)) + new + 8)
    sp = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True, logprobs=2)
    names = list(RUNS)[:2] if tiny else list(RUNS)
    out, llm, want = {}, None, None
    for name in names:
        weights, kern, dtype = RUNS[name]
        llm = None  # free the previous engine first
        llm = LLM(ckpt, weights=weights, kernels=kern, dtype=dtype, **common)
        got = llm.generate(prompts, sp)
        want = want or got
        out[name] = [_first_difference(g, w) for g, w in zip(got, want)]
    wb = decode.weight_bytes(llm.engine.runner.params, llm.model_config)
    rng, speed = np.random.RandomState(1), []
    plen = len(prompts[0])
    for b in batches:
        batch = rng.randint(2, llm.model_config.vocab_size, (b, plen)).tolist()
        decode.run_llm(llm, batch, new)  # compile this batch's shapes
        r = decode.run_llm(llm, batch, new)
        roof = b * bw / decode.bytes_per_step(wb, llm.model_config, b)
        speed.append(
            dict(
                batch=b,
                decode_tok_s=r["decode_tok_s"],
                step_ms=r["step_ms"],
                roofline_fraction=r["decode_tok_s"] / roof,
            )
        )
    return dict(held=llm.held.describe(), against_f32=out, decode=speed, weight_bytes=wb)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (automatic without a GPU)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--checkpoint", default=None, help="published-format checkpoint (default: built once)")
    args = ap.parse_args(argv)
    import jax

    backend = jax.default_backend()
    tiny = args.tiny or backend != "gpu"
    log = lambda *a: print(*a, file=sys.stderr if args.json else sys.stdout, flush=True)
    res: dict = dict(
        backend=backend, device=str(jax.devices()[0].device_kind), jax=jax.__version__, tiny=tiny, steps={}
    )
    t0 = time.monotonic()
    res["kernels"] = kernel_rows(
        tiny, interpret=backend != "gpu", reps=1 if tiny else 20, trials=1 if tiny else 5
    )
    res["steps"]["kernels_s"] = time.monotonic() - t0
    for r in res["kernels"]:
        log(
            f"{r['kernel']:<14} {r['shape']:<34} {'ok' if r['ok'] else 'FAIL'} err {r['max_rel_err']:.1e} {r['gb_s']:8.1f} GB/s"
        )
    bw = copy_bandwidth(64 if tiny else 1024)
    res["copy_bandwidth_GBps"] = bw / 1e9
    for r in res["kernels"]:
        r["of_copy_bandwidth"] = r["gb_s"] * 1e9 / bw
    log(f"copy bandwidth {bw / 1e9:.1f} GB/s")
    size = "tiny" if tiny else "mid"
    ckpt = args.checkpoint or build_random(
        os.path.join(ROOT, "checkpoints", f"gpu-check-{size}"), size_config(size)
    )
    rng = np.random.RandomState(0)
    n_prompts, plen, new = (1, 8, 4) if tiny else (8, 256, 32)
    prompts = rng.randint(2, 1000, (n_prompts, plen)).tolist()
    t = time.monotonic()
    res["engine"] = engine_rows(ckpt, prompts, new, [1] if tiny else [1, 8, 64], bw, tiny)
    res["steps"]["engine_s"] = time.monotonic() - t
    exact = res["engine"]["against_f32"]["packed+pallas f32"]
    exact_ok = all(c["equal"] or (c["reference_top2_gap"] or 0) < EXACT_TIE for c in exact)
    for name, cmp in res["engine"]["against_f32"].items():
        log(
            f"engine {name:<28} {sum(c['equal'] for c in cmp)}/{len(cmp)} prompts greedy-equal to f32 + references"
        )
    for d in res["engine"]["decode"]:
        log(
            f"decode B={d['batch']:3d}: {d['decode_tok_s']:9.1f} tok/s, {d['roofline_fraction']:.1%} of the weight-read roofline"
        )
    res["total_s"] = time.monotonic() - t0
    res["ok"] = all(r["ok"] for r in res["kernels"]) and exact_ok
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    if args.json:
        print(json.dumps(res, indent=1))
    return 0 if res["ok"] else 1
