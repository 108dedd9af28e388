"""The engine loop: ``add_request`` / ``step`` / ``abort`` over a ``ModelRunner``.

``step`` is schedule → ``runner.execute`` → commit → postprocess (nano-vllm's split):

* ``Scheduler.schedule`` picks this step's works (decodes, prefill chunks, admissions);
* the runner runs them and returns one ``SampleOut`` per work that ends its sequence's known
  tokens (``SeqWork.sample``);
* ``Scheduler.commit`` advances the sequences and publishes complete blocks to the prefix
  cache;
* postprocess: each sample is appended, detokenized and checked against the stop conditions
  (EOS unless ``ignore_eos``, ``stop_token_ids``, ``stop`` strings, ``max_tokens``, the
  context limit), and a finished sequence frees its slot and blocks at once. Each request
  that moved gets a ``RequestOutput`` (engine/output.py), the one type every caller reads.

Every request is checked when it arrives (``add_request``): malformed ones and ones that can
never fit (prompt at or past the context limit, state larger than the whole block pool) raise
``RequestRefused`` naming the limit; ones that only have to wait are queued (FCFS).

Step hooks (``add_step_hook``) watch the four phases without touching the engine's objects:
each ``StepHook`` method returns a context manager entered around its phase. The profiler
(engine/runner/profiler.py) names the phases in traces that way.

Token-id conventions (as vLLM): ``token_ids`` include the token that stopped generation
(EOS or a stop token); the text does not include it, nor a matched stop string.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import random
import time

from dsv4_jax.engine.block_manager import BlockManager
from dsv4_jax.engine.detokenizer import IncrementalDetokenizer, StopChecker
from dsv4_jax.engine.output import RequestOutput
from dsv4_jax.engine.prefix_cache import PrefixCache
from dsv4_jax.engine.profiles import EngineConfig
from dsv4_jax.engine.request import (
    FinishReason,
    Request,
    RequestMetrics,
    RequestRefused,
    RequestStatus,
    SamplingParams,
    Sequence,
)
from dsv4_jax.engine.runner_api import ModelRunner, SampleOut, StepPlan
from dsv4_jax.engine.scheduler import Scheduler
from dsv4_jax.intmath import cdiv


class StepHook:
    """Watches the phases of ``LLMEngine.step`` (a profiler, a tracer). Each method returns a
    context manager the engine enters around that phase; override the ones of interest (the
    defaults do nothing). Phases, in order: ``schedule`` (every step), then, when anything was
    scheduled, ``execute(plan)`` (the runner runs ``plan``), ``commit`` (sequences advance,
    complete blocks are published) and ``postprocess`` (samples appended, detokenized,
    checked against the stop conditions; outputs built). Hooks observe; they must not
    change the plan or the engine."""

    def schedule(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def execute(self, plan: StepPlan) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def commit(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def postprocess(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


_PHASES = ("schedule", "execute", "commit", "postprocess")
_NO_HOOKS = contextlib.nullcontext()


@contextlib.contextmanager
def _around(hooks: tuple, phase: str, args: tuple):
    with contextlib.ExitStack() as stack:
        for h in hooks:
            stack.enter_context(getattr(h, phase)(*args))
        yield


class LLMEngine:
    def __init__(
        self,
        runner: ModelRunner,
        config: EngineConfig | None = None,
        tokenizer=None,
        *,
        max_model_len: int | None = None,
    ):
        """``runner``: anything implementing ``runner_api.ModelRunner``; its ``limits`` are the
        pool sizes and budgets. ``config``: strategy and prefix-cache settings (its pool fields
        were used to build the runner). ``max_model_len``: the context limit, further capped
        by ``max_blocks_per_seq · block_tokens``."""
        self.runner = runner
        self.limits = lim = runner.limits
        self.config = config = config or EngineConfig(block_tokens=lim.block_tokens)
        self.tokenizer = tokenizer
        iv = config.snapshot_interval
        if config.enable_prefix_cache and iv is not None:
            if iv % lim.block_tokens:
                raise ValueError(
                    f"snapshot interval {iv} is not a multiple of block_tokens={lim.block_tokens}"
                )
            if lim.num_snapshots == 0:
                raise ValueError(
                    f"swa_strategy={config.swa_strategy!r} keeps SWA snapshots, "
                    f"but the runner was built with num_snapshots=0"
                )
        ctx = lim.max_blocks_per_seq * lim.block_tokens
        self._ctx_parts = [f"max_blocks_per_seq={lim.max_blocks_per_seq} × block_tokens={lim.block_tokens}"]
        if max_model_len is not None and max_model_len < ctx:
            ctx = max_model_len
            self._ctx_parts.append(f"max_model_len={max_model_len}")
        self.max_model_len = ctx
        self.cache = PrefixCache(lim.block_shard) if config.enable_prefix_cache else None
        self.block_manager = BlockManager(lim, self.cache)
        self.scheduler = Scheduler(lim, config, self.block_manager, self.cache, ctx)
        self._requests: dict[str, Request] = {}
        self._seqs: dict[str, Sequence] = {}
        self._pending: list[RequestOutput] = []  # abort notices for the next step
        self._hooks: tuple[StepHook, ...] = ()
        self._ids = itertools.count()  # request ids when the caller gives none
        self._seq_ids = itertools.count()  # FCFS order
        self._rng = random.Random(config.seed)
        self._grammars = None  # constraints.GrammarCompiler, built by the first grammar
        self.num_steps = 0
        self.num_prompt_tokens = 0  # tokens fed as prefill (incl. replays and recomputes)
        self.num_generated_tokens = 0
        # MTP speculative decoding, engine-wide: drafts verified / accepted (and per draft position)
        self.spec_counters = {
            "draft_tokens": 0,
            "accepted_tokens": 0,
            "verify_steps": 0,
            "drafts_per_position": [],
            "accepted_per_position": [],
        }

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        arrival: float | None = None,
    ) -> str:
        """Queue a request; returns its id. Raises ``RequestRefused`` if it can never run.
        ``arrival`` (``time.monotonic()``, default now): when the caller received it, so TTFT
        and queue time include the caller's own wait (the server's submission queue)."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise RequestRefused(f"params must be a SamplingParams, got {type(params).__name__}")
        text = None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestRefused("a text prompt needs a tokenizer; pass token ids instead")
            text, prompt = prompt, self.tokenizer.encode(prompt).ids
        ids = [int(t) for t in prompt]
        V, lim = self.limits.vocab_size, self.limits
        if not ids:
            raise RequestRefused("the prompt is empty")
        if bad := [t for t in ids if not 0 <= t < V]:
            raise RequestRefused(f"prompt token id {bad[0]} is outside the vocabulary [0, {V})")
        if params.stop and self.tokenizer is None:
            raise RequestRefused("stop strings need a tokenizer (use stop_token_ids)")
        if bad := [t for t, _ in params.logit_bias if t >= V]:
            raise RequestRefused(f"logit_bias token id {bad[0]} is outside the vocabulary [0, {V})")
        constraint = self._compile(params.grammar) if params.grammar is not None else None
        if len(ids) >= self.max_model_len:
            raise RequestRefused(
                f"the prompt has {len(ids)} tokens; the context limit is {self.max_model_len} tokens "
                f"({'; '.join(self._ctx_parts)}), and the completion needs at least one position"
            )
        worst = cdiv(min(len(ids) + params.max_tokens, self.max_model_len), lim.block_tokens)
        if (why := self.block_manager.refusal(worst)) is not None:
            raise RequestRefused(
                f"request with {len(ids)} prompt tokens + max_tokens={params.max_tokens} {why}"
            )
        rid = str(next(self._ids)) if request_id is None else str(request_id)
        if rid in self._requests:
            raise RequestRefused(f"request id {rid!r} is already in use")
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        req = Request(
            rid,
            ids,
            params,
            seed,
            prompt=text,
            logprobs=[] if params.logprobs is not None else None,
            metrics=RequestMetrics(time.monotonic() if arrival is None else arrival),
            detokenizer=None if self.tokenizer is None else IncrementalDetokenizer(self.tokenizer),
            stop_checker=StopChecker(params.stop),
            constraint=constraint,
            prompt_logprobs=[None] * len(ids) if params.prompt_logprobs is not None else None,
        )
        seq = Sequence(seq_id=next(self._seq_ids), request=req, tokens=list(ids))
        self._requests[rid], self._seqs[rid] = req, seq
        self.scheduler.add(seq)
        return rid

    def _compile(self, grammar: str):
        """``SamplingParams.grammar`` → a ``Constraint`` (compiled against this engine's tokenizer)."""
        if self.tokenizer is None:
            raise RequestRefused("a grammar needs the engine's tokenizer")
        from dsv4_jax.engine import constraints  # llguidance loads only when a grammar is used

        if self._grammars is None:
            self._grammars = constraints.GrammarCompiler(
                self.tokenizer, self.limits.vocab_size, self.limits.eos_token_id
            )
        try:
            return self._grammars.compile(grammar)
        except constraints.GrammarError as e:
            raise RequestRefused(f"the grammar does not compile: {e}") from None

    def abort(self, request_id: str, error: Exception | None = None) -> bool:
        """Cancel a request: its slot, blocks and queue place are freed now; its final output
        (``finish_reason="abort"``, carrying ``error``: why the caller stopped it, if it says)
        comes with the next step. False if unknown or already finished."""
        seq = self._seqs.get(request_id)
        if seq is None or seq.request.finished:
            return False
        self.scheduler.abort(seq)
        seq.request.error = error
        self._finish(seq, FinishReason.ABORT, free=False)
        self._pending.append(self._output(seq.request))
        return True

    def get_request(self, request_id: str) -> Request:
        """The engine's own state of a request, for reading (tests, stats); callers follow a
        request through its ``RequestOutput``s."""
        return self._requests[request_id]

    def release(self, request_id: str) -> Request:
        """Forget a finished request (the engine otherwise keeps it for ``get_request``)."""
        req = self._requests[request_id]
        if not req.finished:
            raise ValueError(f"request {request_id!r} has not finished")
        del self._requests[request_id], self._seqs[request_id]
        return req

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    # ------------------------------------------------------------------ step hooks
    def add_step_hook(self, hook: StepHook) -> None:
        """Enter ``hook``'s context managers around the phases of every later step (after the
        hooks added before it, so the first hook's context is the outermost)."""
        if missing := [p for p in _PHASES if not callable(getattr(hook, p, None))]:
            raise TypeError(f"a step hook needs the phase methods {missing} (subclass StepHook)")
        self._hooks = (*self._hooks, hook)

    def remove_step_hook(self, hook: StepHook) -> None:
        self._hooks = tuple(h for h in self._hooks if h is not hook)

    @property
    def step_hooks(self) -> tuple[StepHook, ...]:
        return self._hooks

    def _phase(self, phase: str, *args) -> contextlib.AbstractContextManager:
        return _around(self._hooks, phase, args) if self._hooks else _NO_HOOKS

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[RequestOutput]:
        """One engine step; returns an output for every request that produced tokens, finished
        or was aborted since the last step."""
        outputs, self._pending = self._pending, []
        with self._phase("schedule"):
            scheduled = self.scheduler.schedule()
        if not scheduled:
            if self.scheduler.waiting:  # cannot happen with an idle pool: add_request refused what never fits
                raise RuntimeError(f"engine stalled: {self.scheduler.waiting[0].wait_reason}")
            return outputs
        for sc in scheduled:  # a first admission's prefix-cache hit: the request's cached prompt tokens
            if sc.work.fresh and sc.seq.request.num_cached_tokens is None:
                sc.seq.request.num_cached_tokens = sc.seq.cached_until
        plan = StepPlan([sc.work for sc in scheduled])
        with self._phase("execute", plan):
            samples = self.runner.execute(plan)
        now = time.monotonic()
        self.num_steps += 1
        with self._phase("commit"):
            self.scheduler.commit(scheduled)
        with self._phase("postprocess"):
            for sc in scheduled:
                if not sc.decode:
                    self.num_prompt_tokens += len(sc.work.tokens)
                req = sc.seq.request
                if req.prompt_logprobs is not None and (o := samples.get(sc.seq.seq_id)) is not None:
                    self._record_prompt_logprobs(req, o.prompt_logprobs)
                if not sc.work.sample:
                    continue
                if sc.seq.seq_id not in samples:
                    raise RuntimeError(f"the runner returned no sample for sequence {sc.seq.seq_id}")
                if req.sampling.max_tokens == 0:  # scoring only: the prompt is done, nothing to generate
                    self._finish(sc.seq, FinishReason.LENGTH)
                    outputs.append(self._output(req))
                    continue
                out = samples[sc.seq.seq_id]
                self._count_drafts(sc.seq.request, sc.work.num_drafts, len(out.accepted))
                emitted = out.emitted
                for i, o in enumerate(emitted):
                    self._append(sc.seq, o, now)
                    if sc.seq.request.finished:
                        break
                sc.seq.num_new, sc.seq.drafts = i + 1, list(out.drafts)
                outputs.append(self._output(sc.seq.request))
        return outputs

    @staticmethod
    def _record_prompt_logprobs(req: Request, got) -> None:
        """Store a chunk's prompt logprobs by position (a recompute replay's again: kept once)."""
        if got is None:
            return
        first, entries = got
        for p, e in enumerate(entries, start=first):
            if req.prompt_logprobs[p] is None:
                req.prompt_logprobs[p] = e

    def _count_drafts(self, req: Request, drafts: int, accepted: int) -> None:
        """Acceptance counters of a verify step: per request (``RequestMetrics``) and engine-wide."""
        if not drafts:
            return
        m, s = req.metrics, self.spec_counters
        for counts, n in (
            (m.drafts_per_position, drafts),
            (m.accepted_per_position, accepted),
            (s["drafts_per_position"], drafts),
            (s["accepted_per_position"], accepted),
        ):
            counts.extend([0] * (n - len(counts)))
            for j in range(n):
                counts[j] += 1
        m.draft_tokens += drafts
        m.accepted_tokens += accepted
        s["draft_tokens"] += drafts
        s["accepted_tokens"] += accepted
        s["verify_steps"] += 1

    def _append(self, seq: Sequence, out: SampleOut, now: float) -> None:
        req, sp, tok = seq.request, seq.request.sampling, int(out.token)
        eos = tok == self.limits.eos_token_id
        if req.constraint is not None and not eos and not req.constraint.accept(tok):
            raise RuntimeError(f"request {req.request_id}: sampled token {tok} violates its grammar")
        seq.tokens.append(tok)
        req.output_token_ids.append(tok)
        self.num_generated_tokens += 1
        m = req.metrics
        m.token_times.append(now)
        if m.first_token is None:
            m.first_token = now
        if req.logprobs is not None:
            req.logprobs.append((out.logprob, out.top_logprobs))
        reason = None
        if eos and (not sp.ignore_eos or req.constraint is not None):  # a grammar allows EOS only at its end
            reason = FinishReason.STOP
        elif tok in sp.stop_token_ids:
            reason, req.stop_reason = FinishReason.STOP, tok
        elif req.detokenizer is not None:
            old = len(req.output_text)
            req.output_text += req.detokenizer.push(tok)
            if (hit := req.stop_checker.find(req.output_text, old)) is not None:
                req.output_text = req.output_text[: hit[0]]
                reason, req.stop_reason = FinishReason.STOP, hit[1]
        if reason is None and (
            len(req.output_token_ids) >= sp.max_tokens or len(seq.tokens) >= self.max_model_len
        ):
            reason = FinishReason.LENGTH
        if reason is not None:
            if reason is FinishReason.LENGTH and req.detokenizer is not None:
                req.output_text += req.detokenizer.flush()
            self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: FinishReason, free: bool = True) -> None:
        req = seq.request
        if free:
            self.scheduler.finish(seq)
        req.status, req.finish_reason = RequestStatus.FINISHED, reason
        req.metrics.finished = time.monotonic()
        forget = getattr(self.runner, "forget", None)  # optional runner hook: drop per-sequence bookkeeping
        if forget is not None:
            forget(seq.seq_id)

    def _output(self, req: Request) -> RequestOutput:
        """What ``req`` has for its caller since its previous output; advances its cursors."""
        n, out, done = req.num_emitted_tokens, req.output_token_ids, req.finished
        text, req.num_emitted_chars = req.stop_checker.emit(req.output_text, req.num_emitted_chars, done)
        req.num_emitted_tokens = len(out)
        return RequestOutput(
            request_id=req.request_id,
            text=text,
            token_ids=out[n:],
            logprobs=None if req.logprobs is None else req.logprobs[n:],
            finished=done,
            finish_reason=req.finish_reason.value if req.finish_reason else None,
            stop_reason=req.stop_reason,
            num_prompt_tokens=len(req.prompt_token_ids),
            num_output_tokens=len(out),
            num_cached_tokens=req.num_cached_tokens or 0,
            error=req.error,
            metrics=req.metrics,
            prompt_logprobs=req.prompt_logprobs if (out or done) else None,
        )

    # ------------------------------------------------------------------ state and counters
    def reset_prefix_cache(self) -> int:
        """Evict every unused prefix-cache entry; returns how many blocks went back to the free list."""
        return self.block_manager.drop_cached()

    def stats(self) -> dict:
        """Counters (cumulative) and gauges (now), flat, for logs and Prometheus."""
        bm, lim = self.block_manager, self.limits
        s = {
            "steps": self.num_steps,
            "prompt_tokens": self.num_prompt_tokens,
            "generated_tokens": self.num_generated_tokens,
            "preemptions": self.scheduler.num_preemptions,
            "requests_waiting": len(self.scheduler.waiting),
            "requests_running": len(self.scheduler.running),
            "blocks_total": lim.num_blocks,
            "blocks_free": bm.num_free_blocks,
            "blocks_available": bm.num_available_blocks,
            "blocks_cached": len(self.cache) if self.cache else 0,
            "slots_free": bm.num_free_slots,
            "snapshots_free": bm.num_free_snapshots,
            "kv_bytes_in_use": bm.bytes_of(
                lim.num_blocks - bm.num_free_blocks, lim.num_slots - bm.num_free_slots
            ),
        }
        sc = self.spec_counters
        s.update({f"spec_{k}": sc[k] for k in ("draft_tokens", "accepted_tokens", "verify_steps")})
        s["spec_acceptance_rate"] = sc["accepted_tokens"] / sc["draft_tokens"] if sc["draft_tokens"] else 0.0
        s["spec_mean_acceptance_length"] = (
            1 + sc["accepted_tokens"] / sc["verify_steps"] if sc["verify_steps"] else 0.0
        )
        for j, (n, a) in enumerate(zip(sc["drafts_per_position"], sc["accepted_per_position"])):
            s[f"spec_draft_tokens_pos{j + 1}"] = n  # steps that verified a (j+1)-th draft
            s[f"spec_accepted_tokens_pos{j + 1}"] = a
            s[f"spec_acceptance_rate_pos{j + 1}"] = a / n if n else 0.0
        if self.cache is not None:
            c = dataclasses.asdict(self.cache.counters)
            s.update({f"prefix_cache_{k}": v for k, v in c.items()})
            s["prefix_cache_hit_rate"] = c["hit_tokens"] / c["query_tokens"] if c["query_tokens"] else 0.0
        return s
