"""The numerics report: how far each serving configuration drifts from float32, next to the HF
port's own bfloat16 copy (docs/PERF.md "bf16 numerics").

A *serving configuration* is what ``LLM`` runs: compute dtype × KV storage format × QAT rounding
on/off × kernels (``Serving``). Its *reference* is the same model in float32 with dense float32
state and the same QAT setting: with QAT off that is the HF port's math (our float32 equals it
to ~1e-5, tests/test_parity.py), with QAT on it is DeepSeek's ``inference/model.py`` math.

Every configuration runs the path the model runner jits (``model.forward`` over a decode
state): one prefill chunk per prompt, then one decode step per token, all prompts of a batch
as rows of one step. Per prompt it measures, against the reference:

* **teacher-forced** logits at the prompt's last ``PROMPT_POSITIONS`` positions and at every
  position of the reference's greedy continuation (fed the reference's tokens): KL(ref ‖ got)
  and top-1 agreement per position, max / mean |Δlogit|, and the residual streams' relative
  drift after every layer (``layer_rel_drift``: RMS over positions of ‖x − x_ref‖ / ‖x_ref‖);
* **free-running greedy** continuations of ``new_tokens`` tokens: how many equal the
  reference's, the mean common prefix, and at the first divergence the *gap*: the reference's
  logit of its own pick minus its logit of ours, from the same prefix. Below ~0.05 any two
  bf16 roundings may flip a near-tie; above it the divergence is a precision loss.

``hf_rows`` measures the HF port the same way (full forward per prompt for the teacher-forced
logits, its cached ``generate`` for greedy), so ``model.to(torch.bfloat16)`` can stand beside
our bf16 path. A prompt is *robust* when HF's bf16 copy keeps the float32 greedy continuation.

Torch is only imported by the ``hf_*`` functions (the oracle extra); the rest needs jax only.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

PROMPT_POSITIONS = 32  # teacher-forced positions measured at the end of each prompt
GAP_TOLERANCE = 0.05  # logits: a divergence below this is a near-tie any bf16 rounding may flip


@dataclasses.dataclass(frozen=True)
class Serving:
    """One serving configuration (``LLM(dir, dtype=, kv_format=, qat=)`` plus the kernels)."""

    dtype: str = "bfloat16"  # compute dtype of weights and activations
    kv_format: str = "bf16"  # bf16 | fp8 | fp8-fp4 storage of KV rows / indexer keys
    qat: bool = False  # the reference's FP8 / FP4 rounding in the forward (ModelOptions.sim_quant)
    kernels: str = "reference"  # reference | pallas (interpret mode on CPU)

    @property
    def label(self) -> str:
        dt = {"bfloat16": "bf16", "float32": "f32"}[self.dtype]
        return f"{dt} compute, {self.kv_format} KV, QAT {'on' if self.qat else 'off'}, {self.kernels}"

    def reference(self) -> Serving:
        """float32 compute and (dense, float32) state, same QAT rounding: what this config approximates."""
        return Serving("float32", "bf16", self.qat, "reference")


# Named sets for --configs. "default": what LLM(dir) serves a V4 checkpoint with (QAT on, bf16,
# FP8 rows + FP4 indexer keys) and the HF-math configurations beside it.
CONFIG_SETS: dict[str, tuple[Serving, ...]] = {
    "default": (
        Serving("float32", "bf16", False),
        Serving("bfloat16", "bf16", False),
        Serving("bfloat16", "fp8", False),
        Serving("bfloat16", "fp8-fp4", False),
        Serving("bfloat16", "bf16", True),
        Serving("bfloat16", "fp8-fp4", True),
        Serving("float32", "fp8-fp4", True),
    ),
    "kernels": (Serving("bfloat16", "fp8-fp4", True, "pallas"), Serving("bfloat16", "bf16", False, "pallas")),
}
CONFIG_SETS["all"] = CONFIG_SETS["default"] + CONFIG_SETS["kernels"]


# ----------------------------------------------------------------------------- our state path
@dataclasses.dataclass
class Rows:
    """What one configuration produced for a batch of prompts (numpy, host side).

    ``logits`` f32[R,P,V] at the measured positions (``valid`` bool[R,P]): the prompt's last
    ``PROMPT_POSITIONS`` (left-padded when shorter), then one per continuation token after the
    first; ``tokens`` i32[R,N] the continuation; ``streams`` f32[L,R,P,n,D] each layer's output
    streams at the same positions (``None`` for the HF port). ``picks``: the router's and the
    indexer's top-k picks (``dsv4_jax.model.choices``), per batch of rows, per step (the prefill
    chunk, then each decode step), per pick site: i32[B,T,k] (``None`` for the HF port).
    """

    logits: np.ndarray | None
    valid: np.ndarray | None
    tokens: np.ndarray
    streams: np.ndarray | None = None
    picks: list | None = None
    pick_kinds: list[str] | None = None  # "router" | "indexer" per pick site

    def next_logits(self, i: int) -> np.ndarray:
        """f32[R,V]: the logits that chose continuation token ``i``."""
        return self.logits[:, PROMPT_POSITIONS - 1 + i]


def _block_tokens(cfg) -> int:
    ratios = [r for r in cfg.compress_ratios if r]
    return math.lcm(128, *ratios)


@functools.lru_cache(maxsize=8)
def _step_fn(cfg, cc, opts):
    import jax

    from dsv4_jax.model import choices
    from dsv4_jax.model.transformer import forward

    kinds: list[str] = []  # what each pick site is ("router" | "indexer"), filled while tracing

    def step(params, tokens, positions, state, meta, sel, imposed):
        """sel i32[B,P]: positions along T to keep; imposed: the step's picks to impose, or None."""
        taps: list = []
        with choices.active(imposed) as ch:
            logits, state = forward(
                params, tokens, positions, state, meta, cfg=cfg, opts=opts, cache=cc, layer_taps=taps
            )
        kinds[:] = ch.kinds
        take = lambda a: jax.numpy.take_along_axis(a, sel.reshape(sel.shape + (1,) * (a.ndim - 2)), axis=1)
        return take(logits), state, [take(x).astype(jax.numpy.float32) for x in taps], ch.seen

    return jax.jit(step, donate_argnums=(3,)), kinds


