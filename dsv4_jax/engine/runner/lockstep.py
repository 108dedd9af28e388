"""One model over several processes (hosts), in lockstep: process 0 schedules, every process steps.

A jitted step over a mesh that spans processes is one SPMD program: every process must call it,
with the same inputs, in the same order, or the first collective deadlocks. Process 0 runs the
only ``LLMEngine`` (HTTP server, scheduler, block manager, prefix cache, detokenizer); its runner
is a ``LeaderRunner``, which publishes each call it gets before running it. Every other process
builds the same ``JaxModelRunner`` and runs ``follow``: it replays those calls, in order, on its
own devices. The runner's host logic (row layout, lookahead, penalty bookkeeping) is
deterministic given its calls, so the replicas of it stay equal; what is decided on process 0
alone travels with the calls:

* ``execute``: the step plan's works (token ids, positions, block tables, slots, sampling
  parameters, seeds and sample indices, snapshot restores and saves, MTP drafts wanted and
  verified), and the sequences ``forget`` dropped since the previous step;
* ``masks``: the grammar bitmasks of a constrained group, filled on process 0 from its
  llguidance matchers while the forward runs (``JaxModelRunner.fill_masks``);
* ``precompile`` and ``stop``.

Transport: the key-value store of JAX's coordination service (``jax.distributed``), one key
per message, in sequence: no transport of our own, and no device collective for the plan. The
sampled tokens come back inside the step: its outputs are replicated over the mesh, so process 0
reads them from its own devices. With decode lookahead (the default) the next decode step is
already dispatched on every process when its plan is published, so the publish and the
followers' read overlap the device work instead of delaying it (docs/PERF.md "Multi-host
lockstep").

Failure: ``Watchdog`` polls the coordination service's live processes; a follower that exits is
seen within a poll, one that hangs within the heartbeat timeout (``initialize_distributed``).
Either, or a step that raises on process 0, calls the server's ``on_failure`` once (it fails
the requests in flight with 503 and exits non-zero, ``server/cli.py``). When process 0 dies the
coordination service goes with it and JAX terminates the followers.
"""

from __future__ import annotations

import dataclasses
import pickle
import queue
import threading
import time
from collections.abc import Callable

import jax
from absl import logging

from dsv4_jax.engine.runner_api import SampleOut, SeqWork, StepPlan

PREFIX = "dsv4/lockstep/"
KEEP = 4096  # messages kept in the store; a follower is never this far behind (each step syncs it)
REMOTE_CONSTRAINT = "constrained on process 0"  # a work's ``constraint`` on the followers


class GroupFailed(RuntimeError):
    """A process of the lockstep group died, hung or raised: the group's state is lost."""


def kv_client():
    """The coordination service client of ``jax.distributed.initialize`` (JAX keeps it in a
    private module; this is the one place that reaches in)."""
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("multi-process lockstep needs jax.distributed.initialize (--coordinator) first")
    return client


@dataclasses.dataclass
class ChannelStats:
    messages: int = 0
    bytes: int = 0
    seconds: float = 0.0  # process 0: pickling + queueing (its critical path); followers: waiting + reading
    rpc_seconds: float = 0.0  # process 0: the publishing thread's time in the key-value store

    def add(self, n: int, dt: float) -> None:
        self.messages, self.bytes, self.seconds = self.messages + 1, self.bytes + n, self.seconds + dt


