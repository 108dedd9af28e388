"""Prometheus metrics for ``GET /metrics`` (names follow vLLM's, under ``dsv4_``).

Two kinds of source, each read on the thread that owns it:

* per-request events, recorded by the engine thread as requests are admitted, produce
  tokens and finish (counters and the TTFT / inter-token / end-to-end histograms, from the
  engine's own timestamps in ``RequestMetrics``, which the final ``RequestOutput`` carries);
* engine gauges (running / waiting sequences, pool usage, prefix-cache and MTP
  speculative-decoding counters), copied from the snapshot of ``LLMEngine.stats()`` the
  engine thread publishes after its steps, when a scrape arrives. The HTTP side never calls
  into the engine: it is not thread-safe.

Pools: ``blocks`` is the paged compressed state (one logical block covers every layer's
CSA rows, indexer keys and HCA rows for ``block_tokens`` positions), ``slots`` the
per-sequence SWA windows and compressor tails, ``snapshots`` the saved SWA windows of the
``full`` / ``checkpoint`` strategies. With the model's byte accounting, the bytes held in
each compressed pool are exported too (``csa_main``, ``csa_index``, ``hca_main``).

MTP speculative decoding uses vLLM's ``spec_decode_*`` names: ``num_drafts`` counts verify
steps (a sequence's decode step that checked at least one draft), ``num_draft_tokens`` and
``num_accepted_tokens`` the drafts checked and accepted; the ``_per_pos`` series split them by
draft position, numbered from 1 (vLLM's from 0). Unlike vLLM, the drafts checked are counted
per position too: the load-adaptive depth (``EngineConfig.draft_depth``) checks later positions
in fewer steps than the first, so each position's acceptance rate has its own denominator. The
mean acceptance length is tokens emitted per verify step (accepted drafts + 1).

Each server builds its own ``CollectorRegistry``, so several servers in one process (tests)
do not collide.
"""

from __future__ import annotations

import prometheus_client as prom
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "dsv4"
prom.disable_created_metrics()  # no `_created` series: they double the exposition and nobody scrapes them
TTFT_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
)
ITL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
)
E2E_BUCKETS = (
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
)


