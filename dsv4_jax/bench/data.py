"""Benchmark workloads (SERVING.md §6): the ``random``, ``shared-prefix`` and ``trace`` datasets.

Every dataset yields ``BenchRequest``s whose prompts are token ids when the length matters
(``random``, ``shared-prefix``: the server receives exactly ``input_len`` tokens, as
``vllm bench serve --dataset-name random`` intends), drawn from the tokenizer's ordinary
tokens (special tokens such as BOS/EOS and the chat markers are excluded so they cannot
end or restructure a prompt).

* ``random``: input and output lengths uniform in ``[L·(1−r), L·(1+r)]`` (vLLM's
  ``--random-range-ratio`` r), seeded.
* ``shared-prefix`` (sglang's ``generated-shared-prefix``): ``groups`` random prefixes of
  ``prefix_len`` tokens, each followed by ``prompts_per_group`` different random
  suffixes of ``suffix_len`` tokens; shuffled, seeded. Measures prefix-cache reuse.
* ``trace``: a JSONL file, one request per line: ``prompt`` (text or ids) or
  ``messages`` or ``input_len`` (random ids of that length); ``output_len`` (or
  ``max_tokens``); optional ``timestamp`` (seconds from the start) to replay arrivals.
"""

from __future__ import annotations

import dataclasses
import json
import random


@dataclasses.dataclass
class BenchRequest:
    prompt: str | list[int] | None  # text or token ids (completions); None for chat
    prompt_len: int  # tokens, when known up front (0: unknown until the server reports usage)
    output_len: int
    messages: list[dict] | None = None
    timestamp: float | None = None  # seconds from the start of the run (trace replay)


def ordinary_token_ids(tokenizer, vocab_size: int | None = None) -> list[int]:
    """Ids a random prompt may use: the vocabulary minus added (special / marker) tokens."""
    if tokenizer is None:
        return list(range(2, vocab_size or 1000))
    n = tokenizer.get_vocab_size()
    special = set(tokenizer.get_added_tokens_decoder())
    return [i for i in range(min(n, vocab_size or n)) if i not in special]


def _len(rng: random.Random, mean: int, ratio: float) -> int:
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, round(mean * (1 + ratio)))
    return rng.randint(lo, hi) if ratio > 0 else max(1, mean)


def random_requests(
    n: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    seed: int = 0,
    ids: list[int] | None = None,
) -> list[BenchRequest]:
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    rng, ids = random.Random(seed), ids or list(range(2, 1000))
    out = []
    for _ in range(n):
        li, lo = _len(rng, input_len, range_ratio), _len(rng, output_len, range_ratio)
        out.append(BenchRequest([rng.choice(ids) for _ in range(li)], li, lo))
    return out


def shared_prefix_requests(
    groups: int,
    prompts_per_group: int,
    prefix_len: int,
    suffix_len: int,
    output_len: int,
    seed: int = 0,
    ids: list[int] | None = None,
) -> list[BenchRequest]:
    rng, ids = random.Random(seed), ids or list(range(2, 1000))
    out = []
    for _ in range(groups):
        prefix = [rng.choice(ids) for _ in range(prefix_len)]
        for _ in range(prompts_per_group):
            p = prefix + [rng.choice(ids) for _ in range(suffix_len)]
            out.append(BenchRequest(p, len(p), output_len))
    rng.shuffle(out)
    return out


def jsonl_records(path: str):
    """``(line number, record)`` for each non-blank line of a JSONL file; ``ValueError`` naming
    the file and line for one that is not JSON (the benchmark's traces, generate's inputs)."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from None


def trace_requests(
    path: str, seed: int = 0, ids: list[int] | None = None, tokenizer=None, default_output_len: int = 128
) -> list[BenchRequest]:
    rng, ids = random.Random(seed), ids or list(range(2, 1000))
    out = []
    for n, rec in jsonl_records(path):
        olen = int(rec.get("output_len", rec.get("max_tokens", default_output_len)))
        ts = rec.get("timestamp")
        ts = None if ts is None else float(ts)
        if "messages" in rec:
            out.append(BenchRequest(None, 0, olen, messages=rec["messages"], timestamp=ts))
        elif "prompt" in rec:
            p = rec["prompt"]
            plen = len(p) if isinstance(p, list) else (len(tokenizer.encode(p).ids) if tokenizer else 0)
            out.append(BenchRequest(p, plen, olen, timestamp=ts))
        elif "input_len" in rec:
            k = int(rec["input_len"])
            out.append(BenchRequest([rng.choice(ids) for _ in range(k)], k, olen, timestamp=ts))
        else:
            raise ValueError(f"{path}:{n}: needs 'prompt', 'messages' or 'input_len'")
    if not out:
        raise ValueError(f"{path}: no requests")
    return out