def run_rows(
    cfg,
    params,
    serving: Serving,
    prompts: list[list[int]],
    new_tokens: int,
    forced: list[list[int]] | None = None,
    *,
    reference: bool = False,
    impose: list | None = None,
) -> Rows:
    """Run ``prompts`` as rows of the state path under ``serving`` (``params`` held in its dtype).

    ``forced``: feed these continuations (teacher forcing) instead of the greedy picks.
    ``reference``: dense float32 state (the reference's storage), whatever ``serving`` says.
    ``impose``: the router / indexer picks to make instead of the model's own, per step (one
    batch's ``Rows.picks`` entry from a run of the same prompts and continuation).
    """
    import jax.numpy as jnp

    from dsv4_jax.model import state as kvc
    from dsv4_jax.model.transformer import ModelOptions

    r = len(prompts)
    bt = _block_tokens(cfg)
    longest = max(len(p) for p in prompts) + new_tokens
    nb = cdiv(longest, bt)
    cc = kvc.CacheConfig(
        num_slots=r,
        num_blocks=r * nb,
        max_blocks_per_seq=nb,
        block_tokens=bt,
        fmt=kvc.KVFormat.parse(serving.kv_format),
        dtype=jnp.float32 if reference else jnp.bfloat16,
    )
    opts = ModelOptions(sim_quant=serving.qat, kernels=serving.kernels)
    step, kinds = _step_fn(cfg, cc, opts)
    state = kvc.init_state(cfg, cc)
    table = np.arange(r * nb, dtype=np.int32).reshape(r, nb)
    slots = np.arange(r, dtype=np.int32)
    lens = np.array([len(p) for p in prompts], np.int32)

    t = max(8, 1 << (int(lens.max()) - 1).bit_length())  # the runner's power-of-two prefill bucket
    tokens = np.zeros((r, t), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    q = PROMPT_POSITIONS
    sel = np.maximum(lens[:, None] - q + np.arange(q)[None, :], 0).astype(np.int32)  # left-padded
    valid = [lens[:, None] - q + np.arange(q)[None, :] >= 0]
    logits, state, taps, seen = step(
        params,
        tokens,
        np.broadcast_to(np.arange(t, dtype=np.int32), (r, t)),
        state,
        kvc.StepMeta(slots, table, lens),
        sel,
        None if impose is None else impose[0],
    )
    out_logits, out_taps = [np.asarray(logits, np.float32)], [np.stack([np.asarray(x) for x in taps])]
    picks = [[np.asarray(x) for x in seen]]
    gen = [[forced[i][0] if forced is not None else int(np.argmax(out_logits[0][i, -1])) for i in range(r)]]
    one = np.ones(r, np.int32)
    zero = np.zeros((r, 1), np.int32)
    for k in range(new_tokens - 1):
        cur = np.array(gen[-1], np.int32)[:, None]
        logits, state, taps, seen = step(
            params,
            cur,
            (lens + k)[:, None],
            state,
            kvc.StepMeta(slots, table, one),
            zero,
            None if impose is None else impose[k + 1],
        )
        lg = np.asarray(logits, np.float32)
        out_logits.append(lg)
        out_taps.append(np.stack([np.asarray(x) for x in taps]))
        picks.append([np.asarray(x) for x in seen])
        valid.append(np.ones((r, 1), bool))
        gen.append([forced[i][k + 1] if forced is not None else int(np.argmax(lg[i, 0])) for i in range(r)])
    return Rows(
        np.concatenate(out_logits, axis=1),
        np.concatenate(valid, axis=1),
        np.array(gen, np.int32).T,
        np.concatenate(out_taps, axis=2),
        [picks],
        list(kinds),
    )


# ----------------------------------------------------------------------------- the HF port
def hf_rows(model, prompts: list[list[int]], new_tokens: int, forced: list[list[int]] | None = None) -> Rows:
    """``run_rows`` for an HF ``DeepseekV4ForCausalLM`` (any dtype): one row at a time (the port
    mishandles padded batches, HF_ORACLE.md §8.3). Teacher-forced logits come from one full
    forward over prompt + continuation; greedy continuations from its cached ``generate``."""
    import torch

    r, q = len(prompts), PROMPT_POSITIONS
    logits = np.zeros((r, q + new_tokens - 1, model.config.vocab_size), np.float32)
    valid = np.zeros(logits.shape[:2], bool)
    tokens = np.zeros((r, new_tokens), np.int32)
    with torch.no_grad():
        for i, p in enumerate(prompts):
            if forced is None:
                out = model.generate(
                    torch.tensor([p]),
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                )
                tokens[i] = out[0, len(p) :].numpy()
            else:
                tokens[i] = forced[i][:new_tokens]
            seq = list(p) + tokens[i, :-1].tolist()
            lg = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0].float().numpy()
            n = len(p)
            lo = max(0, n - q)
            logits[i, q - (n - lo) : q] = lg[lo:n]
            logits[i, q:] = lg[n:]
            valid[i, q - (n - lo) :] = True
    return Rows(logits, valid, tokens)


