"""Benchmark backends, the load generator and the metrics (SERVING.md §6, vLLM/sglang definitions).

Backends send one ``BenchRequest`` and time it:

* ``HttpBackend``: a running OpenAI-compatible server, streaming (``/v1/completions`` or
  ``/v1/chat/completions``) over httpx; token counts come from the stream's ``usage``.
* ``InProcessBackend``: an ``AsyncEngine`` in this process (the server's engine thread,
  without HTTP): the same scheduling, no network in the numbers.

Metrics, per request: TTFT (send → first token-bearing chunk), ITL (gaps between
token-bearing chunks), TPOT ((E2E − TTFT) / (output tokens − 1)), E2EL (send → last
chunk). Aggregates: mean, p50, p90, p99 of each; request throughput, output and total
token throughput over the wall time of the measured phase. Engine counters over the run
(the server's ``/metrics`` counters before and after it, or the engine thread's stats
snapshot in-process): the prefix-cache hit rate (hit / looked-up prompt tokens) and, with
MTP speculative decoding, the acceptance rate (accepted / verified drafts), the mean
acceptance length (tokens emitted per verify step: accepted drafts + 1) and the acceptance
rate per draft position (position j: accepted / verified j-th drafts of a step).

Load: requests arrive as a Poisson process at ``request_rate`` (``inf``: all at once), or
at their trace timestamps; ``max_concurrency`` caps those in flight (vLLM's semantics).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
import re
import time

import numpy as np

from dsv4_jax.bench.data import BenchRequest

PERCENTILES = (50, 90, 99)
# Engine counters the benchmark reads before and after a run (the engine thread's stats keys;
# per draft position j = 1, 2, ...: ``spec_draft_tokens_pos{j}``, ``spec_accepted_tokens_pos{j}``).
PREFIX_KEYS = ("prefix_cache_hit_tokens", "prefix_cache_query_tokens")
SPEC_KEYS = ("spec_draft_tokens", "spec_accepted_tokens", "spec_verify_steps")
SPEC_POS_KEYS = ("spec_draft_tokens_pos", "spec_accepted_tokens_pos")
# The same counters in the server's /metrics exposition (metrics.py).
METRIC_KEYS = {
    "dsv4_prefix_cache_hit_tokens_total": "prefix_cache_hit_tokens",
    "dsv4_prefix_cache_query_tokens_total": "prefix_cache_query_tokens",
    "dsv4_spec_decode_num_draft_tokens_total": "spec_draft_tokens",
    "dsv4_spec_decode_num_accepted_tokens_total": "spec_accepted_tokens",
    "dsv4_spec_decode_num_drafts_total": "spec_verify_steps",
}
METRIC_POS_KEYS = {
    "dsv4_spec_decode_num_draft_tokens_per_pos_total": "spec_draft_tokens_pos",
    "dsv4_spec_decode_num_accepted_tokens_per_pos_total": "spec_accepted_tokens_pos",
}
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{position="(\d+)"\})?\s+(\S+)')


@dataclasses.dataclass
class Result:
    ok: bool
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0
    itl: list[float] = dataclasses.field(default_factory=list)
    latency: float = 0.0
    error: str = ""


def _record(res: Result, start: float, last: list[float]) -> None:
    now = time.perf_counter()
    if not last:
        res.ttft = now - start
    else:
        res.itl.append(now - last[0])
    last[:] = [now]


class HttpBackend:
    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        chat: bool = False,
        temperature: float = 0.0,
        ignore_eos: bool = True,
        timeout: float = 600.0,
    ):
        import httpx

        self.base = base_url.rstrip("/").removesuffix("/v1")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.chat, self.temperature, self.ignore_eos = chat, temperature, ignore_eos
        self.client = httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=None))
        self.model = model

    async def info(self) -> dict:
        r = await self.client.get(f"{self.base}/v1/models", headers=self.headers)
        r.raise_for_status()
        card = r.json()["data"][0]
        self.model = self.model or card["id"]
        return card

    async def send(self, req: BenchRequest) -> Result:
        body = {
            "model": self.model,
            "max_tokens": req.output_len,
            "temperature": self.temperature,
            "ignore_eos": self.ignore_eos,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.chat:
            body["messages"] = req.messages or [{"role": "user", "content": req.prompt}]
            url = f"{self.base}/v1/chat/completions"
        else:
            body["prompt"] = req.prompt
            url = f"{self.base}/v1/completions"
        res, last, start = Result(False, req.prompt_len), [], time.perf_counter()
        try:
            async with self.client.stream("POST", url, json=body, headers=self.headers) as r:
                if r.status_code != 200:
                    res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}"
                    return res
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        res.error = chunk["error"].get("message", "error")
                        return res
                    if chunk.get("usage"):
                        res.prompt_len = chunk["usage"]["prompt_tokens"]
                        res.output_len = chunk["usage"]["completion_tokens"]
                    for c in chunk.get("choices", []):
                        delta = c.get("delta")
                        if delta is None or (
                            "role" not in delta and ("content" in delta or "reasoning_content" in delta)
                        ):
                            _record(res, start, last)
        except Exception as e:  # noqa: BLE001 - a failed request is a data point, not a crash
            res.error = f"{type(e).__name__}: {e}"
            return res
        res.latency = time.perf_counter() - start
        res.ok = bool(last)
        if not res.ok:
            res.error = "no tokens received"
        return res

    async def counters(self) -> dict[str, float] | None:
        """The engine counters the server exports (``PREFIX_KEYS``, ``SPEC_KEYS``, per-position
        ones) from /metrics, under the engine's stats keys; None if /metrics does not answer."""
        try:
            text = (await self.client.get(f"{self.base}/metrics")).text
        except Exception:  # noqa: BLE001
            return None
        return parse_counters(text)

    async def close(self) -> None:
        await self.client.aclose()


