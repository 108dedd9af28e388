"""`python scripts/benchmark.py`: the serving benchmark (modelled on `vllm bench serve` and
`python -m sglang.bench_serving`; SERVING.md §6).

Against a running server (``--base-url``), or in-process (the model flags: the engine
thread of the server without HTTP; the default is the demo checkpoint):

    python scripts/benchmark.py --base-url http://127.0.0.1:8000 --dataset-name random \\
        --random-input-len 256 --random-output-len 64 --num-prompts 32 --max-concurrency 8
    python scripts/benchmark.py --profile chat --dataset-name shared-prefix --prefix-groups 4 \\
        --prompts-per-group 8 --prefix-len 512 --suffix-len 32 --compare-profiles chat,long-context

Modes (combinable): one run; ``--concurrency-sweep 1,2,4`` and ``--input-len-sweep
256,1024`` (latency vs concurrency, throughput vs context length: the PNG of ``--plot``);
``--compare-profiles`` (in-process: the same workload under each endpoint profile, and which
wins on which metric); ``--decode-sweep`` (batch 1, context 1K, 2K, ... up to the largest
that fits: per-token decode time per context length). ``--result-file`` writes all of it
as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os

from absl import app, logging
from absl.flags import argparse_flags

LOWER_IS_BETTER = (("ttft_ms", "p50"), ("tpot_ms", "p50"), ("itl_ms", "p50"), ("e2el_ms", "p50"))
HIGHER_IS_BETTER = ("request_throughput", "output_throughput", "total_token_throughput", "prefix_hit_rate")


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def parse_args(argv: list[str]):
    """The flags of ``argv`` (``argv[0]``, the program name, is skipped: absl's ``flags_parser``)."""
    from dsv4_jax import launch

    p = argparse_flags.ArgumentParser(description="Serving benchmark for dsv4-jax (vLLM / sglang style).")
    p.add_argument("--base-url", default=None, help="benchmark a running server (default: in-process engine)")
    p.add_argument("--api-key", default=os.environ.get("DSV4_API_KEY"))
    p.add_argument("--model", default=None, help="model id (default: the server's first model)")
    p.add_argument(
        "--backend",
        choices=("completions", "chat"),
        default="completions",
        help="endpoint: /v1/completions (exact token-id prompts) or /v1/chat/completions",
    )
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer dir for random prompts (default: --checkpoint)"
    )
    d = p.add_argument_group("dataset")
    d.add_argument("--dataset-name", choices=("random", "shared-prefix", "trace"), default="random")
    d.add_argument("--dataset-path", default=None, help="JSONL trace (--dataset-name trace)")
    d.add_argument("--num-prompts", type=int, default=16)
    d.add_argument("--random-input-len", "--input-len", dest="input_len", type=int, default=128)
    d.add_argument("--random-output-len", "--output-len", dest="output_len", type=int, default=32)
    d.add_argument("--random-range-ratio", dest="range_ratio", type=float, default=0.0)
    d.add_argument("--prefix-groups", type=int, default=4)
    d.add_argument("--prompts-per-group", type=int, default=4)
    d.add_argument("--prefix-len", type=int, default=256)
    d.add_argument("--suffix-len", type=int, default=32)
    d.add_argument("--seed", type=int, default=0)
    t = p.add_argument_group("load")
    t.add_argument("--request-rate", type=float, default=math.inf, help="requests/s, Poisson (default: inf)")
    t.add_argument("--max-concurrency", type=int, default=None)
    t.add_argument(
        "--warmup-requests", type=int, default=2, help="unmeasured requests first (distinct prompts)"
    )
    t.add_argument("--temperature", type=float, default=0.0)
    t.add_argument(
        "--no-ignore-eos", action="store_true", help="stop at EOS (default: always output_len tokens)"
    )
    m = p.add_argument_group("modes")
    m.add_argument("--concurrency-sweep", type=_ints, default=None, help="e.g. 1,2,4,8")
    m.add_argument("--input-len-sweep", type=_ints, default=None, help="e.g. 128,512,2048 (random dataset)")
    m.add_argument("--compare-profiles", default=None, help="in-process: comma-separated endpoint profiles")
    m.add_argument("--decode-sweep", action="store_true", help="batch-1 decode time per context length")
    m.add_argument("--decode-sweep-min", type=int, default=1024)
    m.add_argument(
        "--decode-sweep-max", type=int, default=None, help="default: the largest context that fits"
    )
    m.add_argument("--decode-sweep-tokens", type=int, default=32)
    o = p.add_argument_group("output")
    o.add_argument("--result-file", default=None, help="write the results as JSON here")
    o.add_argument(
        "--plot", default=None, help="write a PNG here (latency vs concurrency, throughput vs context)"
    )
    o.add_argument("--no-progress", action="store_true")
    launch.add_model_args(p)
    return p.parse_args(argv[1:])