def hf_model_from(cfg, params_f32, dtype: str):
    """The HF port holding ``params_f32`` (our float tree), in float32 or bfloat16."""
    import torch

    from dsv4_jax.bench.hf_port import hf_model

    m = hf_model(cfg, params_f32)
    return m.to(torch.bfloat16) if dtype == "bfloat16" else m


# ----------------------------------------------------------------------------- comparison
def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def compare(ref: Rows, got: Rows) -> dict:
    """Teacher-forced drift of ``got`` from ``ref`` over their valid positions."""
    v = ref.valid & got.valid
    a, b = ref.logits[v], got.logits[v]  # f32[M,V]
    la, lb = _log_softmax(a.astype(np.float64)), _log_softmax(b.astype(np.float64))
    kl = (np.exp(la) * (la - lb)).sum(-1)
    d = np.abs(a - b)
    out = {
        "positions": int(v.sum()),
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()),
        "max_abs_logit_drift": float(d.max()),
        "mean_abs_logit_drift": float(d.mean()),
    }
    if ref.streams is not None and got.streams is not None:
        xr, xg = ref.streams[:, v], got.streams[:, v]  # f32[L,M,n,D]
        num = np.sqrt(((xg - xr) ** 2).sum((-2, -1)))
        den = np.sqrt((xr**2).sum((-2, -1)))
        out["layer_rel_drift"] = [float(x) for x in np.sqrt(((num / den) ** 2).mean(-1))]
    return out


def greedy_agreement(ref: Rows, got: Rows, robust: np.ndarray | None = None) -> dict:
    """Free-running greedy ``got.tokens`` against the reference's ``ref.tokens`` (``ref`` from its
    own greedy pass, so its logits are the reference's at every prefix it took). ``robust``
    bool[R]: the prompts HF's bf16 copy keeps (the target's filter); gaps are reported for all
    prompts and for those."""
    r, n = ref.tokens.shape
    same = ref.tokens == got.tokens
    prefix = np.where(same.all(1), n, np.argmin(same, axis=1))
    gaps = []
    for i in range(r):
        if prefix[i] < n:
            lg = ref.next_logits(int(prefix[i]))[i]
            gaps.append(float(lg[ref.tokens[i, prefix[i]]] - lg[got.tokens[i, prefix[i]]]))
        else:
            gaps.append(None)
    out = {
        "prompts": r,
        "tokens": n,
        "exact": int(same.all(1).sum()),
        "mean_common_prefix": float(prefix.mean()),
        "divergence_gaps": gaps,
        "max_gap": max((g for g in gaps if g is not None), default=0.0),
    }
    if robust is not None:
        rg = [g for g, ok in zip(gaps, robust) if ok and g is not None]
        out.update(
            robust_prompts=int(robust.sum()),
            robust_diverged=len(rg),
            robust_max_gap=max(rg, default=0.0),
            robust_over_tolerance=sum(g > GAP_TOLERANCE for g in rg),
        )
    return out


