"""Decode at the memory-bandwidth limit: our ``LLM`` against the HF port on the same weights.

    python scripts/bench_decode.py                       # mid-size checkpoint (built once, cached)
    python scripts/bench_decode.py --json                # the result as JSON on stdout
    python scripts/bench_decode.py --checkpoint DIR      # any checkpoint in the published format
    python scripts/bench_decode.py --size tiny           # seconds-long smoke run (the test uses it)

What it does (issue 10; SERVING.md §3 for the roofline arithmetic):

1. Builds, once, a random checkpoint in the published native format (FP8 e4m3 linears with
   UE8M0 128x128 scales, MXFP4 routed experts; the writer of ``dsv4_jax.checkpoint.demo``)
   with the real architecture pattern: SWA, CSA (m=4, indexer top-k 512) and HCA (m=128)
   layers, hash and top-k MoE, head dim 512. ``--size mid`` holds ~265 MB of active
   weights per token in bf16. Cached under ``checkpoints/bench-<size>/`` (git-ignored).
2. Measures the machine's read bandwidth (a jitted sum over a large array, best of 5) and
   the roofline: bandwidth ÷ bytes of weights read per step, in the precision we hold them
   (``--dtype``, bf16 by default; the fp32 leaves ``params.py`` keeps); at batch B the routed
   experts touched are E·(1 − (1 − k/E)^B) (uniform routing, SERVING.md §3).
3. Prefill time and decode tokens/s through ``dsv4_jax.LLM`` (greedy, ``ignore_eos``) at each
   batch size, after a warm-up run of the same shapes (compilation is not measured); the
   share of the decode span spent inside the compiled step, and recompilations (must be 0).
4. The same through the HF port (eager, float32 — its only supported CPU precision — with
   its ``DynamicCache``) on the same weights (dequantized exactly) and the same prompts.
5. Checks: the held weights equal the float32 dequantization leaf by leaf; greedy tokens of
   our engine (held precision and, with ``--agree-f32``, float32) against HF at batch 1.

Prompts are random token ids (no tokenizer round trip), equal lengths (the HF port is
wrong on left-padded batches, HF_ORACLE.md §8.3).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from dsv4_jax.bench.checkpoints import ROOT, SIZES, build_random, size_config
from dsv4_jax.config import Config


# ----------------------------------------------------------------------------- checkpoint
def build_checkpoint(out_dir: str, size: str, seed: int = 0) -> str:
    """Write (once) a random checkpoint of ``SIZES[size]`` in the published format
    (``dsv4_jax.bench.checkpoints.build_random``). Returns ``out_dir``."""
    return build_random(out_dir, size_config(size), seed)


# ----------------------------------------------------------------------------- roofline
def weight_bytes(params, cfg: Config) -> dict:
    """Bytes of the weights a decode step reads, as held (leaf dtypes), split into the routed
    experts (read per expert touched) and the rest (read once per step; one embedding row
    per token, negligible, left out). The MTP block is not run by decode."""
    import jax

    experts = dense = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path({k: v for k, v in params.items() if k != "mtp"})[
        0
    ]:
        keys = [str(getattr(p, "key", getattr(p, "idx", ""))) for p in path]
        nbytes = leaf.size * leaf.dtype.itemsize
        if "experts" in keys and "shared_experts" not in keys:
            experts += nbytes
        elif "embed" not in keys:
            dense += nbytes
    return {
        "dense": int(dense),
        "routed_experts_total": int(experts),
        "per_expert": int(experts // cfg.n_routed_experts),
    }


def bytes_per_step(wb: dict, cfg: Config, batch: int) -> float:
    """Expected weight bytes of one decode step at ``batch``: E(B) experts per MoE layer."""
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    touched = e * (1 - (1 - k / e) ** batch)
    return wb["dense"] + wb["routed_experts_total"] * touched / e


def measure_bandwidth(mib: int) -> float:
    """Read bandwidth in bytes/s: a jitted f32 sum over ``mib`` MiB, best of 5."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((mib * 2**18,), jnp.float32)
    f = jax.jit(lambda a: jnp.sum(a))
    f(x).block_until_ready()
    best = min(_timed(lambda: f(x).block_until_ready()) for _ in range(5))
    return x.nbytes / best


