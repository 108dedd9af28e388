"""Needle in a haystack through the serving path: can the demo model find one token anywhere?

    python scripts/needle.py [--checkpoint checkpoints/demo] [--json] [--plot needle.png]
    python scripts/needle.py --lengths 1024 --depths 0,0.5 --samples 4 --indexer random --json

Each prompt is held-out Python-stdlib text with ``" The secret word is" V "."`` at a depth
(0 = the first token, 1 = just before the question) and ends with ``"\\nWhat is the secret
word? The secret word is"``; the answer is correct when the greedy next token is V (one of
64 words: chance 1.6%). Prompts go through ``dsv4_jax.LLM`` in-process: the real engine with
paged caches, chunked prefill (``--max-tokens-per-step``) and the prefix cache.

Runs (``--runs``, each ``SWA_STRATEGY:KV_FORMAT``): every prompt is sent twice; the first
answer is the cold one, the second comes from a prefix-cache hit (the cached blocks of the
first, the SWA window restored by the run's strategy: ``full`` snapshot per block,
``checkpoint`` every ``--checkpoint-interval`` tokens then replay, ``recompute`` replay).
``--indexer random`` replaces the CSA layers' lightning indexer by a randomly initialised
one (a control: its top-k no longer follows the content, so retrieval beyond the window
should fail). ``--json`` prints one object: accuracy per run, pass (cold / hit), context
length and depth, with each cell's distance to the needle versus the window.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository


def build_prompts(tok, lengths, depths, samples: int, seed: int):
    """[{length, depth, tokens, value, distance}]: ``samples`` prompts per (length, depth)."""
    from dsv4_jax.train.data import Corpus

    corpus = Corpus.build(tok)
    rng = np.random.RandomState(seed)
    out = []
    for length in lengths:
        for depth in depths:
            for _ in range(samples):
                v = int(corpus.values[rng.randint(len(corpus.values))])
                seq, vi = corpus.needle_sample(rng, length, depth, v, split="eval")
                out.append(
                    {
                        "length": length,
                        "depth": depth,
                        "tokens": seq.tolist(),
                        "value": v,
                        "distance": length - 1 - vi,
                    }
                )
    return out


def random_indexer_checkpoint(src: str, dst: str, seed: int) -> None:
    """``src`` with every ``layers.*.attn.indexer.*`` weight re-drawn at random (the control)."""
    import jax
    import jax.numpy as jnp

    from dsv4_jax.checkpoint import demo as mdc
    from dsv4_jax.checkpoint import load_checkpoint, load_tokenizer
    from dsv4_jax.model.params import init_params

    cfg, params = load_checkpoint(src, jnp.float32)
    fresh = init_params(cfg, jax.random.PRNGKey(seed))
    layers, new = params["layers"], fresh["layers"]
    for i in range(len(layers)):  # by index: a list of layers, or a mapping keyed 0, 1, ...
        if "indexer" in layers[i]["attn"]:
            layers[i]["attn"]["indexer"] = new[i]["attn"]["indexer"]
    mdc.build(dst, cfg, jax.tree.map(np.asarray, params), load_tokenizer(src, cfg))


def evaluate(checkpoint: str, prompts, swa: str, kv_format: str, args) -> dict:
    """Cold and prefix-hit accuracy per (length, depth) for one engine configuration."""
    from dsv4_jax import LLM, SamplingParams

    max_len = max(p["length"] for p in prompts) + 8
    llm = LLM(
        checkpoint,
        profile="balanced",
        swa_strategy=swa,
        weights=args.weights,
        kernels=args.kernels,
        dtype=args.dtype,
        kv_format=kv_format,
        qat=False if args.no_qat else None,
        allow_lossy_kv=args.allow_lossy_kv,
        max_model_len=cdiv(max_len, 256) * 256,
        max_batch=args.batch,
        max_tokens_per_step=args.max_tokens_per_step,
        checkpoint_interval=args.checkpoint_interval,
        **({} if swa == "recompute" else {"num_snapshots": 64}),
    )
    sp = SamplingParams(max_tokens=1, temperature=0.0)
    res = {"swa_strategy": swa, "kv_format": kv_format, "cold": {}, "hit": {}}
    t0 = time.time()
    hits0 = llm.engine.stats()["prefix_cache_hit_tokens"]
    for i in range(0, len(prompts), args.batch):
        group = prompts[i : i + args.batch]
        for name in ("cold", "hit"):
            outs = llm.generate([p["tokens"] for p in group], sp)
            for p, o in zip(group, outs):
                cell = res[name].setdefault(str(p["length"]), {}).setdefault(str(p["depth"]), [0, 0])
                cell[0] += int(o.token_ids[:1] == [p["value"]])
                cell[1] += 1
    res["prefix_hit_tokens"] = llm.engine.stats()["prefix_cache_hit_tokens"] - hits0
    res["seconds"] = round(time.time() - t0, 1)
    for name in ("cold", "hit"):
        right = sum(c[0] for d in res[name].values() for c in d.values())
        n = sum(c[1] for d in res[name].values() for c in d.values())
        res[name] = {L: {d: c[0] / c[1] for d, c in ds.items()} for L, ds in res[name].items()}
        res[f"{name}_overall"] = right / n
    return res


def beyond_window(res: dict, prompts, window: int) -> dict:
    """Accuracy over the cells whose needle lies outside the window, per pass."""
    far = {(str(p["length"]), str(p["depth"])) for p in prompts if p["distance"] >= window}
    out = {}
    for name in ("cold", "hit"):
        vals = [res[name][L][d] for (L, d) in far]
        out[name] = float(np.mean(vals)) if vals else None
    return out


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    base = runs[0]
    lengths = sorted(base["cold"], key=int)
    depths = sorted(base["cold"][lengths[0]], key=float)
    grid = np.array([[base["cold"][L][d] for L in lengths] for d in depths])
    im = axes[0].imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
    axes[0].set_xticks(range(len(lengths)), lengths)
    axes[0].set_yticks(range(len(depths)), depths)
    axes[0].set_xlabel("context length (tokens)")
    axes[0].set_ylabel("needle depth")
    axes[0].set_title(f"{base['name']} (cold)")
    for (i, j), v in np.ndenumerate(grid):
        axes[0].text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=axes[0])
    for r in runs:
        for name, style in (("cold", "-o"), ("hit", "--x")):
            ys = [np.mean(list(r[name][L].values())) for L in lengths]
            axes[1].plot([int(L) for L in lengths], ys, style, label=f"{r['name']} {name}")
    axes[1].set_xscale("log", base=2)
    axes[1].set_ylim(-0.05, 1.05)
    axes[1].set_xlabel("context length (tokens)")
    axes[1].set_ylabel("accuracy (mean over depths)")
    axes[1].legend(fontsize=7)
    axes[1].set_title("needle retrieval through dsv4_jax.LLM")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=os.path.join(ROOT, "checkpoints", "demo"))
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--samples", type=int, default=4, help="prompts per (length, depth)")
    ap.add_argument(
        "--runs",
        default="checkpoint:fp8",
        help="comma-separated SWA_STRATEGY:KV_FORMAT, e.g. full:bf16,checkpoint:fp8,recompute:fp8-fp4",
    )
    ap.add_argument("--indexer", choices=("trained", "random"), default="trained")
    from dsv4_jax.launch import add_held_args

    add_held_args(ap)  # --weights / --kernels / --dtype (LLM's defaults unless given)
    ap.add_argument("--no-qat", action="store_true", help="the HF port's unquantized math (docs/SERVING.md)")
    ap.add_argument("--allow-lossy-kv", action="store_true", help="FP8 storage with --no-qat")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-tokens-per-step", type=int, default=2048, help="prefill chunk budget")
    ap.add_argument("--checkpoint-interval", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--plot", metavar="PNG")
    args = ap.parse_args(argv)

    from dsv4_jax.checkpoint import load_tokenizer
    from dsv4_jax.config import Config

    cfg = Config.from_json(os.path.join(args.checkpoint, "config.json"))
    tok = load_tokenizer(args.checkpoint, cfg)
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    prompts = build_prompts(tok, lengths, depths, args.samples, args.seed)
    ckpt, tmp = args.checkpoint, None
    if args.indexer == "random":
        tmp = tempfile.TemporaryDirectory()
        ckpt = tmp.name
        random_indexer_checkpoint(args.checkpoint, ckpt, args.seed)
    report = {
        "checkpoint": os.path.relpath(args.checkpoint, ROOT),
        "indexer": args.indexer,
        "samples_per_cell": args.samples,
        "window": cfg.sliding_window,
        "held": {"weights": args.weights, "kernels": args.kernels, "dtype": args.dtype},
        "qat": not args.no_qat and cfg.qat_trained,
        "max_tokens_per_step": args.max_tokens_per_step,
        "checkpoint_interval": args.checkpoint_interval,
        "chance": 1 / 64,
        "runs": [],
    }
    for run in args.runs.split(","):
        swa, kv = run.split(":")
        r = evaluate(ckpt, prompts, swa, kv, args)
        r["name"] = run
        r["beyond_window"] = beyond_window(r, prompts, cfg.sliding_window)
        report["runs"].append(r)
        if not args.json:
            print(
                f"{run}: cold {r['cold_overall']:.3f}  hit {r['hit_overall']:.3f}  beyond window "
                f"{r['beyond_window']}  ({r['prefix_hit_tokens']} prefix-hit tokens, {r['seconds']} s)"
            )
            for L in r["cold"]:
                print(
                    f"  {L:>6}: "
                    + "  ".join(f"d={d}: {v:.2f}/{r['hit'][L][d]:.2f}" for d, v in r["cold"][L].items())
                )
    if args.plot:
        plot(report, args.plot)
    if args.json:
        print(json.dumps(report, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


from dsv4_jax.intmath import cdiv
