"""Benchmark and measurement library the scripts call (thin scripts, logic here).

Every ``scripts/<name>.py`` is a few lines that call a ``main(argv=None)`` here (or in
``checkpoint`` / ``train`` / ``server``), so the tests import the logic as a module instead of
loading a file by path. Modules by role:

* ``checkpoints``  random checkpoints in the published native format, at named sizes
* ``decode``       decode against the memory-bandwidth roofline and the HF port (``bench_decode.py``)
* ``sweep``        per-token decode time against context length (``decode_sweep.py``)
* ``kernels``      the Pallas kernels at V4-Flash decode shapes against must-move bytes (``bench_kernels.py``)
* ``trace_share``  device-busy share of each engine step in a profiler trace (``trace_share.py``)
* ``serving``      the serving benchmark, against a server or in-process (``benchmark.py``)
* ``client``       its load generator, backends and metrics summary
* ``data``         its workloads (random, shared-prefix, trace)
* ``plot``         its PNG (latency vs concurrency, throughput vs context)
* ``needle``       needle-in-a-haystack accuracy through ``LLM`` (``needle.py``)
* ``memory_plan``  bytes per device and capacity for Flash / Pro clusters (``memory_plan.py``)
* ``kv_table``     the KV-state accounting table (``kv_table.py``)
* ``kv_drift``     logit drift of FP8 / FP4 KV storage against bf16 (``kv_format_drift.py``)
* ``load_rss``     peak host memory of checkpoint loading (``measure_load_rss.py``)
* ``numerics``     the numerics report: serving configurations against float32 and the HF port
* ``numerics_cli`` its command line and markdown table (``numerics_report.py``)
* ``hf_port``      the Hugging Face port under our params' names (the oracle)

Elsewhere: ``checkpoint.demo`` (``make_demo_checkpoint.py``), ``checkpoint.convert_cli``
(``convert_checkpoint.py``), ``train.demo`` (``train_demo.py``), ``server.cli`` (``serve.py``),
``dsv4_jax.generate`` (``generate.py``).
"""
