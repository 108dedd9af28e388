"""``AsyncEngine``: one thread owns the ``LLMEngine``; asyncio handlers talk to it by queues.

``LLMEngine`` is not thread-safe, and a step is long, blocking device work; running it on the
event loop would stall every connection. So the engine lives on a dedicated thread whose
loop is

1. drain the submission queue (``add`` / ``abort``), blocking only while idle;
2. ``engine.step()``;
3. publish each of the step's ``RequestOutput``s (engine/output.py: the delta, its
   logprobs, the token counts) to its request's ``RequestStream`` (an ``asyncio.Queue`` on
   the server's loop) with ``loop.call_soon_threadsafe``; a finished request is released
   from the engine and its metrics recorded. The handlers read those outputs and nothing
   else: they never see the engine's ``Request``;
4. publish a copy of ``engine.stats()`` for ``/metrics`` (the HTTP side never touches the
   engine).

Failure containment: a refused request (``RequestRefused``: over the context or the pools;
``ValueError`` from its parameters) fails only its own stream, with a 400. An exception
from ``step()`` fails the requests in flight (500, "engine error"), is logged, and the
loop continues. ``fail_group`` (any thread; a multi-host group lost a process, so no step will
return) ends every request, in flight or queued, with the group's 503 and marks the engine
dead without touching it. ``begin_drain`` (graceful shutdown) refuses new requests, lets running
ones finish until the deadline, then aborts the rest with a reason the client is given.
The server's reason for stopping a request is an ``APIError`` passed to
``LLMEngine.abort``, which hands it back on the request's final output (``error``).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time

from absl import logging

from dsv4_jax.engine.llm_engine import LLMEngine
from dsv4_jax.engine.output import RequestOutput
from dsv4_jax.engine.request import RequestRefused
from dsv4_jax.engine.sampling_params import SamplingParams
from dsv4_jax.server.protocol import APIError

STATS_INTERVAL_S = 0.05  # a stats snapshot at most this often while busy


class RequestStream:
    """The handler's end of one request: ``await`` admission, then ``async for`` the engine's
    ``RequestOutput``s (the last has ``finished``; its ``error`` says why the server stopped
    the request, if it did)."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self.loop = loop
        self.admitted: asyncio.Future = loop.create_future()
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.finished = False

    def _post(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _admit(self, exc: BaseException | None) -> None:
        def set_():
            if not self.admitted.done():
                self.admitted.set_exception(exc) if exc else self.admitted.set_result(None)

        self._post(set_)

    def _push(self, o: RequestOutput) -> None:
        self._post(self._queue.put_nowait, o)

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        d = await self._queue.get()
        self.finished = d.finished
        return d


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics=None, profiler=None):
        self.engine = engine
        self.metrics = metrics
        self.profiler = profiler  # dsv4_jax.engine.runner.profiler.StepProfiler or None
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.limits.vocab_size
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, RequestStream] = {}
        self._ids = 0
        self._id_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.draining = False
        self._deadline: float | None = None
        self.dead: BaseException | None = None
        self._failure: APIError | None = None  # fail_group's error
        lim = engine.limits
        self._extra = {
            "slots_total": lim.num_slots,
            "snapshots_total": lim.num_snapshots,
            # MTP draft positions a step can verify (the profile's depth, if the runner drafts)
            "speculative_tokens": min(
                getattr(engine.config, "speculative_tokens", 0), getattr(lim, "max_draft_tokens", 0)
            ),
        }
        self.baseline = self._snapshot()  # warm-up traffic happened before this
        self.stats = dict(self.baseline)
        if metrics is not None:
            metrics.bind(lambda: (self.stats, self.baseline), lim.block_tokens)

    def _snapshot(self) -> dict:
        return {**self.engine.stats(), **self._extra}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> AsyncEngine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="engine", daemon=True)
            self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead is None

    def begin_drain(self, grace_s: float) -> None:
        """Refuse new requests; abort the ones still running ``grace_s`` from now."""
        if not self.draining:
            logging.info("draining: %d request(s) in flight, %.1f s to finish", len(self._streams), grace_s)
        self.draining = True
        deadline = time.monotonic() + grace_s
        self._deadline = deadline if self._deadline is None else min(self._deadline, deadline)
        self._inbox.put(("wake",))

    def stop(self, timeout: float = 10.0) -> None:
        """Abort whatever is left (clients are told the server stopped) and join the thread."""
        self.draining = True
        self._stop.set()
        self._inbox.put(("wake",))
        if self._thread is not None:
            self._thread.join(timeout)

    def fail_group(self, err: APIError) -> None:
        """Any thread: the engine can no longer step (a multi-host group lost a process). Marks
        it dead (``/health`` 503, new requests get ``err``) and ends every request in flight, and
        every one waiting for admission, with ``err``. The engine thread may be blocked inside a
        step for good, so this touches only the streams and the inbox, never the engine."""
        self._failure = err
        self.dead = RuntimeError(err.message)
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item[0] == "add":
                item[1]._admit(err)
        for _ in range(3):  # the engine thread may change the dict meanwhile
            try:
                streams = list(self._streams.items())
                break
            except RuntimeError:
                streams = []
        for rid, s in streams:
            s._push(RequestOutput(rid, finished=True, finish_reason="abort", error=err))

    # ------------------------------------------------------------------ handler side (event loop)
    def new_id(self) -> str:
        with self._id_lock:
            self._ids += 1
            return f"req-{self._ids}"

    async def add(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> RequestStream:
        """Submit a request; returns once the engine admitted it (queued counts), or raises
        ``APIError`` (400 for a refused request, 503 while shutting down)."""
        if self._failure is not None:
            raise self._failure
        if self.draining or not self.alive:
            raise APIError(
                503,
                "The server is shutting down and accepts no new requests.",
                type="server_error",
                code="server_shutting_down",
            )
        s = RequestStream(request_id or self.new_id(), asyncio.get_running_loop())
        self._inbox.put(("add", s, list(prompt_ids), params, time.monotonic()))
        try:
            await s.admitted
        except asyncio.CancelledError:
            self.abort(s.request_id)
            raise
        return s

    def abort(self, request_id: str) -> None:
        """Thread-safe and non-blocking: usable from ``finally`` blocks of cancelled handlers."""
        self._inbox.put(("abort", request_id))

    # ------------------------------------------------------------------ engine thread
    def _main(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - the thread must never die silently
            logging.exception("engine thread died")
            self.dead = e
            self._fail_all(
                APIError(500, f"engine thread died: {e!r}", type="server_error", code="engine_dead")
            )
        finally:
            if self.profiler is not None:
                self.profiler.close()

    def _loop(self) -> None:
        eng = self.engine
        need_step = False
        last_stats = 0.0
        while True:
            busy = need_step or eng.has_unfinished()
            need_step |= self._drain_inbox(block=not busy)
            if self._stop.is_set():
                self._abort_all(
                    APIError(
                        503,
                        "The server stopped before this request finished.",
                        type="server_error",
                        code="server_shutting_down",
                    )
                )
                self._publish(eng.step())
                self.stats = self._snapshot()
                return
            if self._deadline is not None and time.monotonic() >= self._deadline and self._streams:
                self._abort_all(
                    APIError(
                        503,
                        "The server is shutting down; this request was stopped at the "
                        "end of the shutdown grace period.",
                        type="server_error",
                        code="server_shutting_down",
                    )
                )
                need_step = True
            if not (need_step or eng.has_unfinished()):
                self.stats = self._snapshot()
                continue
            need_step = False
            try:
                ctx = self.profiler.step() if self.profiler is not None else contextlib.nullcontext()
                with ctx:
                    outs = eng.step()
            except Exception as e:  # noqa: BLE001 - one failing step must not end the service
                logging.exception("engine step failed; failing the requests in flight")
                if self.metrics is not None:
                    self.metrics.engine_errors.inc()
                self._fail_all(
                    self._failure
                    or APIError(500, f"engine error: {e!r}", type="server_error", code="engine_error")
                )
                continue
            # Snapshot before publishing: a handler that sees its request finish also sees the
            # counters that include it (the benchmark reads prefix-cache counters that way).
            now = time.monotonic()
            if (
                now - last_stats >= STATS_INTERVAL_S
                or not eng.has_unfinished()
                or any(o.finished for o in outs)
            ):
                self.stats, last_stats = self._snapshot(), now
            self._publish(outs)

    def _drain_inbox(self, block: bool) -> bool:
        """Apply queued submissions; returns whether an abort needs a step to be published."""
        need_step = False
        while True:
            try:
                item = self._inbox.get(timeout=0.2) if block else self._inbox.get_nowait()
            except queue.Empty:
                return need_step
            block = False
            if item[0] == "add":
                self._admit(*item[1:])
            elif item[0] == "abort":
                need_step |= self.engine.abort(item[1])

    def _admit(self, s: RequestStream, ids: list[int], params: SamplingParams, submitted: float) -> None:
        try:
            # TTFT from the handler's submission
            rid = self.engine.add_request(ids, params, request_id=s.request_id, arrival=submitted)
        except (RequestRefused, ValueError) as e:
            s._admit(APIError(400, str(e), param="prompt", code=_refusal_code(str(e))))
            return
        except Exception as e:  # noqa: BLE001 - a bad request must not kill the engine thread
            logging.exception("add_request failed")
            s._admit(APIError(500, f"engine error: {e!r}", type="server_error"))
            return
        self._streams[rid] = s
        if self.metrics is not None:
            self.metrics.on_admit(len(ids))
        s._admit(None)

    def _publish(self, outs: list[RequestOutput], record: bool = True) -> None:
        """Hand each output to its stream; release finished requests (and, if ``record``,
        count them in the metrics)."""
        for o in outs:
            s = self._streams.get(o.request_id)
            if s is None:
                continue
            if self.metrics is not None and record:
                self.metrics.on_tokens(len(o.token_ids))
            if o.finished:
                self.engine.release(o.request_id)
                del self._streams[o.request_id]
                if self.metrics is not None and record:
                    self.metrics.on_finish(o)
            s._push(o)

    def _abort_all(self, err: APIError) -> None:
        for rid in list(self._streams):
            self.engine.abort(rid, error=err)

    def _fail_all(self, err: APIError) -> None:
        """After a failed step the engine's state for these requests is suspect: abort them all
        and publish their final outputs (not counted as served requests). Should even that
        fail, each stream still gets a final output carrying the error."""
        outs: list[RequestOutput] = []
        with contextlib.suppress(Exception):
            for rid in self._streams:
                self.engine.abort(rid, error=err)
            outs = self.engine.step()  # nothing left to run: just the abort outputs
        self._publish(outs, record=False)
        for rid, s in self._streams.items():
            with contextlib.suppress(Exception):
                self.engine.abort(rid)
                self.engine.release(rid)
            s._push(RequestOutput(rid, finished=True, finish_reason="abort", error=err))
        self._streams.clear()


def _refusal_code(msg: str) -> str | None:
    return "context_length_exceeded" if "context limit" in msg else None