class Channel:
    """Ordered messages from process 0 to every other process through the coordination
    service's key-value store: message i is the key ``PREFIX/i``, written once by process 0
    and read by each follower; process 0 deletes it ``KEEP`` messages later.

    ``send`` pickles and queues; one thread publishes in order, so the store's round trip is
    off the caller's path (the engine dispatches its step meanwhile). A publish that fails is
    raised by the next ``send`` or ``flush``."""

    def __init__(self, client=None, poll_ms: int = 1000):
        self.client = kv_client() if client is None else client
        self.poll_ms = poll_ms
        self.sent = self.received = 0
        self.stats = ChannelStats()
        self.trace: list[float] | None = None  # set to [] to record each message's wall time (benchmark)
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def send(self, kind: str, payload=None) -> None:
        if self._error is not None:
            raise GroupFailed(f"publishing to the other processes failed: {self._error!r}")
        t0 = time.perf_counter()
        if self.trace is not None:
            self.trace.append(time.time())
        data = pickle.dumps((kind, payload), protocol=pickle.HIGHEST_PROTOCOL)
        if self._thread is None:
            self._thread = threading.Thread(target=self._publish, name="lockstep-publish", daemon=True)
            self._thread.start()
        self._queue.put((self.sent, data))
        self.sent += 1
        self.stats.add(len(data), time.perf_counter() - t0)

    def flush(self) -> None:
        """Wait until every queued message is in the store."""
        self._queue.join()
        if self._error is not None:
            raise GroupFailed(f"publishing to the other processes failed: {self._error!r}")

    def _publish(self) -> None:
        while True:
            i, data = self._queue.get()
            try:
                if self._error is None:
                    t0 = time.perf_counter()
                    self.client.key_value_set_bytes(f"{PREFIX}{i}", data)
                    if i >= KEEP:
                        self.client.key_value_delete(f"{PREFIX}{i - KEEP}")
                    self.stats.rpc_seconds += time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001 - handed to the engine's thread
                self._error = e
            finally:
                self._queue.task_done()

    def recv(self) -> tuple[str, object]:
        """The next message; waits as long as process 0 is up (an idle server sends nothing)."""
        key = f"{PREFIX}{self.received}"
        t0 = time.perf_counter()
        while True:
            try:
                data = self.client.blocking_key_value_get_bytes(key, self.poll_ms)
                break
            except jax.errors.JaxRuntimeError as e:
                if "DEADLINE_EXCEEDED" not in str(e):
                    raise
                t0 = time.perf_counter()  # idle time is not the channel's cost
        self.received += 1
        self.stats.add(len(data), time.perf_counter() - t0)
        if self.trace is not None:
            self.trace.append(time.time())
        return pickle.loads(data)


def wire(w: SeqWork) -> SeqWork:
    """``w`` as the followers get it: a grammar constraint (process 0's llguidance matcher)
    becomes a marker; its masks follow as their own message."""
    return w if w.constraint is None else dataclasses.replace(w, constraint=REMOTE_CONSTRAINT)


class LeaderRunner:
    """Process 0's runner: publishes every call that touches device state, then runs it.
    Everything else (``limits``, ``slot_shard``, ``params``, ...) is the wrapped runner's."""

    def __init__(self, runner, channel: Channel, on_failure: Callable[[str], None] | None = None):
        self.runner = runner
        self.channel = channel
        self.on_failure = on_failure
        self.failed: str | None = None
        self._forgotten: list[int] = []
        runner.fill_masks = self._fill_masks

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def execute(self, plan: StepPlan) -> dict[int, SampleOut]:
        if self.failed is not None:
            raise GroupFailed(self.failed)
        try:
            self.channel.send("execute", (self._forgotten, [wire(w) for w in plan.works]))
            self._forgotten = []
            return self.runner.execute(plan)
        except Exception as e:
            self.fail(f"a step failed on process 0: {e!r}")
            raise GroupFailed(self.failed) from e

    def forget(self, seq_id: int) -> None:
        self._forgotten.append(seq_id)  # rides on the next step's message
        self.runner.forget(seq_id)

    def precompile(self, *args, **kwargs) -> dict:
        self.channel.send("precompile", (args, kwargs))
        return self.runner.precompile(*args, **kwargs)

    def stop(self) -> None:
        """Release the followers (they exit 0)."""
        if self.failed is None:
            self.channel.send("stop")
            self.channel.flush()

    def fail(self, reason: str) -> None:
        """The group is lost (first reason wins): tell the server once."""
        if self.failed is not None:
            return
        self.failed = reason
        logging.error("lockstep group failed: %s", reason)
        if self.on_failure is not None:
            self.on_failure(reason)

    def _fill_masks(self, cons, allow) -> None:
        from dsv4_jax.engine import constraints

        constraints.fill_masks(cons, allow)
        self.channel.send("masks", allow)


