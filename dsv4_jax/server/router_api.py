"""What a replica answers to the router in front of it (docs/SERVING.md "Replicas behind a router").

sglang-router 0.3.2 (``python -m sglang_router.launch_router``, ``scripts/replicas.py``) treats
each ``scripts/serve.py`` as a worker. Observed against a logging stub, it calls:

* ``GET /health`` when a worker registers and every ``--health-check-interval-secs`` (60 s):
  any non-2xx marks the worker unhealthy after ``--health-failure-threshold`` (3) failures. Ours
  answers 200 only on a warm server, 503 while draining (``api_server``);
* ``GET /server_info`` then ``GET /model_info`` once at registration (on 404 it retries the
  older ``/get_server_info`` / ``/get_model_info`` names). The worker's model id is
  ``served_model_name`` (the router's own ``/v1/models`` lists it; it never calls a worker's).
  No ``model_path`` is sent: the router would load a tokenizer from it, from the Hugging Face
  hub when it is not a local directory, and routing does not need one;
* ``GET /get_load`` every 30 s, only under ``--policy power_of_two``: SGLang's shape, one entry
  per data-parallel rank, of which the router sums ``num_tokens``. Ours: one entry;
  ``num_reqs`` running + waiting sequences, ``num_waiting_reqs`` the waiting ones, and
  ``num_tokens`` the positions held by live sequences (their blocks × ``block_tokens``), from the
  engine thread's latest stats snapshot. ``cache_aware`` balances on the router's own count of
  requests in flight per worker and reads none of this;
* the generation endpoints, with the body re-serialized: ``max_tokens`` becomes
  ``max_completion_tokens`` on chat, and SGLang's extensions are added at their defaults
  (``protocol.SGLANG_FIXED``), which the request schemas accept.

These routes sit behind the API key like ``/v1/*`` (the router sends its ``--api-key`` to
every worker call except the registration health check).
"""

from __future__ import annotations

from fastapi import FastAPI

MODEL_TYPE = "deepseek_v4"  # the Hugging Face config's model_type / architectures, as SGLang reports them
ARCHITECTURES = ["DeepseekV4ForCausalLM"]


def add_routes(app: FastAPI, state, dependencies: list) -> None:
    """Register the router-facing routes on ``app`` over ``state`` (``api_server.ServerState``)."""

    def limits():
        return state.engine.engine.limits

    async def model_info() -> dict:
        return {
            "is_generation": True,
            "model_type": MODEL_TYPE,
            "architectures": ARCHITECTURES,
            "served_model_name": state.model_name,
        }

    async def server_info() -> dict:
        lim = limits()
        return {
            "served_model_name": state.model_name,
            "dp_size": 1,  # one scheduler, however many devices: the router sends no dp rank
            "max_model_len": state.max_model_len,
            "max_running_requests": lim.num_slots,
            "max_total_num_tokens": lim.num_blocks * lim.block_tokens,
            "max_prefill_tokens": lim.max_tokens_per_step,
            "block_tokens": lim.block_tokens,
        }

    async def load() -> list[dict]:
        s, lim = state.engine.stats, limits()
        running, waiting = s.get("requests_running", 0), s.get("requests_waiting", 0)
        used = s.get("blocks_total", 0) - s.get("blocks_available", 0)
        return [
            {
                "dp_rank": 0,
                "num_reqs": running + waiting,
                "num_waiting_reqs": waiting,
                "num_tokens": used * lim.block_tokens,
            }
        ]

    for path, fn in (
        ("/model_info", model_info),
        ("/get_model_info", model_info),
        ("/server_info", server_info),
        ("/get_server_info", server_info),
        ("/get_load", load),
    ):
        app.add_api_route(path, fn, methods=["GET"], dependencies=dependencies)
