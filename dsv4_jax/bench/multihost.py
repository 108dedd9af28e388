"""What lockstep across processes costs per step (issue 22; docs/PERF.md "Multi-host lockstep").

    python scripts/bench_multihost.py                    # demo, batches 1 and 8, 2 repeats
    python scripts/bench_multihost.py --json-out r.json  # also the numbers as JSON

The same mesh (``data=2,expert=4``) and engine flags run two ways, alternated:

* one process with 8 fake CPU devices (no group, nothing published);
* two processes with 4 each, joined by ``jax.distributed`` on a loopback coordinator: process 0
  schedules and publishes each step (``engine/runner/lockstep.py``), process 1 replays it.

Each process runs greedy decoding (``ignore_eos``, random prompts) at every batch size after a
warm-up run of the same shapes. Reported per decode step: the step time of each way; on
process 0, the host time to pickle and queue each step's messages (its critical path), the
publishing thread's time per message in the key-value store (off that path), the same write
with the devices idle, and the bytes; and the delivery latency, from process 0 queueing a
message to process 1's read returning (both clocks are this machine's). With decode
lookahead (the default) the next decode step is already running on every device when its plan
is published, so delivery overlaps it. The rest of the difference between the two step times
is the step's own collectives crossing processes (gloo over loopback TCP on XLA:CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

MESH = "data=2,expert=4"


def _args(argv):
    from dsv4_jax import launch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,8")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2, help="alternations of the two ways")
    p.add_argument("--json-out", default=None)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)  # set on the worker processes
    launch.add_model_args(p)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- one process's part
def worker(args) -> int:
    from dsv4_jax import SamplingParams, launch

    llm = launch.build_llm(args)
    group = launch.join_group(llm) if args.coordinator is not None else None
    if group is not None:
        group.channel.trace = []
        if not group.leader:
            rc = group.follow()
            _write(args.worker_out, {"received_at": group.channel.trace})
            return rc
    rng = np.random.default_rng(0)
    vocab = llm.engine.limits.vocab_size
    sp = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        prompts = [rng.integers(2, vocab, args.prompt_len).tolist() for _ in range(b)]
        llm.generate(prompts, sp)  # compiles this batch's shapes
        ch = group.channel if group is not None else None
        m0, s0, r0, n0 = (
            (ch.sent, ch.stats.seconds, ch.stats.rpc_seconds, ch.stats.bytes) if ch else (0, 0, 0, 0)
        )
        outs = llm.generate(prompts, sp)
        first = max(o.metrics.first_token for o in outs)
        last = max(o.metrics.finished for o in outs)
        steps = args.new_tokens - 1
        row = {"batch": b, "step_ms": 1e3 * (last - first) / steps, "tokens": [o.token_ids for o in outs]}
        if ch is not None:
            msgs = [i for i in range(m0, ch.sent)]
            row.update(
                messages=len(msgs),
                publish_us_per_step=1e6 * (ch.stats.seconds - s0) / steps,
                store_us_per_message=1e6 * (ch.stats.rpc_seconds - r0) / max(len(msgs), 1),
                bytes_per_message=(ch.stats.bytes - n0) / max(len(msgs), 1),
                sent_at=[ch.trace[i] for i in msgs],
                first_message=m0,
            )
        rows.append(row)
    idle = None
    if group is not None:
        group.channel.flush()
        idle = _idle_store_us(group.channel.client)
        group.close()
    _write(args.worker_out, {"rows": rows, "idle_store_us": idle})
    return 0


def _idle_store_us(client, n: int = 200) -> float:
    """One key-value store write of a step-sized message with the devices idle (median, µs)."""
    data, times = b"x" * 1024, []
    for i in range(n):
        t0 = time.perf_counter()
        client.key_value_set_bytes(f"dsv4/bench/{i}", data)
        times.append(time.perf_counter() - t0)
        client.key_value_delete(f"dsv4/bench/{i}")
    return 1e6 * float(np.median(times))


def _read(path) -> dict:
    with open(path) as f:
        return json.load(f)


def _write(path, obj) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(obj, f)


# ----------------------------------------------------------------------------- the driver
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
    )


def run_way(nproc: int, passthrough: list[str], tmp: str) -> list[dict]:
    """One measurement: ``nproc`` processes over 8 devices; process 0's rows, with the
    followers' delivery latency folded in."""
    coord = f"127.0.0.1:{_port()}"
    procs, outs = [], []
    for pid in range(nproc):
        out = os.path.join(tmp, f"w{nproc}_{pid}_{time.monotonic_ns()}.json")
        cmd = [
            sys.executable,
            "-m",
            "dsv4_jax.bench.multihost",
            *passthrough,
            "--mesh",
            MESH,
            "--worker-out",
            out,
        ]
        if nproc > 1:
            cmd += ["--coordinator", coord, "--num-processes", str(nproc), "--process-id", str(pid)]
        procs.append(subprocess.Popen(cmd, env=_env(8 // nproc)))
        outs.append(out)
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"a benchmark process exited with {p.returncode}")
    lead = _read(outs[0])
    rows = lead["rows"]
    for r in rows:
        r["idle_store_us"] = lead["idle_store_us"]
    for pid in range(1, nproc):
        got = _read(outs[pid])["received_at"]
        for r in rows:
            lat = [got[r["first_message"] + i] - t for i, t in enumerate(r["sent_at"])]
            r.setdefault("delivery_us", []).extend(1e6 * x for x in lat)
    for r in rows:
        r.pop("sent_at", None)
        if "delivery_us" in r:
            r["delivery_us_median"] = float(np.median(r.pop("delivery_us")))
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _args(argv)
    if args.worker_out is not None:
        return worker(args)
    passthrough = [a for a in argv if a not in ("--json-out", args.json_out)]
    ways = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for n in (1, 2):  # alternated: the machine's drift hits both
                ways[n].append(run_way(n, passthrough, tmp))
    table = []
    for i, b in enumerate(int(x) for x in args.batches.split(",")):
        one = [rep[i] for rep in ways[1]]
        two = [rep[i] for rep in ways[2]]
        same = all(r["tokens"] == one[0]["tokens"] for r in one + two)
        table.append(
            {
                "batch": b,
                "step_ms_1proc": float(np.median([r["step_ms"] for r in one])),
                "step_ms_2proc": float(np.median([r["step_ms"] for r in two])),
                "messages_per_step": float(np.median([r["messages"] for r in two])) / (args.new_tokens - 1),
                "publish_us_per_step": float(np.median([r["publish_us_per_step"] for r in two])),
                "bytes_per_message": float(np.median([r["bytes_per_message"] for r in two])),
                "store_us_per_message": float(np.median([r["store_us_per_message"] for r in two])),
                "idle_store_us": float(np.median([r["idle_store_us"] for r in two])),
                "delivery_us_median": float(np.median([r["delivery_us_median"] for r in two])),
                "same_tokens": same,
            }
        )
    print(
        f"{'batch':>5} {'step ms 1x8':>12} {'step ms 2x4':>12} {'msgs/step':>9} {'host us/step':>12} "
        f"{'store us/msg':>12} {'idle store us':>13} {'B/msg':>6} {'delivery us':>11} {'same tokens':>11}"
    )
    for r in table:
        print(
            f"{r['batch']:>5} {r['step_ms_1proc']:>12.2f} {r['step_ms_2proc']:>12.2f} "
            f"{r['messages_per_step']:>9.2f} {r['publish_us_per_step']:>12.0f} {r['store_us_per_message']:>12.0f} "
            f"{r['idle_store_us']:>13.0f} {r['bytes_per_message']:>6.0f} {r['delivery_us_median']:>11.0f} "
            f"{r['same_tokens']!s:>11}"
        )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(
                {"command": "python scripts/bench_multihost.py " + " ".join(argv), "rows": table}, f, indent=1
            )
    return 0 if all(r["same_tokens"] for r in table) else 1


if __name__ == "__main__":
    sys.exit(main())