class InProcessBackend:
    def __init__(self, aengine, temperature: float = 0.0, ignore_eos: bool = True):
        self.engine, self.temperature, self.ignore_eos = aengine, temperature, ignore_eos

    async def info(self) -> dict:
        return {"id": "in-process", "max_model_len": self.engine.max_model_len}

    def _ids(self, req: BenchRequest) -> list[int]:
        from dsv4_jax.server import encoding

        tok = self.engine.tokenizer
        if req.messages is not None:
            return tok.encode(encoding.render(req.messages)).ids
        return req.prompt if isinstance(req.prompt, list) else tok.encode(req.prompt).ids

    async def send(self, req: BenchRequest) -> Result:
        from dsv4_jax.engine.sampling_params import SamplingParams

        ids = self._ids(req)
        sp = SamplingParams(
            max_tokens=req.output_len, temperature=self.temperature, ignore_eos=self.ignore_eos
        )
        res, last, start = Result(False, len(ids)), [], time.perf_counter()
        try:
            stream = await self.engine.add(ids, sp)
            async for d in stream:
                if d.token_ids:
                    _record(res, start, last)
                if d.finished:
                    res.output_len = d.num_output_tokens
                    if d.error is not None:
                        res.error = d.error.message
                        return res
        except Exception as e:  # noqa: BLE001
            res.error = f"{type(e).__name__}: {e}"
            return res
        res.latency = time.perf_counter() - start
        res.ok = bool(last)
        return res

    async def counters(self) -> dict[str, float]:
        """The engine counters of the engine thread's latest stats snapshot (0 for a disabled
        prefix cache; positions up to the configured draft depth)."""
        s = self.engine.stats
        out = {k: float(s.get(k, 0)) for k in PREFIX_KEYS + SPEC_KEYS}
        for j in range(1, max(s.get("speculative_tokens", 0), _positions(s)) + 1):
            out.update({f"{k}{j}": float(s.get(f"{k}{j}", 0)) for k in SPEC_POS_KEYS})
        return out

    async def close(self) -> None:
        pass


async def run_load(
    backend,
    requests: list[BenchRequest],
    request_rate: float = math.inf,
    max_concurrency: int | None = None,
    seed: int = 0,
    replay_timestamps: bool = False,
    progress: bool = False,
) -> tuple[list[Result], float]:
    """Send every request; returns the results (in request order) and the wall time."""
    from tqdm import tqdm

    rng = random.Random(seed)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(requests), unit="req", disable=not progress, desc="benchmark")

    async def one(req):
        if sem is None:
            r = await backend.send(req)
        else:
            async with sem:
                r = await backend.send(req)
        bar.update(1)
        return r

    start = time.perf_counter()
    tasks, t = [], 0.0
    for req in requests:
        if replay_timestamps and req.timestamp is not None:
            t = req.timestamp
        elif math.isfinite(request_rate):
            t += rng.expovariate(request_rate)
        delay = start + t - time.perf_counter()
        if delay > 0 and (replay_timestamps or math.isfinite(request_rate)):
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(req)))
    results = await asyncio.gather(*tasks)
    bar.close()
    return list(results), time.perf_counter() - start


def parse_counters(text: str) -> dict[str, float]:
    """``METRIC_KEYS`` / ``METRIC_POS_KEYS`` samples of a Prometheus exposition, by stats key."""
    out = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None:
            continue
        name, pos, value = m.groups()
        if pos is None and name in METRIC_KEYS:
            out[METRIC_KEYS[name]] = float(value)
        elif pos is not None and name in METRIC_POS_KEYS:
            out[f"{METRIC_POS_KEYS[name]}{pos}"] = float(value)
    return out


def counter_delta(before: dict | None, after: dict | None) -> dict | None:
    """``after - before`` per counter (a counter new in ``after`` started at 0)."""
    if before is None or after is None:
        return None
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def _positions(counts: dict) -> int:
    j = 0
    while f"{SPEC_POS_KEYS[0]}{j + 1}" in counts:
        j += 1
    return j