def pick_flips(ref: Rows, got: Rows, prompts: list[list[int]], batch: int) -> dict:
    """Share of the router's and the indexer's top-k picks (compared as sets) that ``got`` made
    differently from ``ref``, over every prompt and continuation position both ran (the same
    tokens: ``got`` teacher-forced on ``ref``'s continuation)."""
    flips: dict[str, list[int]] = {}
    for b, (rb, gb) in enumerate(zip(ref.picks, got.picks)):
        lens = np.array([len(p) for p in prompts[b * batch : (b + 1) * batch]])
        for s, (rs, gs) in enumerate(zip(rb, gb)):
            for kind, rp, gp in zip(ref.pick_kinds, rs, gs):
                rp, gp = (x.reshape(len(lens), -1, x.shape[-1]) for x in (rp, gp))  # the router's: [B·T, k]
                differ = (np.sort(rp, -1) != np.sort(gp, -1)).any(-1)  # bool[B,T]
                live = (
                    np.arange(rp.shape[1])[None, :] < lens[:, None] if s == 0 else np.ones(differ.shape, bool)
                )
                acc = flips.setdefault(kind, [0, 0])
                acc[0] += int((differ & live).sum())
                acc[1] += int(live.sum())
    return {f"{kind}_pick_flips": n / max(total, 1) for kind, (n, total) in flips.items()}


def imposed_agreement(ref: Rows, imposed: Rows, robust: np.ndarray | None) -> dict:
    """``greedy_agreement`` for a teacher-forced run with ``ref``'s picks imposed: its argmax at
    each step of ``ref``'s continuation, up to the first that differs, is what a free-running
    greedy pass with those picks would have produced (same prefix, same computation)."""
    n = ref.tokens.shape[1]
    argmax = np.stack([imposed.next_logits(i).argmax(-1) for i in range(n)], 1).astype(np.int32)
    g = greedy_agreement(ref, Rows(None, None, argmax), robust)
    keep = ("exact", "max_gap", "robust_diverged", "robust_max_gap", "robust_over_tolerance")
    return {k: g[k] for k in keep if k in g}


# ----------------------------------------------------------------------------- the report
def random_prompts(n: int, seed: int, vocab: int, max_len: int = 300, min_len: int = 2) -> list[list[int]]:
    """``n`` prompts of random token ids (never BOS/EOS), lengths uniform in [min_len, max_len]."""
    rng = np.random.RandomState(seed)
    return [rng.randint(2, vocab, int(rng.randint(min_len, max_len + 1))).tolist() for _ in range(n)]


def text_prompts(tokenizer, n: int, seed: int, max_len: int = 300, min_len: int = 2) -> list[list[int]]:
    """``n`` windows of the demo's held-out text (the end of its standard-library corpus)."""
    from dsv4_jax.train import data

    ids = np.array(tokenizer.encode(data.stdlib_text()).ids)
    held = ids[int(len(ids) * (1 - data.EVAL_FRACTION)) :]
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        length = int(rng.randint(min_len, max_len + 1))
        at = int(rng.randint(0, len(held) - length))
        out.append(held[at : at + length].tolist())
    return out


def _batched(
    fn, prompts, batch: int, forced=None, tokens_only: bool = False, impose: list | None = None
) -> Rows:
    """``fn`` over ``prompts`` in batches of ``batch``, the parts joined. ``tokens_only``: keep
    the continuations and drop each part's logits and streams as it comes (free-running greedy
    runs need only their tokens; at mid width a full Rows is ~2.5 GB). ``impose``: a previous
    run's ``Rows.picks`` (same prompts, same batches), passed to ``fn`` batch by batch."""
    parts = []
    for j, i in enumerate(range(0, len(prompts), batch)):
        args = (prompts[i : i + batch], None if forced is None else forced[i : i + batch])
        part = fn(*args) if impose is None else fn(*args, impose[j])
        if tokens_only:
            part = Rows(None, None, part.tokens)
        parts.append(part)
    cat = lambda xs, axis=0: None if xs[0] is None else np.concatenate(xs, axis=axis)
    return Rows(
        cat([p.logits for p in parts]),
        cat([p.valid for p in parts]),
        cat([p.tokens for p in parts]),
        cat([p.streams for p in parts], axis=1),
        None if parts[0].picks is None else [b for p in parts for b in p.picks],
        parts[0].pick_kinds,
    )


