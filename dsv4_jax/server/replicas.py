"""`python scripts/replicas.py`: N replicas of `scripts/serve.py` behind sglang-router.

    python scripts/replicas.py --replicas 2 --port 8000 -- --profile chat --max-batch 64
    python scripts/replicas.py --replicas 2 --devices-per-replica 4 -- \\
        --checkpoint /data/DeepSeek-V4-Flash --served-model-name deepseek-v4-flash

Everything after ``--`` goes to every replica's `serve.py` (not ``--host`` / ``--port``: replica
i listens on ``--replica-port + i``). Each replica keeps its own prefix cache; the router
(sglang-router 0.3.2, the ``router`` extra: ``pip install -e ".[router]"``) sends a
conversation back to the replica that served its earlier turns (docs/SERVING.md "Replicas
behind a router" has the equivalent manual commands and how the placement works).

Start-up: the replicas start at once; when every ``/health`` answers 200 (warm), the router
starts; when its ``/readiness`` counts every replica healthy, the router's URL is printed.
Supervision: if any child exits, the others are stopped and this exits non-zero. SIGTERM or
Ctrl-C: the router and the replicas get SIGTERM together; the replicas drain (their
``--shutdown-timeout``), then this exits 0. A second Ctrl-C kills everything at once.

The routing settings (``--cache-threshold``, ``--balance-abs-threshold``,
``--balance-rel-threshold``) are explained where their defaults are set, in ``parse_args``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import httpx

SERVE = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "serve.py"
POLL_S = 0.5


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """``argv`` (without the program name) → (launcher flags, the serve.py flags after ``--``)."""
    own, serve_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(
        prog="replicas.py", description="N dsv4-jax replicas behind sglang-router (cache-aware)."
    )
    p.add_argument("--replicas", type=int, default=2, help="number of serve.py processes")
    p.add_argument("--host", default="127.0.0.1", help="the router's bind address")
    p.add_argument("--port", type=int, default=8000, help="the router's port (what clients use)")
    p.add_argument("--replica-host", default="127.0.0.1", help="the replicas' bind address")
    p.add_argument(
        "--replica-port",
        type=int,
        default=None,
        help="replica 0's port; replica i uses it + i (default --port + 1)",
    )
    p.add_argument(
        "--devices-per-replica",
        type=int,
        default=0,
        help="give replica i GPUs [i*K, (i+1)*K) through CUDA_VISIBLE_DEVICES (0: every replica sees all)",
    )
    p.add_argument(
        "--policy",
        default="cache_aware",
        choices=("cache_aware", "round_robin", "random", "power_of_two"),
        help="the router's policy",
    )
    # cache_aware compares the request's text (chat: the messages' contents joined) with a
    # character tree of what each replica was sent. A match longer than this share of the text
    # goes to that replica; otherwise to the replica with the fewest requests in flight. The
    # router's default, 0.3, loses a conversation whenever the new turn (the previous answer +
    # the new message) is more than ~2.3x the earlier prompt: short questions with long answers
    # do that on turn 2. Our replicas cache the answers too, so any real match is worth keeping;
    # 0.05 still sends texts that share nothing but a few characters to the least-loaded replica.
    p.add_argument("--cache-threshold", type=float, default=0.05, help="see the comment above")
    # Cache affinity gives way to balance when the busiest replica has more than this many requests
    # in flight above the idlest (and the ratio below holds). Default: one replica's slots
    # (server_info max_running_requests), the point where it would queue requests while another
    # has free slots; below that, keeping a conversation where its prefix is costs no waiting.
    p.add_argument(
        "--balance-abs-threshold",
        type=int,
        default=None,
        help="default: the replicas' slots (--max-batch)",
    )
    p.add_argument("--balance-rel-threshold", type=float, default=1.5, help="the router's default")
    p.add_argument("--router-metrics-port", type=int, default=29000, help="the router's own Prometheus port")
    p.add_argument("--router-log-level", default="warn", choices=("debug", "info", "warn", "error"))
    p.add_argument("--router-args", default="", help="more sglang-router flags, one shell-quoted string")
    p.add_argument(
        "--log-dir", default=None, help="write replica-<i>.log and router.log here (default: inherit)"
    )
    p.add_argument("--startup-timeout", type=float, default=1800.0, help="seconds to wait for warm replicas")
    args = p.parse_args(own)
    if args.replicas < 1:
        p.error("--replicas must be at least 1")
    if any(a in ("--host", "--port") or a.startswith(("--host=", "--port=")) for a in serve_args):
        p.error("pass --replica-host / --replica-port, not --host / --port, to the replicas")
    if args.replica_port is None:
        args.replica_port = args.port + 1
    return args, serve_args


def _flag(serve_args: list[str], name: str, default: str | None) -> str | None:
    """The value of ``name`` among the serve.py flags (``--x v`` or ``--x=v``), or ``default``."""
    for i, a in enumerate(serve_args):
        if a == name and i + 1 < len(serve_args):
            return serve_args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return default


def _die_with_parent() -> None:
    """In a child before exec (Linux): SIGTERM when the launcher dies, even by SIGKILL, so no
    replica or router outlives it. Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class Fleet:
    """The child processes, each in its own session (so a signal to this process reaches them
    only as forwarded), killed as a group, and told to stop if this process dies."""

    def __init__(self, log_dir: str | None):
        self.log_dir = pathlib.Path(log_dir) if log_dir else None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        self.children: dict[str, subprocess.Popen] = {}
        self.stop_signal: int | None = None

    def spawn(self, name: str, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
        out = open(self.log_dir / f"{name}.log", "w") if self.log_dir is not None else None  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - the launcher starts no threads
            )
        finally:
            if out is not None:
                out.close()  # the child holds its own descriptor
        self.children[name] = proc
        return proc

    def exited(self) -> tuple[str, int] | None:
        for name, proc in self.children.items():
            if proc.poll() is not None:
                return name, proc.returncode
        return None

    def signal_all(self, sig: int) -> None:
        for proc in self.children.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass

    def stop(self, grace_s: float) -> None:
        """SIGTERM to every child; SIGKILL to what is left after ``grace_s``."""
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(p.poll() is None for p in self.children.values()):
            time.sleep(0.2)
        self.signal_all(signal.SIGKILL)
        for proc in self.children.values():
            proc.wait()

    def on_signal(self, sig, frame) -> None:
        if self.stop_signal is not None:  # the second Ctrl-C: no more waiting
            self.signal_all(signal.SIGKILL)
            os._exit(130)
        self.stop_signal = sig