def prefix_hit_rate(delta: dict | None) -> float | None:
    """Prompt tokens served from the prefix cache / looked up (None: not reported)."""
    if delta is None or any(k not in delta for k in PREFIX_KEYS):
        return None
    hit, query = (delta[k] for k in PREFIX_KEYS)
    return hit / query if query else 0.0


def spec_summary(delta: dict | None) -> dict:
    """MTP speculative-decoding figures of a run from its counter deltas: drafts verified,
    accepted, verify steps, the acceptance rate, the mean acceptance length and the rate per
    draft position (a list, position 1 first). Counts are None when the engine does not report
    them; a rate is None when no draft it divides by ran (speculative decoding off, or idle)."""
    if delta is None or any(k not in delta for k in SPEC_KEYS):
        return {
            **{k: None for k in SPEC_KEYS},
            "spec_acceptance_rate": None,
            "spec_mean_acceptance_length": None,
            "spec_acceptance_rate_per_position": None,
        }
    drafted, accepted, steps = (int(delta[k]) for k in SPEC_KEYS)
    per_pos = []
    for j in range(1, _positions(delta) + 1):
        n, a = (delta.get(f"{k}{j}", 0.0) for k in SPEC_POS_KEYS)
        per_pos.append(a / n if n else None)
    return {
        "spec_draft_tokens": drafted,
        "spec_accepted_tokens": accepted,
        "spec_verify_steps": steps,
        "spec_acceptance_rate": accepted / drafted if drafted else None,
        "spec_mean_acceptance_length": 1 + accepted / steps if steps else None,
        "spec_acceptance_rate_per_position": per_pos,
    }


def _stats(xs: list[float]) -> dict:
    if not xs:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    a = np.asarray(xs) * 1000.0  # ms
    return {"mean": float(a.mean()), **{f"p{p}": float(np.percentile(a, p)) for p in PERCENTILES}}


def summarize(results: list[Result], duration: float, counters: dict | None = None) -> dict:
    """The run's metrics; ``counters``: the engine counters' growth over the run
    (``counter_delta``), None when the backend does not report them."""
    ok = [r for r in results if r.ok]
    n_in, n_out = sum(r.prompt_len for r in ok), sum(r.output_len for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    s = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "total_input_tokens": n_in,
        "total_output_tokens": n_out,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": n_out / duration if duration else 0.0,
        "total_token_throughput": (n_in + n_out) / duration if duration else 0.0,
        "ttft_ms": _stats([r.ttft for r in ok]),
        "tpot_ms": _stats(tpot),
        "itl_ms": _stats([x for r in ok for x in r.itl]),
        "e2el_ms": _stats([r.latency for r in ok]),
        "prefix_hit_rate": prefix_hit_rate(counters),
        **spec_summary(counters),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }
    return s


def format_summary(s: dict, title: str = "Serving Benchmark Result") -> str:
    w = 50
    lines = [f"{' ' + title + ' ':=^{w}}"]
    row = lambda k, v: lines.append(f"{k:<34}{v:>16}")
    row("Successful requests:", s["completed"])
    row("Failed requests:", s["failed"])
    row("Benchmark duration (s):", f"{s['duration_s']:.2f}")
    row("Total input tokens:", s["total_input_tokens"])
    row("Total generated tokens:", s["total_output_tokens"])
    row("Request throughput (req/s):", f"{s['request_throughput']:.2f}")
    row("Output token throughput (tok/s):", f"{s['output_throughput']:.2f}")
    row("Total token throughput (tok/s):", f"{s['total_token_throughput']:.2f}")
    if s["prefix_hit_rate"] is not None:
        row("Prefix cache hit rate:", f"{100 * s['prefix_hit_rate']:.1f}%")
    for key, name in (
        ("ttft_ms", "Time to First Token"),
        ("tpot_ms", "Time per Output Token (excl. 1st)"),
        ("itl_ms", "Inter-token Latency"),
        ("e2el_ms", "End-to-end Latency"),
    ):
        lines.append(f"{' ' + name + ' ':-^{w}}")
        for stat, v in s[key].items():
            label = "Mean" if stat == "mean" else ("Median" if stat == "p50" else stat.upper())
            row(f"{label} {key.split('_')[0].upper()} (ms):", "-" if v is None else f"{v:.2f}")
    if s.get("spec_draft_tokens"):
        pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"
        lines.append(f"{' Speculative Decoding (MTP) ':-^{w}}")
        row("Draft tokens verified:", s["spec_draft_tokens"])
        row("Draft tokens accepted:", s["spec_accepted_tokens"])
        row("Verify steps:", s["spec_verify_steps"])
        row("Acceptance rate:", pct(s["spec_acceptance_rate"]))
        length = s["spec_mean_acceptance_length"]
        row("Mean acceptance length (tok/step):", "-" if length is None else f"{length:.2f}")
        for j, v in enumerate(s["spec_acceptance_rate_per_position"] or [], 1):
            row(f"Acceptance rate, draft {j}:", pct(v))
    for e in s["errors"]:
        lines.append(f"error: {e}")
    lines.append("=" * w)
    return "\n".join(lines)
