"""What grammar-constrained decoding costs: decode tok/s with and without a grammar, same model,
same batch, ``LLM``'s defaults (what ``LLM(dir)`` and ``make serve`` run).

Modes, each at every batch size, alternated over ``--repeats`` rounds (absolute times on shared
machines drift; alternation keeps the comparison fair):

* ``free``: greedy, ``ignore_eos``, ``--tokens`` tokens per request;
* ``regex``: the same under a Lark grammar of one regular expression that never completes
  (lowercase words, digits and punctuation), EOS banned by ``logit_bias`` so every row runs the
  full length: the pure cost of the constrained path (split step, host masks) at full batch;
* ``json``: a JSON schema (an object with an enum, a bounded integer and a long array of
  strings), as ``response_format`` sends it; rows end when the model closes the value, so the
  batch thins out — the figure is per generated token;
* ``serial``: ``free`` on a second ``LLM`` built with ``decode_lookahead=False``: what a
  constrained row gives up by taking no decode lookahead, apart from its grammar.

Decode tok/s is the tokens after each request's first, over the span from the earliest first
token to the last finish (prefill excluded). The table prints to stdout; ``--out`` writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from dsv4_jax.engine.sampling_params import SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "kind": {"type": "string", "enum": ["list", "set", "dict"]},
        "size": {"type": "integer", "minimum": 0, "maximum": 999},
        "names": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 40},
    },
    "required": ["kind", "size", "names"],
    "additionalProperties": False,
}
REGEX = '{"grammars": [{"lark_grammar": "start: /[a-z0-9 ,.()_=:]+/"}]}'
PROMPTS = [
    "def load(path):\n    with open(path) as f:",
    "class Queue:\n    def __init__(self):",
    "import os\n",
]


def grammars() -> dict[str, str | None]:
    from dsv4_jax.server.tool_grammar import json_grammar

    return {"regex": REGEX, "json": json_grammar(SCHEMA)}


def decode_rate(outs) -> tuple[float, int]:
    first = min(o.metrics.first_token for o in outs)
    last = max(o.metrics.finished for o in outs)
    n = sum(max(0, len(o.token_ids) - 1) for o in outs)
    return n / (last - first), n


def run(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="checkpoints/demo")
    ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per request")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default="free,serial,regex,json")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    from dsv4_jax.llm import LLM

    llm = LLM(args.checkpoint)
    modes = args.modes.split(",")
    serial = LLM(args.checkpoint, decode_lookahead=False) if "serial" in modes else None
    eos = llm.engine.limits.eos_token_id
    gs = grammars()
    batches = [int(b) for b in args.batch.split(",")]

    def params(mode: str) -> SamplingParams:
        if mode in ("free", "serial"):
            return SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
        bias = ((eos, -100.0),) if mode == "regex" else ()
        return SamplingParams(temperature=0.0, max_tokens=args.tokens, grammar=gs[mode], logit_bias=bias)

    def once(mode: str, b: int):
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(b)]
        return (serial if mode == "serial" else llm).generate(prompts, [params(mode)] * b)

    for mode in modes:  # compile every program the runs below use
        for b in batches:
            once(mode, b)
    rates: dict[tuple[str, int], list[float]] = {(m, b): [] for m in modes for b in batches}
    tokens: dict[tuple[str, int], int] = {}
    t0 = time.monotonic()
    for _ in range(args.repeats):
        for b in batches:
            for mode in modes:
                r, n = decode_rate(once(mode, b))
                rates[(mode, b)].append(r)
                tokens[(mode, b)] = n
    rows = []
    for b in batches:
        free = statistics.median(rates[("free", b)]) if "free" in modes else None
        for mode in modes:
            med = statistics.median(rates[(mode, b)])
            rows.append(
                {
                    "mode": mode,
                    "batch": b,
                    "decode_tok_s": med,
                    "runs": rates[(mode, b)],
                    "tokens_per_run": tokens[(mode, b)],
                    "vs_free": med / free if free else None,
                }
            )
    print(f"{'mode':<6} {'batch':>5} {'decode tok/s':>13} {'vs free':>8} {'tokens/run':>10}")
    for r in rows:
        vs = f"{r['vs_free']:.2f}x" if r["vs_free"] else "-"
        print(f"{r['mode']:<6} {r['batch']:>5} {r['decode_tok_s']:>13.1f} {vs:>8} {r['tokens_per_run']:>10}")
    res = {
        "checkpoint": args.checkpoint,
        "tokens": args.tokens,
        "seconds": time.monotonic() - t0,
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


def main(argv=None) -> int:
    run(argv)
    return 0