def _wait(fleet: Fleet, what: str, ready, timeout_s: float) -> str | None:
    """Poll ``ready()`` until true; a reason string if a child exited, a signal came or time ran out."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if fleet.stop_signal is not None:
            return "stopped by a signal"
        if (gone := fleet.exited()) is not None:
            return f"{gone[0]} exited with status {gone[1]} while waiting for {what}"
        if time.monotonic() > deadline:
            return f"{what} not ready after {timeout_s:.0f} s"
        time.sleep(POLL_S)
    return None


def _near(host: str) -> str:
    """An address to reach a server bound to ``host`` from this machine."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _get(url: str, headers: dict) -> httpx.Response | None:
    try:
        return httpx.get(url, headers=headers, timeout=5)
    except httpx.HTTPError:
        return None


def router_command(
    args, urls: list[str], api_key: str | None, abs_threshold: int, grace_s: float
) -> list[str]:
    """sglang-router's command line for ``urls`` under the launcher's flags ``args``."""
    cmd = [
        sys.executable, "-m", "sglang_router.launch_router",
        "--host", args.host, "--port", str(args.port),
        "--worker-urls", *urls,
        "--policy", args.policy,
        "--cache-threshold", str(args.cache_threshold),
        "--balance-abs-threshold", str(abs_threshold),
        "--balance-rel-threshold", str(args.balance_rel_threshold),
        "--prometheus-host", args.host, "--prometheus-port", str(args.router_metrics_port),
        "--shutdown-grace-period-secs", str(int(grace_s)),
        "--log-level", args.router_log_level,
    ]  # fmt: skip
    if api_key:
        cmd += ["--api-key", api_key]  # checked on clients, sent to the replicas
    return cmd + shlex.split(args.router_args)


