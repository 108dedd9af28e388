"""The serving front end (docs/SERVING.md): OpenAI-compatible HTTP, batch generation, benchmark.

* ``protocol``      OpenAI request schemas (strict), the error shape, response / SSE builders
* ``encoding``      DeepSeek-V4 chat encoding; reasoning / content split of thinking output
* ``engine_thread`` ``AsyncEngine``: the thread that owns ``LLMEngine``, bridged to asyncio
* ``serving``       the completions and chat endpoints (fan-out, streaming, usage)
* ``api_server``    the FastAPI app: routes, API key, error handlers, health, metrics
* ``metrics``       Prometheus metrics (per-request histograms, engine gauges)
* ``launch``        flags and start-up shared by scripts/serve.py, generate.py, benchmark.py
* ``bench_data`` / ``bench_client`` / ``bench_plot``   the serving benchmark's parts

Imports flow scripts → server → engine; nothing here touches device arrays except through
the engine's runner, which only the engine thread drives.
"""
