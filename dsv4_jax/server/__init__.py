"""The OpenAI-compatible HTTP front end (docs/SERVING.md); HTTP only.

* ``protocol``      OpenAI request schemas (strict), the error shape, response / SSE builders
* ``encoding``      DeepSeek-V4 chat encoding; reasoning / content split of thinking output
* ``engine_thread`` ``AsyncEngine``: the thread that owns ``LLMEngine``, bridged to asyncio
* ``serving``       the completions and chat endpoints (fan-out, streaming, usage)
* ``api_server``    the FastAPI app: routes, API key, error handlers, health, metrics
* ``metrics``       Prometheus metrics (per-request histograms, engine gauges)
* ``cli``           the ``scripts/serve.py`` main: flags, start-up order, shutdown

Flags and start-up shared with generate and benchmark: ``dsv4_jax/launch.py``; the serving
benchmark: ``dsv4_jax/bench/``.

Imports flow scripts → server → engine; nothing here touches device arrays except through
the engine's runner, which only the engine thread drives.
"""
