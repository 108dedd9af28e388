"""The lockstep protocol of ``engine/runner/lockstep.py`` without devices: process 0's ``LeaderRunner``
and a follower's ``follow`` over an in-memory stand-in for the coordination service's key-value
store, with recording runners. The follower must see every device-touching call, in order,
with the same works, the grammar masks filled on process 0, and the forgotten sequences before
the step that follows them; failures must reach the server once. The real transport and the
jitted steps across two processes are ``test_multihost_serve.py``'s."""

import threading

import jax
import numpy as np
import pytest

from dsv4_jax.engine.runner import lockstep
from dsv4_jax.engine.runner_api import SampleOut, SeqWork, StepPlan
from dsv4_jax.engine.sampling_params import SamplingParams


class FakeStore:
    """The coordination service's key-value calls lockstep makes, in memory, thread-safe."""

    def __init__(self, live=(0, 1)):
        self.data: dict[str, bytes] = {}
        self.cv = threading.Condition()
        self.live = set(live)

    def key_value_set_bytes(self, key, value):
        with self.cv:
            assert key not in self.data, "a message key is written once"
            self.data[key] = value
            self.cv.notify_all()

    def blocking_key_value_get_bytes(self, key, timeout_ms):
        with self.cv:
            if not self.cv.wait_for(lambda: key in self.data, timeout_ms / 1000):
                raise jax.errors.JaxRuntimeError(
                    f"DEADLINE_EXCEEDED: GetKeyValue() timed out with key: {key}"
                )
            return self.data[key]

    def key_value_delete(self, key):
        with self.cv:
            del self.data[key]

    def get_live_nodes(self, ids):
        return {i: 1 for i in ids if i in self.live}


class RecordingRunner:
    """Records the calls a runner gets; constrained works ask ``fill_masks`` for their rows."""

    def __init__(self, fail_on: int | None = None):
        self.calls: list = []
        self.fill_masks = None
        self.limits = "limits"
        self.fail_on = fail_on

    def execute(self, plan):
        if self.fail_on is not None and len(self.calls) == self.fail_on:
            raise RuntimeError("collective failed")
        works = [(w.seq_id, tuple(w.tokens), w.seed, w.sampling.temperature) for w in plan.works]
        cons = [(i, w.constraint) for i, w in enumerate(plan.works) if w.constraint is not None]
        masks = None
        if cons:
            masks = np.full((len(plan.works), 4), -1, np.int32)
            self.fill_masks(cons, masks)
        self.calls.append(("execute", works, None if masks is None else masks.tolist()))
        return {w.seq_id: SampleOut(token=7) for w in plan.works if w.sample}

    def forget(self, seq_id):
        self.calls.append(("forget", seq_id))

    def precompile(self, shapes=None, logprobs=True):
        self.calls.append(("precompile", shapes, logprobs))
        return {"compiled": 0}


class Matcher:
    """Stands in for a request's llguidance constraint on process 0."""

    def __init__(self, word):
        self.word = word

    def fill_mask(self, out):
        out[:] = [self.word, 0, 0, self.word]


def work(seq_id, tokens, constraint=None, **kw):
    return SeqWork(
        seq_id=seq_id, slot=seq_id, block_ids=[seq_id], tokens=tokens, start=0, sample=True,
        sampling=SamplingParams(temperature=0.5), seed=100 + seq_id, constraint=constraint, **kw,
    )  # fmt: skip


def test_follower_replays_process_0s_calls_in_order():
    store = FakeStore()
    leader_runner, follower_runner = RecordingRunner(), RecordingRunner()
    leader = lockstep.LeaderRunner(leader_runner, lockstep.Channel(store, poll_ms=20))
    result = {}
    t = threading.Thread(
        target=lambda: result.update(rc=lockstep.follow(follower_runner, lockstep.Channel(store, poll_ms=20)))
    )
    t.start()
    assert leader.limits == "limits"  # everything else is the wrapped runner's
    leader.precompile(shapes=[(1, 1)], logprobs=False)
    out = leader.execute(StepPlan([work(1, [5, 6, 7]), work(2, [9])]))
    assert out[1].token == 7
    leader.forget(2)
    leader.execute(StepPlan([work(1, [8], constraint=Matcher(3)), work(3, [4, 4], constraint=Matcher(5))]))
    leader.forget(1)
    leader.forget(3)
    leader.execute(StepPlan([work(4, [2])]))
    leader.stop()
    t.join(10)
    assert result == {"rc": 0}
    # process 0's forgets happen at once; a follower's arrive with the next step, before it
    assert follower_runner.calls == [c for c in leader_runner.calls if c[0] != "forget"][:2] + [
        ("forget", 2)
    ] + [leader_runner.calls[3]] + [("forget", 1), ("forget", 3)] + [leader_runner.calls[-1]]
    masks = follower_runner.calls[3][2]
    assert masks == [[3, 0, 0, 3], [5, 0, 0, 5]]  # filled from process 0's matchers
    assert leader.channel.stats.messages == 6  # precompile, 3 steps, one masks message, stop
    assert follower_runner.calls[1][1] == [(1, (5, 6, 7), 101, 0.5), (2, (9,), 102, 0.5)]


def test_old_messages_are_deleted(monkeypatch):
    monkeypatch.setattr(lockstep, "KEEP", 3)
    store = FakeStore()
    ch = lockstep.Channel(store)
    for i in range(5):
        ch.send("x", i)
    ch.flush()
    assert sorted(store.data) == [f"{lockstep.PREFIX}{i}" for i in (2, 3, 4)]


def test_a_failed_step_fails_the_group_once():
    store, reasons = FakeStore(), []
    leader = lockstep.LeaderRunner(
        RecordingRunner(fail_on=1), lockstep.Channel(store), on_failure=reasons.append
    )
    leader.execute(StepPlan([work(1, [1])]))
    with pytest.raises(lockstep.GroupFailed, match="collective failed"):
        leader.execute(StepPlan([work(1, [2])]))
    with pytest.raises(lockstep.GroupFailed):  # nothing runs after that
        leader.execute(StepPlan([work(1, [3])]))
    leader.fail("a second reason")
    assert len(reasons) == 1 and "collective failed" in reasons[0]
    sent = leader.channel.sent
    leader.stop()  # the followers are not told to exit 0: they end with process 0
    assert leader.channel.sent == sent


def test_a_follower_rejects_messages_out_of_order():
    store = FakeStore()
    ch = lockstep.Channel(store)
    ch.send("execute", ([], [work(1, [1], constraint=lockstep.REMOTE_CONSTRAINT)]))
    ch.send("execute", ([], []))  # where the step's masks should be
    with pytest.raises(lockstep.GroupFailed, match="expected grammar masks"):
        lockstep.follow(RecordingRunner(), lockstep.Channel(store, poll_ms=20))


def test_watchdog_reports_a_missing_process_once():
    store, seen = FakeStore(live=(0, 1, 2)), []
    done = threading.Event()
    dog = lockstep.Watchdog(3, lambda r: (seen.append(r), done.set()), interval_s=0.01, client=store).start()
    store.live.discard(2)
    assert done.wait(5)
    dog.stop()
    assert len(seen) == 1 and "[2]" in seen[0]