def rss_bytes() -> int:
    """This process's resident set now (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def rss_peak_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- ours
def make_llm(
    ckpt: str,
    held: dict,
    max_batch: int,
    max_len: int | None,
    tokens_per_step: int,
    lookahead: bool = True,
    qat: bool = False,
    defaults: bool = False,
    speculative_tokens: int | None = None,
):
    """``LLM`` for the benchmark. ``defaults``: what ``LLM(dir)`` serves (default profile, KV
    format, QAT mode and pool sizing; ``max_len`` only if given). Otherwise the HF comparison's
    set-up: bf16 rows, QAT rounding off unless asked (the HF port has none, so the greedy-agreement
    check compares the same math), the context capped at ``max_len``. ``held``: ``weights`` /
    ``kernels`` / ``dtype`` (``dsv4_jax.held``). ``speculative_tokens``: MTP drafts (the
    HF comparison's set-up has none unless asked; ``defaults`` keeps the profile's unless given)."""
    from dsv4_jax import LLM

    if speculative_tokens is None:  # the profile's with ``defaults``, none for the HF comparison
        speculative_tokens = None if defaults else 0
    spec = {} if speculative_tokens is None else {"speculative_tokens": speculative_tokens}
    if speculative_tokens:  # the depth asked for at every batch size (no load adaptation)
        spec.update(spec_full_batch=1 << 20, spec_off_batch=1 << 21)
    if defaults:
        extra = {} if max_len is None else {"max_model_len": max_len}
        return LLM(ckpt, max_batch=max_batch, decode_lookahead=lookahead, **held, **extra, **spec)
    return LLM(
        ckpt,
        **held,
        kv_format="bf16",
        qat=None if qat else False,
        max_batch=max_batch,
        max_model_len=max_len,
        max_tokens_per_step=tokens_per_step,
        enable_prefix_cache=False,
        num_snapshots=0,
        swa_strategy="recompute",
        decode_lookahead=lookahead,
        **spec,
    )


def run_llm(llm, prompts: list[list[int]], new_tokens: int) -> dict:
    """One batch through ``llm.generate``: prefill time (arrival → last first token), decode
    tokens/s over the steps after it, and the tokens."""
    import jax

    from dsv4_jax import SamplingParams

    sp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    runner = llm.engine.runner
    name = "_spec" if runner.limits.max_draft_tokens else "_step"  # the jitted step this runner calls
    step, spans = getattr(runner, name), []

    dispatch = []

    def timed_step(*a, **k):  # the compiled step, blocked until its outputs are ready
        t = time.monotonic()
        out = step(*a, **k)
        dispatch.append(time.monotonic() - t)  # host time: flatten the arguments, enqueue
        out = jax.block_until_ready(out)
        spans.append((t, time.monotonic()))
        return out

    compiles = runner.compilations
    setattr(runner, name, timed_step)
    try:
        t0 = time.monotonic()
        outs = llm.generate(prompts, sp)
        end = time.monotonic()
    finally:
        setattr(runner, name, step)
    first = max(o.metrics.first_token for o in outs)
    last = max(o.metrics.finished for o in outs)
    decode_s = last - first
    in_step = sum(b - a for a, b in spans if a >= first and b <= last)
    n = len(prompts) * (new_tokens - 1)
    return {
        "prefill_s": first - t0,
        "decode_s": decode_s,
        "decode_tok_s": n / decode_s,
        "step_ms": 1e3 * decode_s / (new_tokens - 1),
        "total_s": end - t0,
        "in_compiled_step_fraction": in_step / decode_s,
        "dispatch_ms_median": 1e3 * float(np.median(dispatch)),
        "compilations": runner.compilations - compiles,
        "steps": sum(1 for a, b in spans if a >= first and b <= last),
        "draft_tokens": sum(o.metrics.draft_tokens for o in outs),
        "accepted_tokens": sum(o.metrics.accepted_tokens for o in outs),
        "mean_acceptance_length": _mean_length(outs),
        "tokens": [o.token_ids for o in outs],
    }


def run_mtp(llm0, depths, prompts, rng, new, repeats, log, make_deep) -> dict:
    """Decode tok/s and acceptance per batch size and MTP draft depth. ``llm0``: built without
    drafts (depth 0, the baseline); one more engine per depth (a runner drafts at the depth it
    was built with). Within each batch the depths run one after the other, ``repeats`` times,
    so drift on a shared machine hits them alike."""
    llms = {k: llm0 if k == 0 else make_deep(k) for k in depths}
    out: dict = {}
    for b, ps in prompts.items():
        warm = rng.randint(2, llm0.model_config.vocab_size, (b, len(ps[0]))).tolist()
        for k in depths:  # compile every shape first
            run_llm(llms[k], warm, new)
        rows: dict = {k: [] for k in depths}
        for _ in range(repeats):
            for k in depths:
                rows[k].append(run_llm(llms[k], ps, new))
        out[str(b)] = {}
        base = max(r["decode_tok_s"] for r in rows[depths[0]])
        for k in depths:
            best = max(rows[k], key=lambda r: r["decode_tok_s"])
            entry = {key: v for key, v in best.items() if key != "tokens"}
            entry["decode_tok_s_runs"] = [r["decode_tok_s"] for r in rows[k]]
            entry["speedup_vs_first_depth"] = best["decode_tok_s"] / base
            entry["tokens_equal_first_depth"] = best["tokens"] == rows[depths[0]][0]["tokens"]
            out[str(b)][str(k)] = entry
            mal = entry["mean_acceptance_length"]
            log(
                f"B={b:3d} k={k}: decode {best['decode_tok_s']:.1f} tok/s ({entry['speedup_vs_first_depth']:.2f}x), "
                f"{best['steps']} steps, mean acceptance length {mal if mal is None else round(mal, 2)}, "
                f"accepted {best['accepted_tokens']}/{best['draft_tokens']}, "
                f"same tokens as k={depths[0]}: {entry['tokens_equal_first_depth']}"
            )
    return out


def heldout_prompts(ckpt: str, cfg, batches, plen: int) -> dict:
    """Per batch size, rows of the demo corpus's held-out text (``Corpus.eval``, never trained
    on), from the MTP evaluation's seed."""
    from dsv4_jax.checkpoint import load_tokenizer
    from dsv4_jax.train import mtp
    from dsv4_jax.train.demo import corpus_and_tokenizer

    corpus, _ = corpus_and_tokenizer(load_tokenizer(ckpt, cfg))
    rows = mtp.heldout_rows(corpus, max(batches) * 2, plen)
    return {b: rows[b : 2 * b].tolist() for b in batches}