# ----------------------------------------------------------------------------- workloads
def make_requests(args, ids, tokenizer, input_len=None, seed=None, n=None):
    from dsv4_jax.bench import data as bd

    seed = args.seed if seed is None else seed
    n = args.num_prompts if n is None else n
    if args.dataset_name == "shared-prefix" and input_len is None:
        return bd.shared_prefix_requests(
            args.prefix_groups,
            args.prompts_per_group,
            args.prefix_len,
            args.suffix_len,
            args.output_len,
            seed,
            ids,
        )
    if args.dataset_name == "trace" and input_len is None:
        if not args.dataset_path:
            raise SystemExit("--dataset-name trace needs --dataset-path")
        return bd.trace_requests(args.dataset_path, seed, ids, tokenizer, args.output_len)
    return bd.random_requests(n, input_len or args.input_len, args.output_len, args.range_ratio, seed, ids)


async def bench_once(backend, args, reqs, warm, concurrency) -> dict:
    from dsv4_jax.bench.client import counter_delta, run_load, summarize

    if warm:
        await run_load(backend, warm, max_concurrency=concurrency)
    before = await backend.counters()
    replay = args.dataset_name == "trace" and not math.isfinite(args.request_rate)
    results, duration = await run_load(
        backend, reqs, args.request_rate, concurrency, args.seed, replay, progress=not args.no_progress
    )
    return summarize(results, duration, counter_delta(before, await backend.counters()))


async def decode_sweep(backend, args, ids) -> list[dict]:
    """Batch 1, one request per context length: mean and median gap between decoded tokens."""
    import numpy as np

    from dsv4_jax.bench import data as bd
    from dsv4_jax.bench.client import PREFIX_KEYS, counter_delta, spec_summary

    k = args.decode_sweep_tokens
    top = (await backend.info())["max_model_len"] - k - 1
    top = min(top, args.decode_sweep_max or top)
    ctxs, c = [], args.decode_sweep_min
    while c <= top:
        ctxs.append(c)
        c *= 2
    if top > 0 and (not ctxs or ctxs[-1] < top):
        ctxs.append(top)
    rows = []
    for c in ctxs:
        before = await backend.counters()
        r = await backend.send(bd.random_requests(1, c, k, 0.0, args.seed + c, ids)[0])
        delta = counter_delta(before, await backend.counters())
        hit = int(delta[PREFIX_KEYS[0]]) if delta and PREFIX_KEYS[0] in delta else None
        spec = spec_summary(delta)
        itl = np.asarray(r.itl) * 1000 if r.ok and r.itl else None
        rows.append(
            {
                "context": c,
                "ok": r.ok,
                "prefill_s": r.ttft if r.ok else None,
                "decode_ms_per_token": float(itl.mean()) if itl is not None else None,
                "decode_ms_p50": float(np.median(itl)) if itl is not None else None,
                "prefix_hit_tokens": hit,
                "spec_acceptance_rate": spec["spec_acceptance_rate"],
                "spec_mean_acceptance_length": spec["spec_mean_acceptance_length"],
                "error": r.error,
            }
        )
        ms = rows[-1]["decode_ms_per_token"]
        cached = f" ({hit} prompt tokens from the prefix cache)" if hit else ""
        length = spec["spec_mean_acceptance_length"]
        drafts = f", {length:.2f} tokens per verify step" if length else ""
        print(
            f"  context {c:>8}: "
            + (
                f"{ms:8.2f} ms/token ({1000 / ms:7.1f} tok/s), prefill {r.ttft:.2f} s{cached}{drafts}"
                if ms
                else f"failed: {r.error}"
            ),
            flush=True,
        )
    return rows


async def run_suite(backend, args, ids, tokenizer, profile: str | None = None) -> dict:
    from dsv4_jax.bench.client import format_summary

    out: dict = {"runs": []}
    for ilen in args.input_len_sweep or [None]:
        reqs = make_requests(args, ids, tokenizer, ilen)
        warm = make_requests(args, ids, tokenizer, ilen, seed=args.seed + 10_007, n=args.warmup_requests)
        warm = warm[: args.warmup_requests]
        for conc in args.concurrency_sweep or [args.max_concurrency]:
            s = await bench_once(backend, args, reqs, warm, conc)
            s.update(profile=profile, max_concurrency=conc, input_len=ilen, dataset=args.dataset_name)
            out["runs"].append(s)
            title = " ".join(
                x for x in (profile, f"conc={conc}" if conc else None, f"in={ilen}" if ilen else None) if x
            )
            print(format_summary(s, f"Serving Benchmark Result {title}".strip()), flush=True)
    if args.decode_sweep:
        print(f"decode vs context (batch 1{', ' + profile if profile else ''}):", flush=True)
        out["decode_sweep"] = {profile or "default": await decode_sweep(backend, args, ids)}
    return out


# ----------------------------------------------------------------------------- backends
@contextlib.asynccontextmanager
async def in_process(args, profile, engine_factory):
    """An ``InProcessBackend`` over a fresh engine for ``profile`` (built by ``engine_factory``
    in tests, from the checkpoint otherwise), stopped and freed afterwards."""
    from dsv4_jax import launch
    from dsv4_jax.bench.client import InProcessBackend
    from dsv4_jax.server.engine_thread import AsyncEngine

    if engine_factory is not None:
        engine = engine_factory(profile)
    else:
        engine = launch.build_llm(argparse.Namespace(**{**vars(args), "profile": profile})).engine
    aengine = AsyncEngine(engine, profiler=launch.make_profiler(args, engine)).start()
    try:
        yield InProcessBackend(aengine, args.temperature, not args.no_ignore_eos)
    finally:
        aengine.stop()
        del engine, aengine
        gc.collect()


