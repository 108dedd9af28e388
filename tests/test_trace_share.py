"""scripts/trace_share.py (``dsv4_jax.bench.trace_share``) on a hand-made perfetto trace: the
busy time is the union of the executor threads' intervals clipped to each step, host threads do
not count."""

import gzip
import json

import pytest

from dsv4_jax.bench import trace_share


def x(name, tid, ts, dur):
    return {"ph": "X", "name": name, "pid": 1, "tid": tid, "ts": ts, "dur": dur}


EVENTS = [
    {"ph": "M", "name": "thread_name", "pid": 1, "tid": 1, "args": {"name": "generate.py"}},
    {"ph": "M", "name": "thread_name", "pid": 1, "tid": 2, "args": {"name": "tf_XLAEigen/1"}},
    {"ph": "M", "name": "thread_name", "pid": 1, "tid": 3, "args": {"name": "tf_XLAEigen/2"}},
    x("engine_step", 1, 0, 1000),
    x("scheduler.schedule", 1, 0, 100),  # host: not device time
    x("ThunkExecutor::Execute", 2, 100, 500),  # [100, 600)
    x("ThunkExecutor::Execute", 3, 400, 400),  # [400, 800): overlaps the first
    x("engine_step", 1, 2000, 1000),
    x("ThunkExecutor::Execute", 2, 1900, 300),  # [1900, 2200): clipped to [2000, 2200)
    x("ThunkExecutor::Execute", 2, 2500, 100),
]


def test_busy_share_is_the_clipped_union(tmp_path, capsys):
    rows = trace_share.step_shares(EVENTS)
    assert [(r["wall_ms"], r["busy_ms"]) for r in rows] == [(1.0, 0.7), (1.0, 0.3)]
    d = tmp_path / "plugins" / "profile" / "t"
    d.mkdir(parents=True)
    with gzip.open(d / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": EVENTS}, f)
    assert trace_share.main([str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["share"] == pytest.approx(0.5)


def test_a_directory_without_a_trace_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="no perfetto_trace.json.gz"):
        trace_share.main([str(tmp_path)])