def _mean_length(outs) -> float | None:
    """Tokens emitted per verify step over a batch (accepted drafts + 1), None without drafts."""
    steps = sum(o.metrics.drafts_per_position[0] for o in outs if o.metrics.drafts_per_position)
    return 1 + sum(o.metrics.accepted_tokens for o in outs) / steps if steps else None


# ----------------------------------------------------------------------------- HF port
def run_hf(model, prompts: list[list[int]], new_tokens: int) -> dict:
    """Greedy through the HF port with its cache: one prefill call, then one call per token."""
    import torch
    from transformers import DynamicCache

    ids = torch.tensor(prompts, dtype=torch.int64)
    out_tokens = []
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        t0 = time.perf_counter()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1].argmax(-1)
        t1 = time.perf_counter()
        out_tokens.append(tok)
        for _ in range(new_tokens - 1):
            out = model(input_ids=tok[:, None], past_key_values=out.past_key_values, use_cache=True)
            tok = out.logits[:, -1].argmax(-1)
            out_tokens.append(tok)
        t2 = time.perf_counter()
    n = len(prompts) * (new_tokens - 1)
    return {
        "prefill_s": t1 - t0,
        "decode_s": t2 - t1,
        "decode_tok_s": n / (t2 - t1),
        "step_ms": 1e3 * (t2 - t1) / (new_tokens - 1),
        "tokens": torch.stack(out_tokens, 1).tolist(),
    }


