"""The demo's MTP phase: the multi-token-prediction block learns to draft (ARCHITECTURE.md §7).

At each position t the MTP block reads the main model's final streams before its HC head and
the embedding of token t+1, and predicts token t+2 (``transformer.mtp_forward``). This phase
trains the ``mtp.*`` params only: the main model is frozen, with the embedding and the head
that the block shares. Its streams are computed once per batch, without gradient, from
its weights as the checkpoint stores them. The loss is the cross-entropy of the draft at t
against token t+2 over the targets the main training scores (``data.train_batch``: natural
text and the needle answers; not a needle's own value, not the first copy of a copy row's
string), with the MTP weights rounded to their storage formats in the forward pass
(straight-through): FP8 linears and MXFP4 experts as ``loss.fake_quant``, and the BF16 leaves
(norms, router) to bfloat16, so the checkpoint drafts exactly what training saw. The router's
selection bias gets no gradient (it only steers the top-k); it is updated as DeepSeek-V3's
auxiliary-loss-free balancing does: after each step, ``bias_e += γ·sign(1/E − load_e)`` (the
share of picks expert e got in the batch), γ = ``BIAS_RATE`` scaled by the learning-rate
schedule, so no routed expert of the block stays unused.

``agreement``: teacher-forced top-1 agreement of the draft at t with the main model's own
greedy token at t+1 (what greedy speculative decoding accepts) and with the true token t+2,
on held-out rows (``heldout_rows``: the corpus's held-out tail, never trained on).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dsv4_jax.checkpoint import layout, placement
from dsv4_jax.config import Config
from dsv4_jax.model import choices
from dsv4_jax.model.params import from_native, param_infos, to_native
from dsv4_jax.model.transformer import ModelOptions, as_model, forward_streams, head_logits, mtp_forward
from dsv4_jax.train import data
from dsv4_jax.train import loss as L

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class MTPPhase:
    """Steps of ``data.train_batch`` rows (its arguments); the main model runs at the config's top-k."""

    steps: int
    batch: int
    length: int
    p_needle: float
    max_questions: int = 1
    p_copy: float = 0.0
    min_gap: int = 0


# Text and needle rows (questions beyond the window) at 256 tokens: the block attends over its
# own 128-token window, so longer rows would add main-model positions, not MTP context; then
# 2K-token rows, so it also drafts from the main streams deep in a context.
MTP_PHASES = (
    MTPPhase(600, 8, 256, 0.3, 2, 0.1, 140),
    MTPPhase(60, 2, 2048, 0.5, 4, 0.1, 140),
)
MTP_TINY = (MTPPhase(4, 2, 256, 0.5, 2, 0.3, 0),)
MTP_LR, MTP_WARMUP, MTP_CLIP = 5e-3, 50, 1.0
BIAS_RATE = 1e-2  # γ of the router-bias balancing at the peak learning rate
EVAL_SEED = 20260424  # held-out rows: ``heldout_rows`` draws from ``Corpus.eval`` with this seed


def stored_formats(cfg: Config):
    """Like ``loss.storage_formats``, with the leaves stored as BF16 marked ``("bf16", None)``."""
    names = placement.leaf_names(param_infos(cfg, jnp.float32, include_mtp=True))

    def fmt(name: str):
        f = layout.leaf_format(name, cfg)
        bf16 = f[0] == "float" and layout.native_float_dtype(name) == "BF16"
        return ("bf16", None) if bf16 else f

    return jax.tree.map(fmt, names)


def as_stored(w, fmt_block):
    """``w`` as the checkpoint stores it (FP8 / MXFP4 / BF16 rounding), straight-through gradient."""
    if fmt_block[0] == "bf16":
        return w + jax.lax.stop_gradient(w.astype(jnp.bfloat16).astype(w.dtype) - w)
    return L.fake_quant(w, fmt_block)


def stored(native: dict, formats) -> dict:
    """A native tree (or part of one, ``formats`` its counterpart) with every float leaf rounded
    as the checkpoint stores it: the values a load of the exported checkpoint gives, host arrays."""
    return jax.tree.map(
        lambda w, f: np.asarray(as_stored(jnp.asarray(w), f) if L.is_trainable(w) else w), native, formats
    )


def frozen_main(native: dict, formats) -> dict:
    """The main model's params (everything but ``mtp``) as stored, host arrays."""
    main = {k: v for k, v in native.items() if k != "mtp"}
    return stored(main, {k: formats[k] for k in main})