def run(args, serve_args: list[str]) -> int:
    if importlib.util.find_spec("sglang_router") is None:
        print("replicas.py: sglang-router is not installed: pip install -e '.[router]'", file=sys.stderr)
        return 2
    api_key = _flag(serve_args, "--api-key", os.environ.get("DSV4_API_KEY")) or None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    grace_s = float(_flag(serve_args, "--shutdown-timeout", "30")) + 5
    urls = [f"http://{_near(args.replica_host)}:{args.replica_port + i}" for i in range(args.replicas)]
    fleet = Fleet(args.log_dir)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, fleet.on_signal)
    try:
        for i in range(args.replicas):
            env = dict(os.environ)
            if args.devices_per_replica:
                k = args.devices_per_replica
                env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in range(i * k, (i + 1) * k))
            cmd = [
                sys.executable,
                str(SERVE),
                "--host",
                args.replica_host,
                "--port",
                str(args.replica_port + i),
            ]
            fleet.spawn(f"replica-{i}", cmd + serve_args, env)
        healthy: set[str] = set()

        def replicas_ready() -> bool:
            for u in urls:
                if u not in healthy and (r := _get(u + "/health", {})) is not None and r.status_code == 200:
                    healthy.add(u)
            return len(healthy) == len(urls)

        if (why := _wait(fleet, "the replicas", replicas_ready, args.startup_timeout)) is not None:
            return _fail(fleet, why, grace_s)
        abs_threshold = args.balance_abs_threshold
        if abs_threshold is None:
            r = _get(urls[0] + "/server_info", headers)
            abs_threshold = r.json().get("max_running_requests", 64) if r is not None and r.is_success else 64
        fleet.spawn("router", router_command(args, urls, api_key, abs_threshold, grace_s))

        def router_ready() -> bool:
            r = _get(f"http://{_near(args.host)}:{args.port}/readiness", headers)
            return r is not None and r.is_success and r.json().get("healthy_workers") == len(urls)

        if (why := _wait(fleet, "the router", router_ready, 120)) is not None:
            return _fail(fleet, why, grace_s)
        print(
            f"dsv4-jax: router on http://{args.host}:{args.port}/v1 (policy {args.policy}) over "
            f"{len(urls)} replicas: {' '.join(urls)}",
            flush=True,
        )
        while fleet.stop_signal is None:
            if (gone := fleet.exited()) is not None:
                return _fail(fleet, f"{gone[0]} exited with status {gone[1]}", grace_s, gone[1])
            time.sleep(POLL_S)
        print("replicas.py: stopping the router and draining the replicas", file=sys.stderr, flush=True)
        fleet.stop(grace_s)
        return 0
    finally:
        fleet.stop(0)  # nothing outlives the launcher (a no-op after a clean stop)


def _fail(fleet: Fleet, why: str, grace_s: float, status: int = 1) -> int:
    if fleet.stop_signal is not None and why == "stopped by a signal":
        print("replicas.py: stopped during start-up", file=sys.stderr, flush=True)
        fleet.stop(grace_s)
        return 0
    print(f"replicas.py: {why}; stopping the rest", file=sys.stderr, flush=True)
    fleet.stop(grace_s)
    return status if status > 0 else 128 - status if status < 0 else 1  # killed by signal k: 128 + k


def main(argv: list[str] | None = None) -> int:
    """``scripts/replicas.py``: ``argv`` without the program name (default: the command line)."""
    args, serve_args = parse_args(sys.argv[1:] if argv is None else argv)
    return run(args, serve_args)