class ServerMetrics:
    def __init__(self, model_name: str, per_kind_bytes_per_token: dict[str, float] | None = None):
        self.registry = r = prom.CollectorRegistry()
        self.per_kind = per_kind_bytes_per_token or {}
        p = PREFIX
        self.requests = prom.Counter(
            f"{p}_requests", "Finished requests, by finish reason", ["finish_reason"], registry=r
        )
        self.refused = prom.Counter(
            f"{p}_requests_refused", "Requests rejected with an error, by HTTP status", ["status"], registry=r
        )
        self.prompt_tokens = prom.Counter(
            f"{p}_prompt_tokens", "Prompt tokens of admitted requests", registry=r
        )
        self.generation_tokens = prom.Counter(f"{p}_generation_tokens", "Generated tokens", registry=r)
        self.ttft = prom.Histogram(
            f"{p}_time_to_first_token_seconds", "Time to first token", buckets=TTFT_BUCKETS, registry=r
        )
        self.itl = prom.Histogram(
            f"{p}_inter_token_latency_seconds",
            "Time between consecutive output tokens",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = prom.Histogram(
            f"{p}_e2e_request_latency_seconds", "Arrival to finish", buckets=E2E_BUCKETS, registry=r
        )
        self.queue_time = prom.Histogram(
            f"{p}_request_queue_time_seconds", "Arrival to first scheduled", buckets=E2E_BUCKETS, registry=r
        )
        self.engine_errors = prom.Counter(
            f"{p}_engine_errors", "Engine steps that raised (requests failed)", registry=r
        )
        self.info = prom.Info(f"{p}_model", "Served model", registry=r)
        self.info.info({"name": model_name})
        self._source = lambda: ({}, {})
        self.block_tokens = 0
        r.register(_EngineCollector(self))

    def bind(self, source, block_tokens: int) -> None:
        """``source() -> (stats, baseline)``: the engine thread's latest ``engine.stats()``
        snapshot and the counters before the server opened (warm-up traffic is not the users')."""
        self._source, self.block_tokens = source, block_tokens

    # ------------------------------------------------------------------ engine thread
    def on_admit(self, num_prompt_tokens: int) -> None:
        self.prompt_tokens.inc(num_prompt_tokens)

    def on_tokens(self, n: int) -> None:
        if n:
            self.generation_tokens.inc(n)

    def on_finish(self, out) -> None:
        """``out``: the request's final ``RequestOutput`` (its timestamps are complete)."""
        m = out.metrics
        self.requests.labels(out.finish_reason or "unknown").inc()
        if m is None:
            return
        if m.ttft is not None:
            self.ttft.observe(m.ttft)
        for dt in m.inter_token_latencies:
            self.itl.observe(dt)
        if m.e2e is not None:
            self.e2e.observe(m.e2e)
        if m.first_scheduled is not None:
            self.queue_time.observe(max(0.0, m.first_scheduled - m.arrival))

    def exposition(self) -> bytes:
        return prom.generate_latest(self.registry)


class _EngineCollector:
    """Engine gauges and counters, read from the latest stats snapshot at scrape time."""

    def __init__(self, metrics: ServerMetrics):
        self.m = metrics

    def describe(self):
        return []  # no registration-time collect: the engine may not exist yet

    def collect(self):
        stats, base = self.m._source()
        if not stats:
            return
        p = PREFIX
        since = lambda k: stats.get(k, 0) - base.get(k, 0)

        def gauge(name, doc, value, labels=None):
            fam = GaugeMetricFamily(f"{p}_{name}", doc, labels=list(labels or {}))
            fam.add_metric(list((labels or {}).values()), value)
            return fam

        yield gauge("num_requests_running", "Sequences holding a slot", stats["requests_running"])
        yield gauge("num_requests_waiting", "Sequences queued for admission", stats["requests_waiting"])
        # Blocks held by live sequences; blocks kept only by the prefix cache are evictable, so
        # they count as available (vLLM's definition) and are exported on their own.
        used = stats["blocks_total"] - stats["blocks_available"]
        usage = GaugeMetricFamily(
            f"{p}_kv_usage_ratio", "Fraction of each state pool held by live sequences", labels=["pool"]
        )
        usage.add_metric(["blocks"], used / max(1, stats["blocks_total"]))
        usage.add_metric(["slots"], 1 - stats["slots_free"] / max(1, stats["slots_total"]))
        if stats["snapshots_total"]:
            usage.add_metric(["snapshots"], 1 - stats["snapshots_free"] / stats["snapshots_total"])
        yield usage
        if self.m.per_kind and self.m.block_tokens:
            fam = GaugeMetricFamily(
                f"{p}_kv_pool_bytes", "Bytes of each compressed pool held by live sequences", labels=["pool"]
            )
            for kind, per_token in self.m.per_kind.items():
                fam.add_metric([kind], used * self.m.block_tokens * per_token)
            yield fam
        yield gauge(
            "kv_bytes_in_use",
            "Bytes of decode state in use (live sequences and cached prefixes)",
            stats["kv_bytes_in_use"],
        )
        yield gauge(
            "kv_blocks_cached", "Blocks held only by the prefix cache (evictable)", stats["blocks_cached"]
        )
        hits, queries = since("prefix_cache_hit_tokens"), since("prefix_cache_query_tokens")
        yield gauge(
            "prefix_cache_hit_rate",
            "Prompt tokens served from the prefix cache / tokens looked up",
            hits / queries if queries else 0.0,
        )
        for name, doc, value in (
            ("prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache", hits),
            ("prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache", queries),
            (
                "prefix_cache_recompute_tokens",
                "Tokens replayed to rebuild SWA state on hits",
                since("prefix_cache_recompute_tokens"),
            ),
            ("num_preemptions", "Sequences preempted (recomputed later)", since("preemptions")),
            ("engine_steps", "Engine steps run", since("steps")),
        ):
            fam = CounterMetricFamily(f"{p}_{name}", doc)
            fam.add_metric([], value)
            yield fam
        yield from self._speculative(stats, since)

    def _speculative(self, stats, since):
        """MTP speculative decoding, since the server opened: drafts verified and accepted, in
        all and per draft position, and the rates derived from them (0 before any draft)."""
        p = PREFIX
        drafted, accepted = since("spec_draft_tokens"), since("spec_accepted_tokens")
        steps = since("spec_verify_steps")
        for name, doc, value in (
            ("spec_decode_num_drafts", "Verify steps: a sequence's decode steps that checked drafts", steps),
            ("spec_decode_num_draft_tokens", "Draft tokens verified", drafted),
            ("spec_decode_num_accepted_tokens", "Draft tokens accepted", accepted),
        ):
            fam = CounterMetricFamily(f"{p}_{name}", doc)
            fam.add_metric([], value)
            yield fam
        yield GaugeMetricFamily(
            f"{p}_spec_decode_acceptance_rate",
            "Draft tokens accepted / verified",
            value=accepted / drafted if drafted else 0.0,
        )
        yield GaugeMetricFamily(
            f"{p}_spec_decode_mean_acceptance_length",
            "Tokens emitted per verify step (accepted drafts + 1)",
            value=1 + accepted / steps if steps else 0.0,
        )
        # Positions 1..k: the configured depth (the snapshot's), or as many as have counts.
        k = stats.get("speculative_tokens", 0)
        while f"spec_draft_tokens_pos{k + 1}" in stats:
            k += 1
        if not k:
            return
        per_pos = [
            (since(f"spec_draft_tokens_pos{j}"), since(f"spec_accepted_tokens_pos{j}"))
            for j in range(1, k + 1)
        ]
        n_fam = CounterMetricFamily(
            f"{p}_spec_decode_num_draft_tokens_per_pos",
            "Verify steps that checked a draft at this position (1: the first draft of a step)",
            labels=["position"],
        )
        a_fam = CounterMetricFamily(
            f"{p}_spec_decode_num_accepted_tokens_per_pos",
            "Drafts accepted at this position",
            labels=["position"],
        )
        r_fam = GaugeMetricFamily(
            f"{p}_spec_decode_acceptance_rate_per_pos",
            "Drafts accepted / verified at this position",
            labels=["position"],
        )
        for j, (n, a) in enumerate(per_pos, 1):
            n_fam.add_metric([str(j)], n)
            a_fam.add_metric([str(j)], a)
            r_fam.add_metric([str(j)], a / n if n else 0.0)
        yield from (n_fam, a_fam, r_fam)