def load_f32(ckpt: str):
    import jax.numpy as jnp

    from dsv4_jax.checkpoint import load_checkpoint

    return load_checkpoint(ckpt, jnp.float32, include_mtp=False)


def held_is_exact(held, params32) -> dict:
    """Whether the weights we hold (bf16, dequantized from FP8 / MXFP4) equal the float32
    dequantization bit for bit, leaf by leaf: e4m3 (3 mantissa bits) and e2m1 (1 bit) times a
    power-of-two scale fit bf16's 7 mantissa bits and its f32 exponent range."""
    import jax
    from flax import nnx

    from dsv4_jax.model import moe

    held = {k: v for k, v in held.items() if k != "mtp"}  # the runner's values (a pure dict)
    pure32 = {k: v for k, v in nnx.to_pure_dict(params32).items() if k != "mtp"}
    if jax.tree.structure(held) != jax.tree.structure(pure32):  # experts held split (moe.split_experts)
        pure32 = {k: v for k, v in nnx.to_pure_dict(moe.split_experts(params32)).items() if k != "mtp"}
    params32 = pure32
    pairs = zip(jax.tree.leaves(held), jax.tree.leaves(params32), strict=True)
    bad = sum(int(not np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))) for a, b in pairs)
    return {"leaves": len(jax.tree.leaves(params32)), "leaves_differing": bad}


def hf_from(cfg, params32):
    from dsv4_jax.bench.hf_port import hf_model  # our params under HF's names (HF_ORACLE.md §5)

    return hf_model(cfg, params32)


def agreement(a: list[int], b: list[int]) -> dict:
    n = min(len(a), len(b))
    diverge = next((i for i in range(n) if a[i] != b[i]), None)
    return {
        "match_fraction": float(np.mean([a[i] == b[i] for i in range(n)])) if n else 0.0,
        "first_divergence": diverge,
        "compared": n,
    }