def main_pass(cfg: Config, opts: ModelOptions):
    """``fn(main, tokens i32[B,T]) -> (streams f32[B,T,n,D], greedy i32[B,T])``: the frozen main
    model's final streams before its HC head and its argmax next token at each position."""

    def fn(main, tokens):
        params = from_native(cfg, main)
        pos = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        x, _ = forward_streams(params, tokens, pos, cfg, opts)
        model = as_model(params, cfg)
        logits = head_logits(x, model.hc_head, model.norm, model.head, cfg)
        return x, jnp.argmax(logits, -1).astype(jnp.int32)

    return jax.jit(fn)


def make_mtp_loss(cfg: Config, formats, opts: ModelOptions | None = None):
    """``loss(mtp, main, x_main, tokens, text_mask, answer_mask, greedy) -> (mean CE, (metrics,
    load))``, ``load`` f32[E]: the share of the router's picks each routed expert got.

    ``mtp``: the native MTP params (a list, one block); ``main``: the frozen rest (``frozen_main``);
    ``tokens`` i32[B,L+1] and the masks f32[B,L] as ``data.train_batch`` gives them (mask[i]
    scores token i+1); ``x_main`` f32[B,L,n,D] and ``greedy`` i32[B,L]: ``main_pass`` of
    ``tokens[:, :-1]``. The draft at t (t < L-1) is scored against token t+2.
    """
    opts = opts or ModelOptions()
    fmt = formats["mtp"]

    def loss(mtp, main, x_main, tokens, text_mask, answer_mask, greedy):
        params = from_native(cfg, {**main, "mtp": jax.tree.map(as_stored, mtp, fmt)})
        nxt = tokens[:, 1:]
        pos = jnp.broadcast_to(jnp.arange(nxt.shape[1], dtype=jnp.int32), nxt.shape)
        with choices.active() as rec:  # the block's router picks (its one top-k choice)
            logits, _ = mtp_forward(params, jax.lax.stop_gradient(x_main), nxt, pos, cfg, opts)
        (picks,) = [p for p, kind in zip(rec.seen, rec.kinds) if kind == "router"]
        e = cfg.n_routed_experts
        load = jax.nn.one_hot(picks, e, dtype=F32).reshape(-1, e).sum(0) / picks.size
        logits, tgt = logits[:, :-1], tokens[:, 2:]
        ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tgt[..., None], -1)[..., 0]
        text, ans = text_mask[:, 1:], answer_mask[:, 1:]
        mask = text + ans
        n = jnp.maximum(mask.sum(), 1.0)
        mean = lambda v, m: jnp.sum(v * m) / jnp.maximum(m.sum(), 1.0)
        draft = jnp.argmax(logits, -1)
        total = jnp.sum(ce * mask) / n
        metrics = {
            "mtp_text": mean(ce, text),
            "mtp_answer": mean(ce, ans),
            "mtp_acc": mean(draft == tgt, mask),
            "mtp_agree": mean(draft == greedy[:, 1:], mask),
            "mtp_load_max": load.max(),
        }
        return total, (metrics, load)

    return loss


def balance(mtp: list, load, rate):
    """The router bias of MTP block 0 moved by ``rate`` towards an even load (see the module doc)."""
    blk = mtp[0]
    gate = {
        **blk["ffn"]["gate"],
        "bias": blk["ffn"]["gate"]["bias"] + rate * jnp.sign(1.0 / load.size - load),
    }
    return [{**blk, "ffn": {**blk["ffn"], "gate": gate}}, *mtp[1:]]


