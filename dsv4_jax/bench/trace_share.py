"""How much of each engine step an XLA executor is busy, read from a ``--profile-dir`` trace.

    python scripts/generate.py ... --profile-dir /tmp/trace --profile-steps 10 --profile-skip-steps 6
    python scripts/trace_share.py /tmp/trace [--json]

Reads the ``perfetto_trace.json.gz`` that ``jax.profiler`` writes (the newest one under the
directory), takes every ``engine_step`` annotation (``dsv4_jax.engine.runner.profiler.StepProfiler``), and
measures the union of the intervals during which any XLA executor thread (``tf_XLA*``: the
device of the CPU backend; on a GPU pass ``--thread-prefix`` for its stream threads) runs an
event inside the step. ``busy / wall`` per step is the "device time share of a decode step" of
issue 10: what is left is host work (scheduling, metadata, the read-back of sampled tokens) on
the critical path.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os


def _union(intervals: list[tuple[float, float]]) -> float:
    total, cur = 0.0, None
    for a, b in sorted(intervals):
        if cur is None or a > cur[1]:
            if cur is not None:
                total += cur[1] - cur[0]
            cur = [a, b]
        else:
            cur[1] = max(cur[1], b)
    return total + (cur[1] - cur[0] if cur is not None else 0.0)


def step_shares(events: list[dict], thread_prefix: str = "tf_XLA") -> list[dict]:
    """[{wall_ms, busy_ms, share}] for every ``engine_step`` event, in time order."""
    names = {
        (e["pid"], e["tid"]): e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    done = [e for e in events if e.get("ph") == "X"]
    busy = [
        (e["ts"], e["ts"] + e["dur"])
        for e in done
        if names.get((e["pid"], e["tid"]), "").startswith(thread_prefix)
    ]
    out = []
    for s in sorted((e for e in done if e["name"] == "engine_step"), key=lambda e: e["ts"]):
        a, b = s["ts"], s["ts"] + s["dur"]
        u = _union([(max(x, a), min(y, b)) for x, y in busy if y > a and x < b])
        out.append(
            {"wall_ms": s["dur"] / 1e3, "busy_ms": u / 1e3, "share": u / s["dur"] if s["dur"] else 0.0}
        )
    return out


def find_trace(path: str) -> str:
    if os.path.isfile(path):
        return path
    found = sorted(
        glob.glob(os.path.join(path, "**", "perfetto_trace.json.gz"), recursive=True), key=os.path.getmtime
    )
    if not found:
        raise SystemExit(f"{path}: no perfetto_trace.json.gz under it (run with --profile-dir first)")
    return found[-1]


def main(argv: list[str] | None = None) -> int:
    """``scripts/trace_share.py``: ``argv`` without the program name (default: the command line)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", help="a --profile-dir directory or a perfetto_trace.json.gz")
    p.add_argument("--thread-prefix", default="tf_XLA", help="threads that count as the device")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = p.parse_args(argv)
    path = find_trace(args.trace)
    with gzip.open(path) as f:
        data = json.load(f)
    rows = step_shares(data["traceEvents"] if isinstance(data, dict) else data, args.thread_prefix)
    if not rows:
        raise SystemExit(f"{path}: no engine_step events (was the trace taken by StepProfiler?)")
    wall, busy = sum(r["wall_ms"] for r in rows), sum(r["busy_ms"] for r in rows)
    summary = {"trace": path, "steps": rows, "wall_ms": wall, "busy_ms": busy, "share": busy / wall}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{'step':>4} {'wall ms':>9} {'busy ms':>9} {'share':>7}")
    for i, r in enumerate(rows):
        print(f"{i:>4} {r['wall_ms']:>9.2f} {r['busy_ms']:>9.2f} {100 * r['share']:>6.1f}%")
    print(f" all {wall:>9.2f} {busy:>9.2f} {100 * busy / wall:>6.1f}%")
    return 0
