"""Two processes on loopback, 4 fake CPU devices each, one global mesh: the forward equals
the single-process forward, and the model runner (state split across the two processes,
experts all-to-all between them) samples the same greedy tokens as on one device: the
multi-host path of README "Multi-host", on one machine.

Bounded: both processes get ``TIMEOUT_S`` in all and are killed (by their own pids) if
they overrun; the coordinator port is a free loopback port chosen here.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # CI time: make test-slow
def test_two_process_forward_matches_one_process(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=4").strip()
    port = free_port()
    logs = [
        tmp_path / f"log_{i}.txt" for i in range(2)
    ]  # files, not pipes: a full pipe would stall a process
    procs = []
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for i in range(2):
            with open(logs[i], "w") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, WORKER, str(i), "2", str(port), str(tmp_path)],
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{logs[i].read_text()[-3000:]}"
    for i in range(2):
        with open(tmp_path / f"result_{i}.json") as f:
            r = json.load(f)
        assert (r["process_count"], r["devices"], r["local_devices"], r["local_shards"]) == (2, 8, 4, 4)
        assert r["max_err"] <= r["tol"], r
        assert r["argmax_equal"], r
        assert r["tokens"]["mesh"] == r["tokens"]["one"], r["tokens"]  # the model runner across processes
