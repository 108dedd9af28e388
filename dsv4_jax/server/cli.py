"""`python scripts/serve.py`: the OpenAI-compatible server (docs/SERVING.md).

With no arguments it serves the bundled demo checkpoint (``checkpoints/demo``) on
http://127.0.0.1:8000 under the model name ``demo``::

    python scripts/serve.py --checkpoint /data/DeepSeek-V4-Flash --profile long-context \\
        --max-model-len 262144 --api-key "$KEY" --port 8000

Start-up order: load the checkpoint and build the engine (``launch.build_llm``), warm the
common step shapes up (``launch.warm_up``), and only then bind the port, so ``/health``
answers 200 only on a warm server. SIGTERM / Ctrl-C: stop accepting connections, let
requests in flight finish for ``--shutdown-timeout`` seconds, then abort the rest (their
clients get an error event saying the server is shutting down), exit 0. A second Ctrl-C
exits at once.

Several hosts (``--coordinator HOST:PORT --num-processes N --process-id I``, the same flags
and checkpoint on every host): every process loads its share of the model over the global
mesh (``--mesh``, default every device of every process, expert parallel); process 0 serves
HTTP and runs the engine, the others replay its steps in lockstep (``engine/runner/lockstep.py``).
If a process dies or hangs (``--heartbeat-timeout``), process 0 fails the requests in flight
with 503, turns ``/health`` unhealthy and exits with status 3 about 2 s later; if process 0
dies the others exit. SIGTERM on process 0 drains as above, then releases the others (exit 0).
"""

from __future__ import annotations

import os

from absl import app, logging
from absl.flags import argparse_flags


def parse_args(argv: list[str]):
    """The flags of ``argv`` (``argv[0]``, the program name, is skipped: absl's ``flags_parser``)."""
    from dsv4_jax import launch

    p = argparse_flags.ArgumentParser(description="OpenAI-compatible DeepSeek-V4 server (dsv4-jax).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("DSV4_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $DSV4_API_KEY)",
    )
    p.add_argument(
        "--served-model-name", default=None, help="model id clients send (default: checkpoint dir name)"
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds requests in flight may run after SIGTERM before they are aborted",
    )
    p.add_argument(
        "--warmup-max-batch", type=int, default=1, help="warm decode/prefill batches 1, 2, 4, ... up to this"
    )
    p.add_argument(
        "--warmup-max-prefill", type=int, default=64, help="warm prefill buckets 8, 16, ... up to this"
    )
    p.add_argument(
        "--warmup-shapes",
        choices=("auto", "all", "common"),
        default="auto",
        help="all: compile every step shape the profile can emit before /health is ready "
        "(LLM.precompile; the persistent compile cache makes restarts quick); common: the "
        "--warmup-max-* requests; auto: all on accelerators, common on CPU",
    )
    p.add_argument(
        "--no-warmup", action="store_true", help="serve at once; every shape compiles on first use"
    )
    p.add_argument("--uvicorn-log-level", default="warning")
    launch.add_model_args(p)
    return p.parse_args(argv[1:])


def serve(args) -> int:
    """Build, warm and serve until SIGTERM / Ctrl-C (the module docstring); 0 once drained."""
    import uvicorn

    from dsv4_jax import launch
    from dsv4_jax.server.api_server import ServerState, build_app
    from dsv4_jax.server.engine_thread import AsyncEngine
    from dsv4_jax.server.metrics import ServerMetrics

    llm = launch.build_llm(args)
    group = launch.join_group(llm) if args.coordinator is not None else None
    if group is not None and not group.leader:
        return group.follow()  # a follower serves nothing: it replays process 0's steps
    engine = llm.engine
    if not args.no_warmup:
        launch.warm_up(llm, args.warmup_shapes, args.warmup_max_batch, args.warmup_max_prefill)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.checkpoint))
    metrics = ServerMetrics(name, launch.per_kind_bytes(llm))
    aengine = AsyncEngine(engine, metrics, launch.make_profiler(args, engine))
    if group is not None:
        group.watch(lambda reason: _group_failed(aengine, reason))
    state = ServerState(aengine, name, metrics, api_key=args.api_key or None)
    config = uvicorn.Config(
        build_app(state),
        host=args.host,
        port=args.port,
        log_level=args.uvicorn_log_level,
        log_config=None,
        timeout_graceful_shutdown=int(args.shutdown_timeout) + 5,
    )

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            aengine.begin_drain(args.shutdown_timeout)
            super().handle_exit(sig, frame)
            # Drained on purpose: exit 0 rather than re-raising the signal after shutdown.
            getattr(self, "_captured_signals", []).clear()

    logging.info(
        "serving %s on http://%s:%d/v1 (max_model_len %d)%s",
        name,
        args.host,
        args.port,
        engine.max_model_len,
        ", API key required" if state.api_key else "",
    )
    print(f"dsv4-jax: serving model '{name}' on http://{args.host}:{args.port}/v1", flush=True)
    Server(config).run()
    aengine.stop()
    if group is not None:
        group.close()  # after the drain: the followers exit 0
    logging.info("server stopped")
    return 0


GROUP_FAILED_EXIT = 3  # exit status when a multi-host group lost a process
GROUP_FAILED_GRACE_S = 2.0  # for the 503s to reach their clients before the exit


def _group_failed(aengine, reason: str) -> None:
    """A process of the multi-host group died, hung or failed a step: the group's decode state
    is gone. Fail every request in flight with a 503, turn /health unhealthy, and exit non-zero
    shortly after so a supervisor restarts the whole group (the engine thread may be blocked in
    a collective for good, so nothing waits for it)."""
    import threading

    from dsv4_jax.server.protocol import APIError

    aengine.fail_group(
        APIError(
            503,
            f"The multi-host serving group lost a process ({reason}); the server is restarting.",
            type="server_error",
            code="group_failed",
        )
    )
    threading.Timer(GROUP_FAILED_GRACE_S, os._exit, (GROUP_FAILED_EXIT,)).start()


def main(argv: list[str] | None = None):
    """``scripts/serve.py``: ``argv`` as ``sys.argv`` (default: the command line); exits."""
    app.run(serve, argv=argv, flags_parser=parse_args)