# ----------------------------------------------------------------------------- main
def run(argv=None) -> dict:
    """Parse ``argv`` (the script's flags), run the benchmark, return the result (also printed
    with ``--json``, written with ``--out``)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--checkpoint", help="a checkpoint directory (default: build/cache checkpoints/bench-SIZE)"
    )
    ap.add_argument("--size", choices=sorted(SIZES), default="mid")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument(
        "--hf-new-tokens", type=int, default=None, help="HF decode length (default: --new-tokens)"
    )
    ap.add_argument("--bandwidth-mib", type=int, default=None, help="array size of the bandwidth probe")
    ap.add_argument(
        "--qat",
        action="store_true",
        help="serve with the checkpoint's QAT rounding (default off: the HF port has none)",
    )
    from dsv4_jax.launch import add_held_args

    add_held_args(ap)  # --weights / --kernels / --dtype (LLM's defaults unless given)
    ap.add_argument(
        "--engine-defaults",
        action="store_true",
        help="serve as LLM(dir) does (default profile, KV format, QAT, pools from memory); "
        "the context is the checkpoint's unless --max-model-len",
    )
    ap.add_argument("--max-model-len", type=int, default=None, help="with --engine-defaults: cap the context")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF port")
    ap.add_argument(
        "--no-decode-lookahead",
        action="store_true",
        help="read back each step before dispatching the next (engine/lookahead.py), for comparison",
    )
    ap.add_argument(
        "--agree-f32",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also check greedy agreement with our engine in float32",
    )
    ap.add_argument(
        "--mtp",
        default=None,
        help="MTP draft depths to compare, e.g. 0,1,2,3: decode tok/s and acceptance per batch and depth "
        "(one engine without drafts, one verifying the deepest; depths alternate within each batch)",
    )
    ap.add_argument("--repeats", type=int, default=1, help="with --mtp: passes over the depths")
    ap.add_argument(
        "--prompts",
        choices=("random", "heldout"),
        default="random",
        help="random token ids, or slices of the demo's held-out text (dsv4_jax.train; the demo checkpoint only): "
        "what MTP acceptance means",
    )
    ap.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    log = lambda *a: print(*a, file=sys.stderr if args.json else sys.stdout, flush=True)

    import jax

    ckpt = args.checkpoint or build_checkpoint(
        os.path.join(ROOT, "checkpoints", f"bench-{args.size}"), args.size
    )
    batches = [int(b) for b in args.batches.split(",")]
    max_b, plen, new = max(batches), args.prompt_len, args.new_tokens
    rng = np.random.RandomState(0)
    t = time.perf_counter()
    held = {"weights": args.weights, "kernels": args.kernels, "dtype": args.dtype}
    max_len = args.max_model_len if args.engine_defaults else plen + new + 1
    llm = make_llm(
        ckpt,
        held,
        max_b,
        max_len,
        max_b * plen,
        not args.no_decode_lookahead,
        args.qat,
        args.engine_defaults,
        speculative_tokens=0 if args.mtp is not None else None,
    )
    cfg = llm.model_config
    rss_load = rss_bytes()
    log(
        f"loaded {ckpt} in {time.perf_counter() - t:.1f} s: {llm.held.describe()}, KV {llm.engine.config.kv_format}, "
        f"QAT {'on' if llm.qat else 'off'}, max_model_len {llm.engine.max_model_len}, "
        f"pools {llm.pools.total_bytes / 2**30:.2f} GiB ({llm.pools.budget or 'slots x context'}); "
        f"RSS {rss_load / 2**30:.2f} GiB"
    )
    prompts = {b: rng.randint(2, cfg.vocab_size, (b, plen)).tolist() for b in batches}
    if args.prompts == "heldout":
        prompts = heldout_prompts(ckpt, cfg, batches, plen)
    wb = weight_bytes(llm.engine.runner.params, cfg)
    bw = measure_bandwidth(args.bandwidth_mib or (64 if args.size == "tiny" else 1024))
    res: dict = {
        "checkpoint": ckpt,
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.default_backend(),
        "config": {
            k: getattr(cfg, k)
            for k in (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "head_dim",
                "n_routed_experts",
                "num_experts_per_tok",
                "vocab_size",
                "index_topk",
                "compress_ratios",
            )
        },
        "held": llm.held.describe() + " (fp32 for the leaves params.py keeps in fp32)",
        "engine_defaults": args.engine_defaults,
        "kv_format": llm.engine.config.kv_format,
        "qat_on": bool(llm.qat),
        "max_model_len": llm.engine.max_model_len,
        "pool_bytes": llm.pools.total_bytes,
        "pool_budget": llm.pools.budget,
        "rss_after_load_bytes": rss_load,
        "decode_lookahead": not args.no_decode_lookahead,
        "qat": args.qat,
        "loadavg_start": os.getloadavg(),
        "weight_bytes": wb,
        "bandwidth_GBps": bw / 1e9,
        "prompt_len": plen,
        "new_tokens": new,
        "batches": {},
    }
    log(
        f"active weight bytes/token (batch 1): {bytes_per_step(wb, cfg, 1) / 1e6:.1f} MB; "
        f"read bandwidth {bw / 1e9:.2f} GB/s"
    )
    if args.mtp is not None:
        depths = sorted({int(k) for k in args.mtp.split(",")})
        res["mtp"] = run_mtp(llm, depths, prompts, rng, new, args.repeats, log, make_deep=lambda k: make_llm(
            ckpt, held, max_b, max_len, max_b * plen, not args.no_decode_lookahead, args.qat,
            args.engine_defaults, speculative_tokens=k,
        ))  # fmt: skip
        return _finish(res, args)
    for b in batches:
        warm = rng.randint(2, cfg.vocab_size, (b, plen)).tolist()
        t = time.perf_counter()
        run_llm(llm, warm, new)  # compiles this batch's prefill and decode shapes
        compile_s = time.perf_counter() - t
        ours = run_llm(llm, prompts[b], new)
        step_bytes = bytes_per_step(wb, cfg, b)
        roof = b * bw / step_bytes
        entry = {
            "weight_bytes_per_step": step_bytes,
            "roofline_tok_s": roof,
            "warmup_s": compile_s,
            "jax": {k: v for k, v in ours.items() if k != "tokens"},
            "jax_fraction_of_roofline": ours["decode_tok_s"] / roof,
        }
        entry["jax_tokens"] = ours["tokens"][:1]
        res["batches"][str(b)] = entry
        log(
            f"B={b:3d} ours: prefill {ours['prefill_s']:.3f} s, decode {ours['decode_tok_s']:.1f} tok/s "
            f"({ours['step_ms']:.1f} ms/step); roofline {roof:.1f} tok/s -> {entry['jax_fraction_of_roofline']:.1%}; "
            f"in compiled step {ours['in_compiled_step_fraction']:.1%}, {ours['compilations']} compilations"
        )
    res["rss_peak_bytes"] = rss_peak_bytes()
    log(f"RSS peak {res['rss_peak_bytes'] / 2**30:.2f} GiB")
    cfg32, params32 = load_f32(ckpt)
    if llm.held.weights != "packed":
        res["held_vs_f32_weights"] = held_is_exact(llm.engine.runner.params, params32)
        log(f"held {llm.held.weights} weights against the f32 dequantization: {res['held_vs_f32_weights']}")
    del llm
    if not args.no_hf:
        hf_new = args.hf_new_tokens or new
        model = hf_from(cfg32, params32)
        run_hf(model, rng.randint(2, cfg.vocab_size, (1, plen)).tolist(), 2)  # warm-up (allocations)
        for b in batches:
            hf = run_hf(model, prompts[b], hf_new)
            entry = res["batches"][str(b)]
            entry["hf"] = {k: v for k, v in hf.items() if k != "tokens"}
            entry["speedup_decode"] = entry["jax"]["decode_tok_s"] / hf["decode_tok_s"]
            entry["speedup_prefill"] = hf["prefill_s"] / entry["jax"]["prefill_s"]
            if b == batches[0]:
                res[f"hf_tokens_b{b}"] = hf["tokens"][0]
                res["agreement_held_vs_hf"] = agreement(entry["jax_tokens"][0], hf["tokens"][0])
            log(
                f"B={b:3d} HF:   prefill {hf['prefill_s']:.3f} s, decode {hf['decode_tok_s']:.1f} tok/s; "
                f"ours/HF decode {entry['speedup_decode']:.1f}x, prefill {entry['speedup_prefill']:.1f}x"
            )
        del model, params32
        if args.agree_f32:
            b = batches[0]
            llm32 = make_llm(
                ckpt, {"weights": "f32"}, b, plen + new + 1, b * plen, not args.no_decode_lookahead
            )
            ours32 = run_llm(llm32, prompts[b], min(new, hf_new))
            res["agreement_f32_vs_hf"] = agreement(ours32["tokens"][0], res[f"hf_tokens_b{b}"])
            del llm32
        for key in ("agreement_held_vs_hf", "agreement_f32_vs_hf"):
            if key in res:
                log(f"{key}: {res[key]}")
    return _finish(res, args)


def _finish(res: dict, args) -> dict:
    res["loadavg_end"] = os.getloadavg()  # other jobs on the machine skew every figure
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    if args.json:
        print(json.dumps(res, indent=2))
    return res


def main(argv=None) -> int:
    """``scripts/bench_decode.py``: the figures go to stdout / ``--out``; the exit status is 0."""
    run(argv)
    return 0