def winners(by_profile: dict[str, dict]) -> dict[str, dict]:
    """Per metric: the profile with the best mean over its runs, and every profile's value."""
    out = {}

    def value(runs, key, stat=None):
        vals = [r[key][stat] if stat else r[key] for r in runs]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    for key, stat in LOWER_IS_BETTER + tuple((k, None) for k in HIGHER_IS_BETTER):
        vals = {p: value(res["runs"], key, stat) for p, res in by_profile.items()}
        vals = {p: v for p, v in vals.items() if v is not None}
        if not vals:
            continue
        best = (min if stat else max)(vals.values())
        tied = [p for p, v in vals.items() if math.isclose(v, best, rel_tol=1e-9, abs_tol=1e-12)]
        out[f"{key}.{stat}" if stat else key] = {
            "winner": tied[0] if len(tied) == 1 else "tie",
            "best": tied,
            "values": vals,
        }
    return out


async def amain(args, engine_factory=None) -> dict:
    from dsv4_jax.bench import data as bd
    from dsv4_jax.checkpoint import CheckpointError, load_tokenizer

    try:  # random prompts draw from the tokenizer's ordinary tokens
        tokenizer = load_tokenizer(args.tokenizer or args.checkpoint)
    except (CheckpointError, OSError) as e:
        logging.warning("no tokenizer (%s): random prompts use ids 2..999", e)
        tokenizer = None
    ids = bd.ordinary_token_ids(tokenizer)
    result: dict = {"title": f"dsv4-jax benchmark: {args.dataset_name}", "args": _jsonable(vars(args))}
    if args.compare_profiles:
        if args.base_url:
            raise SystemExit("--compare-profiles runs in-process (one engine per profile); drop --base-url")
        by_profile = {}
        for prof in [x.strip() for x in args.compare_profiles.split(",") if x.strip()]:
            async with in_process(args, prof, engine_factory) as backend:
                by_profile[prof] = await run_suite(backend, args, ids, tokenizer, prof)
        result["runs"] = [r for res in by_profile.values() for r in res["runs"]]
        result["decode_sweep"] = {
            k: v for res in by_profile.values() for k, v in res.get("decode_sweep", {}).items()
        }
        result["winners"] = w = winners(by_profile)
        print("\nprofile comparison (same workload; winner per metric):")
        for metric, v in w.items():
            vals = ", ".join(f"{p} {x:.4g}" for p, x in v["values"].items())
            print(f"  {metric:<26} winner: {v['winner']:<14} ({vals})")
        tally = {}
        for v in w.values():
            if v["winner"] != "tie":
                tally[v["winner"]] = tally.get(v["winner"], 0) + 1
        result["overall_winner"] = max(tally, key=tally.get) if tally else None
        print(f"  most wins for this workload: {result['overall_winner']}")
    elif args.base_url:
        from dsv4_jax.bench.client import HttpBackend

        if args.profile_dir:
            raise SystemExit(
                "--profile-dir works in-process; to profile a server, start it with --profile-dir"
            )
        backend = HttpBackend(
            args.base_url,
            args.model,
            args.api_key,
            args.backend == "chat",
            args.temperature,
            not args.no_ignore_eos,
        )
        try:
            await backend.info()
            result.update(await run_suite(backend, args, ids, tokenizer))
        finally:
            await backend.close()
    else:
        async with in_process(args, args.profile, engine_factory) as backend:
            result.update(await run_suite(backend, args, ids, tokenizer, args.profile))
    return result


def _jsonable(d: dict) -> dict:
    return {
        k: (v if isinstance(v, (int, float, str, bool, list, type(None))) else str(v))
        for k, v in d.items()
        if k != "api_key" and not (isinstance(v, float) and math.isinf(v))
    }


def run(args, engine_factory=None) -> int:
    """The benchmark of ``args`` (``parse_args``); ``engine_factory(profile) -> LLMEngine`` replaces
    the checkpoint's engine in-process (the tests' fake engines)."""
    result = asyncio.run(amain(args, engine_factory))
    if args.result_file:
        with open(args.result_file, "w") as f:
            json.dump(result, f, indent=2, default=str)
        print(f"results: {args.result_file}")
    if args.plot:
        from dsv4_jax.bench.plot import plot

        print(f"plot: {plot(result, args.plot)}")
    failed = sum(r["failed"] for r in result.get("runs", []))
    if failed:
        logging.warning("%d request(s) failed", failed)
    return 0


def main(argv: list[str] | None = None):
    """``scripts/benchmark.py``: ``argv`` as ``sys.argv`` (default: the command line); exits."""
    app.run(run, argv=argv, flags_parser=parse_args)