def schedule(phases, lr: float):
    """Warmup to ``lr``, cosine to a tenth, over all the phases."""
    n = sum(p.steps for p in phases)
    return optax.warmup_cosine_decay_schedule(0.0, lr, min(MTP_WARMUP, n // 4), n, lr * 0.1)


def train(
    native: dict,
    cfg: Config,
    corpus: data.Corpus,
    phases=MTP_PHASES,
    *,
    seed: int = 0,
    lr: float = MTP_LR,
    log=None,
    opts: ModelOptions | None = None,
    progress=None,
) -> dict:
    """``native`` (the model's native params, ``model.params.to_native``) with its ``mtp`` block
    trained; every other leaf is the very object passed in. ``log``: a file that gets one JSON
    line per 10 steps; ``progress``: called with the step's metrics after each step."""
    opts = opts or ModelOptions()
    formats = stored_formats(cfg)
    main = frozen_main(native, formats)
    mtp = jax.tree.map(jnp.array, native["mtp"])  # a copy: the step donates it
    sched = schedule(phases, lr)
    opt = optax.chain(
        optax.clip_by_global_norm(MTP_CLIP), optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=0.0)
    )
    opt_state = opt.init(mtp)
    lf = make_mtp_loss(cfg, formats, opts)
    run_main = main_pass(cfg, opts)

    def step(mtp, st, k, main, x_main, tokens, text, ans, greedy):
        (tot, (m, load)), g = jax.value_and_grad(lf, has_aux=True)(
            mtp, main, x_main, tokens, text, ans, greedy
        )
        upd, st = opt.update(g, st, mtp)
        mtp = balance(optax.apply_updates(mtp, upd), load, BIAS_RATE * sched(k) / lr)
        return mtp, st, {**m, "mtp_loss": tot, "mtp_gnorm": optax.tree.norm(g)}

    step = jax.jit(step, donate_argnums=(0, 1))
    main = jax.tree.map(jnp.asarray, main)
    rng = np.random.RandomState(seed)
    total, k, t0 = sum(p.steps for p in phases), 0, time.time()
    for ph in phases:
        for _ in range(ph.steps):
            toks, text, ans, _ = data.train_batch(
                corpus, rng, ph.batch, ph.length, ph.p_needle, ph.max_questions, ph.p_copy, ph.min_gap
            )
            x_main, greedy = run_main(main, toks[:, :-1])
            mtp, opt_state, m = step(mtp, opt_state, k, main, x_main, toks, text, ans, greedy)
            k += 1
            if progress is not None:
                progress(m)
            if log is not None and (k % 10 == 0 or k == total):
                rec = {"mtp_step": k, "length": ph.length, "time_s": round(time.time() - t0, 1)}
                rec.update({n: round(float(v), 4) for n, v in m.items()})
                log.write(json.dumps(rec) + "\n")
                log.flush()
    return {**native, "mtp": jax.tree.map(np.asarray, mtp)}


def heldout_rows(corpus: data.Corpus, n: int, length: int, seed: int = EVAL_SEED) -> np.ndarray:
    """``n`` rows i32[n,length] of the held-out natural text (``Corpus.eval``, never trained on)."""
    rng = np.random.RandomState(seed)
    starts = rng.randint(0, len(corpus.eval) - length, size=n)
    return np.stack([corpus.eval[s : s + length] for s in starts]).astype(np.int32)


def heldout_needles(corpus: data.Corpus, n: int, length: int, seed: int = EVAL_SEED) -> np.ndarray:
    """``n`` needle prompts i32[n,length] on held-out haystacks, the needle at a random depth."""
    rng = np.random.RandomState(seed)
    rows = []
    for _ in range(n):
        v = int(corpus.values[rng.randint(len(corpus.values))])
        rows.append(corpus.needle_sample(rng, length, rng.random_sample(), v, split="eval")[0])
    return np.stack(rows)


@functools.lru_cache(maxsize=8)
def _agreement_fn(cfg: Config, opts: ModelOptions):
    def fn(native, tokens):
        params = from_native(cfg, native)
        pos = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        x, _ = forward_streams(params, tokens, pos, cfg, opts)
        model = as_model(params, cfg)
        greedy = jnp.argmax(head_logits(x, model.hc_head, model.norm, model.head, cfg), -1)
        nxt = jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], 1)  # the last draft is not scored
        draft = jnp.argmax(mtp_forward(params, x, nxt, pos, cfg, opts)[0], -1)
        draft, main_next, true = draft[:, :-2], greedy[:, 1:-1], tokens[:, 2:]
        return {
            "agree_main": jnp.mean(draft == main_next),
            "acc_true": jnp.mean(draft == true),
            "main_acc": jnp.mean(main_next == true),
        }

    return jax.jit(fn)


def agreement(params, cfg: Config, tokens, opts: ModelOptions | None = None) -> dict:
    """Teacher-forced draft quality on rows i32[B,L] (``params``: the model's ``nnx.State`` or
    native tree, MTP included): at each t < L-2, the MTP's argmax given the main streams at t
    and token t+1, against the main model's argmax at t+1 (``agree_main``: what greedy
    speculative decoding accepts when token t+1 is the main model's) and the true token t+2
    (``acc_true``); ``main_acc``: the main model's own argmax at t+1 against token t+2."""
    fn = _agreement_fn(cfg, opts or ModelOptions())
    out = {k: float(v) for k, v in fn(to_native(params), jnp.asarray(tokens, jnp.int32)).items()}
    out["positions"] = int(tokens.shape[0] * (tokens.shape[1] - 2))
    return out


def heldout_report(params, cfg: Config, corpus: data.Corpus, opts: ModelOptions | None = None) -> dict:
    """``agreement`` of the params as the checkpoint stores them (``stored``) on 16 held-out text
    rows of 512 tokens and 8 held-out needle prompts of 1,024 tokens (``heldout_rows`` /
    ``heldout_needles`` at ``EVAL_SEED``)."""
    params = stored(to_native(params), stored_formats(cfg))
    return {
        "text": agreement(params, cfg, heldout_rows(corpus, 16, 512), opts),
        "needle": agreement(params, cfg, heldout_needles(corpus, 8, 1024), opts),
    }