def measure(
    cfg,
    params_f32,
    params_bf16,
    configs,
    prompts,
    new_tokens: int = 32,
    batch: int = 16,
    hf: bool = True,
    log=lambda msg: None,
) -> dict:
    """Every configuration of ``configs`` on ``prompts``, against its float32 reference; with
    ``hf``, the HF port's float32 and bfloat16 copies beside them. One JSON-able dict."""
    held = {"float32": params_f32, "bfloat16": params_bf16}
    refs: dict[bool, Rows] = {}
    for qat in sorted({c.qat for c in configs} | ({False} if hf else set())):
        ref = Serving("float32", "bf16", qat)
        fn = lambda ps, fo: run_rows(cfg, params_f32, ref, ps, new_tokens, fo, reference=True)  # noqa: B023
        refs[qat] = _batched(fn, prompts, batch)
        log(f"reference: float32, QAT {'on' if qat else 'off'}")
    out: dict = {"prompts": len(prompts), "new_tokens": new_tokens, "rows": []}
    robust = None
    if hf:
        m32 = hf_model_from(cfg, params_f32, "float32")
        h32 = _batched(lambda ps, fo: hf_rows(m32, ps, new_tokens, fo), prompts, batch, tokens_only=True)
        m16 = m32.to(__import__("torch").bfloat16)
        h16 = _batched(lambda ps, fo: hf_rows(m16, ps, new_tokens, fo), prompts, batch, tokens_only=True)
        h16_tf = _batched(lambda ps, fo: hf_rows(m16, ps, new_tokens, fo), prompts, batch, refs[False].tokens)
        robust = (h16.tokens == refs[False].tokens).all(1)
        out["hf_float32_greedy_equals_reference"] = int((h32.tokens == refs[False].tokens).all(1).sum())
        out["hf_bfloat16"] = {
            "reference": "float32, QAT off",
            **compare(refs[False], h16_tf),
            **greedy_agreement(refs[False], h16, robust),
        }
        log(f"HF bf16: {_brief(out['hf_bfloat16'])}")
        del m32, m16, h32, h16, h16_tf  # only the tokens and the table row are kept
    for c in configs:
        params = held[c.dtype]
        ref = refs[c.qat]
        run = functools.partial(run_rows, cfg, params, c, new_tokens=new_tokens)
        tf = _batched(lambda ps, fo: run(ps, forced=fo), prompts, batch, ref.tokens)  # noqa: B023
        gr = _batched(lambda ps, fo: run(ps, forced=fo), prompts, batch, tokens_only=True)  # noqa: B023
        row = {
            "serving": dataclasses.asdict(c),
            "label": c.label,
            "reference": f"float32, QAT {'on' if c.qat else 'off'}",
            **compare(ref, tf),
            **pick_flips(ref, tf, prompts, batch),
            **greedy_agreement(ref, gr, robust if not c.qat else None),
        }
        del tf, gr
        if robust is not None and not c.qat and row["robust_over_tolerance"]:
            # Attribution: the same run with the reference's picks imposed. What still diverges
            # over the tolerance is the arithmetic's doing, not a flipped top-k choice.
            im = _batched(
                lambda ps, fo, picks: run(ps, forced=fo, impose=picks),  # noqa: B023
                prompts,
                batch,
                ref.tokens,
                impose=ref.picks,
            )
            row["with_reference_picks"] = imposed_agreement(ref, im, robust)
            del im
        out["rows"].append(row)
        log(f"{c.label}: {_brief(row)}")
    return out


def _brief(r: dict) -> str:
    s = (
        f"mean KL {r['mean_kl']:.2e}, top-1 {r['top1_agreement']:.4f}, max|Δ| {r['max_abs_logit_drift']:.3f}, "
        f"greedy exact {r['exact']}/{r['prompts']}"
    )
    if "robust_prompts" in r:
        s += f", robust {r['robust_prompts']} (diverged {r['robust_diverged']}, max gap {r['robust_max_gap']:.3f})"
    if "router_pick_flips" in r:
        s += f", router picks flipped {r['router_pick_flips']:.4f}"
    if "indexer_pick_flips" in r:
        s += f", indexer picks flipped {r['indexer_pick_flips']:.4f}"
    if "with_reference_picks" in r:
        w = r["with_reference_picks"]
        s += f"; with f32 picks: diverged {w['robust_diverged']}, > tol {w['robust_over_tolerance']}"
    return s


from dsv4_jax.intmath import cdiv
