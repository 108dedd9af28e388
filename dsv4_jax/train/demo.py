"""Train the bundled demo model: a tiny DeepSeek-V4 that retrieves a needle and writes Python.

    python scripts/train_demo.py [--out checkpoints/demo] [--seed 0] [--log train_log.jsonl]
    python scripts/train_demo.py --tiny --out /tmp/x     # a 2-minute smoke run
    python scripts/train_demo.py --mtp-only [--init checkpoints/demo] [--out checkpoints/demo]

Every layer kind of the demo config (``dsv4_jax.checkpoint.demo.DEMO``: SWA, CSA m=4 with a
top-16 lightning indexer, HCA m=128, window 128) trains on CPU with jax + optax, deterministic
from ``--seed``. Data (``dsv4_jax.train.data``): natural text from the Python standard library's
source, and needle samples (one token after " The secret word is", asked for later, possibly
several times, each question at least ``min_gap`` tokens past the needle), and repeated random
strings (the copy signal from which induction heads grow). The curriculum (``PHASES``) starts
with short contexts and a dense indexer (top-k = every entry) so the main attention learns to
read the needle, helped by the retrieval hint (``loss.retrieval_hint``), while the indexer
learns from it by its KL loss; then the configured top-16 sparse selection at 1-2K tokens, and
at 4K and 8K (each restarting the learning rate): 1,970 steps, ~48 min on 2 CPU cores (the
shipped main weights). Then the MTP phase (``dsv4_jax.train.mtp``, 660 steps, ~13 min): the
main model frozen, the MTP block learns to draft token t+2. ``--mtp-only`` runs that phase alone
on a saved checkpoint (``--init``; how the shipped MTP block was trained) and writes the whole
checkpoint again, every main tensor unchanged. docs/NEEDLE.md says how it trains and what it
measures.
Weights are rounded as stored (FP8 / MXFP4, straight-through), then quantized into the
published safetensors format with the tokenizer (``dsv4_jax.checkpoint.demo.build``).
The float params are saved to ``--state`` every ``--save-every`` steps; ``--export STATE``
writes the checkpoint from such a file without training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from dsv4_jax.checkpoint import demo as mdc
from dsv4_jax.checkpoint import load_checkpoint, load_tokenizer
from dsv4_jax.config import Config
from dsv4_jax.model.params import init_params, to_native
from dsv4_jax.train import data
from dsv4_jax.train import loss as L
from dsv4_jax.train import mtp as M


@dataclasses.dataclass(frozen=True)
class Phase:
    steps: int
    batch: int
    length: int
    topk: int  # the indexer's top-k while training (the config's 16 when sparse)
    p_needle: float
    max_questions: int = 1  # questions (each answered) after the needle in one sample
    p_copy: float = 0.0  # share of text rows with a repeated random string (induction signal)
    min_gap: int = 0  # haystack tokens at least between the needle and each question (data.train_batch)
    hint: float = 0.0  # weight of the retrieval hint (loss.retrieval_hint); 0 = off
    lr: float = 0.0  # > 0: the learning rate restarts here (warmup to lr, cosine to lr/10); 0 = continue


# Text, copy strings (the induction signal) and needles from the start, the retrieval hint on:
# the CSA attention is pointed at the needle's entries while the answers learn to read them.
# Then every question at least 140 tokens past the needle (beyond the 128-token window, so
# only the compressed path can answer) under a dense indexer; then the configured top-16
# sparse selection at 1-2K tokens, the indexer having learned the attention by its KL; then
# 4K and 8K tokens, each with a fresh warmup to a lower rate, so the attention reads entries
# further back than it saw at 2K (docs/NEEDLE.md: without them the 8K-16K needles fail).
PHASES = (
    Phase(500, 8, 256, 64, 0.3, 2, 0.8, 0, 1.0),
    Phase(700, 4, 512, 128, 0.7, 3, 0.3, 140, 1.0),
    Phase(350, 2, 1024, 16, 0.7, 4, 0.2, 140, 0.5),
    Phase(150, 1, 2048, 16, 0.8, 4, 0.2, 140, 0.5),
    Phase(150, 1, 4096, 16, 0.8, 4, 0.1, 140, 0.5, 5e-4),
    Phase(120, 1, 8192, 16, 0.8, 4, 0.1, 140, 0.5, 5e-4),
)
TINY = (Phase(6, 2, 256, 64, 0.5, 2, 0.5, 0, 1.0), Phase(6, 1, 512, 16, 0.5, 2, 0.5, 140, 0.5))
LR, WARMUP, CLIP = 2e-3, 100, 1.0


def schedule(phases, lr: float):
    """Warmup then cosine to a tenth, over each run of phases that starts with a rate (the first
    at ``lr`` unless it names its own), so a late long-context phase can restart the rate as a
    resumed run would, within one deterministic command."""
    segs, bounds, k = [], [], 0
    for i, ph in enumerate(phases):
        if i == 0 or ph.lr > 0:
            if i:
                bounds.append(k)
            segs.append([ph.lr or lr, 0])
        segs[-1][1] += ph.steps
        k += ph.steps
    fns = [
        optax.warmup_cosine_decay_schedule(0.0, peak, min(WARMUP, n // 4), n, peak * 0.1) for peak, n in segs
    ]
    return optax.join_schedules(fns, bounds) if bounds else fns[0]


def corpus_and_tokenizer(tok=None):
    """The training corpus, tokenized by ``tok`` (default: a BPE learned from the same text)."""
    if tok is None:
        text = data.stdlib_text()
        tok = mdc.train_tokenizer(mdc.CORPUS.splitlines() + text.splitlines())
    return data.Corpus.build(tok, extra_text=mdc.CORPUS * 20), tok


def export(params, cfg: Config, tok, out: str) -> None:
    """The trained params (the model's ``nnx.State``) rounded to their storage formats, written
    in the published layout."""
    native = to_native(params)
    mdc.build(out, cfg, L.quantized_float_params(native, L.storage_formats(cfg)), tok)


def save_state(params, path: str) -> None:
    """The float params (native tree) as ``--state`` holds them: ``--export`` / ``--resume`` read it."""
    np.savez(path, **{f"a{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(params))})


def train_mtp(params, cfg: Config, corpus, phases, args, log) -> dict:
    """The MTP phase on native ``params`` (``dsv4_jax.train.mtp.train``), with a progress bar and
    the held-out agreement at the end (printed and logged)."""
    t0 = time.time()
    bar = tqdm(total=sum(p.steps for p in phases), desc="mtp", dynamic_ncols=True)

    def progress(m):
        if bar.n % 10 == 0:
            bar.set_postfix(ce=float(m["mtp_loss"]), acc=float(m["mtp_acc"]), agree=float(m["mtp_agree"]))
        bar.update(1)

    params = M.train(params, cfg, corpus, phases, seed=args.seed, lr=args.mtp_lr, log=log, progress=progress)
    bar.close()
    rep = M.heldout_report(params, cfg, corpus)
    log.write(json.dumps({"mtp_heldout": rep, "mtp_time_s": round(time.time() - t0, 1)}) + "\n")
    log.flush()
    for name, r in rep.items():
        print(
            f"MTP held-out {name}: agrees with the main greedy token {r['agree_main']:.3f}, "
            f"true token t+2 {r['acc_true']:.3f} (main model's own {r['main_acc']:.3f}), "
            f"{r['positions']} positions"
        )
    print(f"MTP phase: {sum(p.steps for p in phases)} steps in {time.time() - t0:.0f} s")
    return params


def mtp_only(args) -> int:
    """``--mtp-only``: load ``--init``, train its MTP block, write the whole checkpoint to ``--out``."""
    cfg, params = load_checkpoint(args.init, jnp.float32)
    tok = load_tokenizer(args.init, cfg)
    corpus, _ = corpus_and_tokenizer(tok)
    phases = M.MTP_TINY if args.tiny else M.MTP_PHASES
    with open(args.log, "w") as log:
        params = train_mtp(to_native(params), cfg, corpus, phases, args, log)
    export(params, cfg, tok, args.out)
    print(f"wrote {args.out}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(mdc.ROOT, "checkpoints", "demo"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log", default="train_log.jsonl")
    ap.add_argument("--state", default="train_state.npz", help="float params saved during training")
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--export", metavar="STATE", help="write the checkpoint from a saved state; no training")
    ap.add_argument("--resume", metavar="STATE", help="start from saved params (fresh optimizer)")
    ap.add_argument(
        "--phases",
        help="override PHASES: STEPS:BATCH:LENGTH:TOPK:P_NEEDLE:MAX_QUESTIONS:P_COPY[:MIN_GAP[:HINT[:LR]]],...",
    )
    ap.add_argument(
        "--lr", type=float, default=LR, help="peak learning rate (warmup, then cosine to a tenth)"
    )
    ap.add_argument("--tiny", action="store_true", help="a few steps of each shape (smoke test)")
    ap.add_argument(
        "--mtp-only",
        action="store_true",
        help="train only the MTP block of the checkpoint --init (main weights frozen) and write it to --out",
    )
    ap.add_argument("--init", default=os.path.join(mdc.ROOT, "checkpoints", "demo"), help="for --mtp-only")
    ap.add_argument("--mtp-lr", type=float, default=M.MTP_LR, help="peak learning rate of the MTP phase")
    args = ap.parse_args(argv)
    if args.mtp_only:
        return mtp_only(args)

    cfg = Config(**mdc.DEMO)
    corpus, tok = corpus_and_tokenizer()
    params = init_params(cfg, jax.random.PRNGKey(args.seed))
    treedef = jax.tree.structure(params)
    if args.export or args.resume:
        with np.load(args.export or args.resume) as z:
            params = jax.tree.unflatten(treedef, [jnp.asarray(z[f"a{i}"]) for i in range(len(z.files))])
    if args.export:
        export(params, cfg, tok, args.out)
        print(f"wrote {args.out}")
        return 0

    phases = TINY if args.tiny else PHASES
    if args.phases:
        types = (int, int, int, int, float, int, float, int, float, float)
        phases = [Phase(*(t(v) for t, v in zip(types, ph.split(":")))) for ph in args.phases.split(",")]
    total = sum(p.steps for p in phases)
    sched = schedule(phases, args.lr)
    opt = optax.chain(optax.clip_by_global_norm(CLIP), optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=0.0))
    trainable, frozen = L.split(params)
    opt_state = opt.init(trainable)
    formats = L.storage_formats(cfg)
    rng = np.random.RandomState(args.seed)
    step_fns = {}

    def step_fn(topk: int, hint: float):
        if (topk, hint) not in step_fns:
            lf = L.make_loss(dataclasses.replace(cfg, index_topk=topk), frozen, formats, hint_weight=hint)

            def step(tr, st, toks, text, ans, src):
                (tot, m), g = jax.value_and_grad(lf, has_aux=True)(tr, toks, text, ans, src)
                upd, st = opt.update(g, st, tr)
                return optax.apply_updates(tr, upd), st, {**m, "loss": tot, "gnorm": optax.tree.norm(g)}

            step_fns[topk, hint] = jax.jit(step, donate_argnums=(0, 1))
        return step_fns[topk, hint]

    log = open(args.log, "w")  # noqa: SIM115 (open for the whole run)
    t0 = time.time()
    bar = tqdm(total=total, desc="train", dynamic_ncols=True)
    k = 0
    for ph in phases:
        fn = step_fn(ph.topk, ph.hint)
        for _ in range(ph.steps):
            toks, text, ans, src = data.train_batch(
                corpus, rng, ph.batch, ph.length, ph.p_needle, ph.max_questions, ph.p_copy, ph.min_gap
            )
            trainable, opt_state, m = fn(trainable, opt_state, toks, text, ans, src)
            k += 1
            if k % 10 == 0 or k == total:
                m = {n: round(float(v), 4) for n, v in m.items()}
                rec = {
                    "step": k,
                    "length": ph.length,
                    "topk": ph.topk,
                    "time_s": round(time.time() - t0, 1),
                    **m,
                }
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix(
                    lm=m["lm"], ans=m["answer"], kl=m["kl"], hint=m["hint"], acc=m["answer_acc"], L=ph.length
                )
            if k % args.save_every == 0 or k == total:
                save_state(L.merge(trainable, frozen), args.state)
            bar.update(1)
    bar.close()
    params = train_mtp(
        L.merge(trainable, frozen), cfg, corpus, M.MTP_TINY if args.tiny else M.MTP_PHASES, args, log
    )
    save_state(params, args.state)
    export(params, cfg, tok, args.out)
    print(f"trained {total} steps in {time.time() - t0:.0f} s; wrote {args.out}")
    return 0