def follow(runner, channel: Channel | None = None) -> int:
    """A follower's whole life: replay process 0's runner calls until it says stop (returns 0).
    Raises if a call fails here: this process's state would no longer match the group's, so it
    must exit (process 0's watchdog then fails the group)."""
    channel = Channel() if channel is None else channel

    def masks(cons, allow) -> None:
        kind, got = channel.recv()
        if kind != "masks":
            raise GroupFailed(f"expected grammar masks from process 0, got {kind!r}")
        allow[...] = got

    runner.fill_masks = masks
    steps = 0
    while True:
        kind, payload = channel.recv()
        if kind == "execute":
            forgotten, works = payload
            for seq_id in forgotten:
                runner.forget(seq_id)
            runner.execute(StepPlan(works))
            steps += 1
        elif kind == "precompile":
            args, kwargs = payload
            runner.precompile(*args, **kwargs)
        elif kind == "stop":
            logging.info("process 0 stopped the group after %d steps", steps)
            return 0
        else:
            raise GroupFailed(f"unexpected lockstep message {kind!r}")


class Watchdog:
    """Polls the coordination service for the group's live processes; calls ``on_dead`` once
    with the missing ones. A process that exits drops out at once; one that hangs (no
    heartbeat) after the heartbeat timeout ``initialize_distributed`` set."""

    def __init__(
        self, num_processes: int, on_dead: Callable[[str], None], interval_s: float = 0.5, client=None
    ):
        self.client = kv_client() if client is None else client
        self.ids = list(range(num_processes))
        self.on_dead = on_dead
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lockstep-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (before the followers are released: their exit is not a failure)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5.0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                live = self.client.get_live_nodes(self.ids)
            except Exception as e:  # noqa: BLE001 - the service itself is gone
                self.on_dead(f"the coordination service stopped answering: {e!r}")
                return
            missing = [i for i in self.ids if i not in live]
            if missing and not self._stop.is_set():
                self.on_dead(f"process(es) {missing} stopped (exited, or no heartbeat within the timeout)")
                return


class Group:
    """This process's part in a lockstep group over ``engine``'s runner (built the same way on
    every process): process 0 swaps in a ``LeaderRunner`` before any step runs (warm-up
    included); the others call ``follow``."""

    def __init__(self, engine):
        self.leader = jax.process_index() == 0
        self.num_processes = jax.process_count()
        self.engine = engine
        self.channel = Channel()
        self.runner: LeaderRunner | None = None
        self._watchdog: Watchdog | None = None
        if self.leader:
            self.runner = engine.runner = LeaderRunner(engine.runner, self.channel)

    def follow(self) -> int:
        logging.info("process %d of %d: following process 0's steps", jax.process_index(), self.num_processes)
        rc = follow(self.engine.runner, self.channel)
        jax.distributed.shutdown()  # disconnect while process 0's service is still up (it waits for this)
        return rc

    def watch(self, on_failure: Callable[[str], None]) -> None:
        """Process 0: call ``on_failure`` once if a process dies or hangs, or a step fails."""
        self.runner.on_failure = on_failure
        self._watchdog = Watchdog(self.num_processes, self.runner.fail).start()

    def close(self, timeout_s: float = 30.0) -> None:
        """Process 0, after its last step: stop watching, release the followers and wait for
        them to disconnect (the service lives in this process; a follower still connected when
        it exits is terminated by JAX instead of exiting 0)."""
        if self._watchdog is not None:
            self._watchdog.stop()
        if self.runner is None or self.runner.failed is not None:
            return
        self.runner.stop()
        client, ids = kv_client(), list(range(self.num_processes))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and len(client.get_live_nodes(ids)) > 1:  # 0 asks (and counts)
            time.sleep(0.05)
