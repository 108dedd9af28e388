"""The serving engine (docs/ENGINE.md). Host code, one role per file, none of it imports jax
except ``model_runner.py``, which this package does not import (``LLM`` does, lazily):

* ``runner_api``    the contract with the device-side model runner (StepPlan / SeqWork / limits)
* ``request``       Request (what the user sees) and Sequence (the scheduler's state)
* ``prefix_cache``  content-addressed block keys, cache entries, LRU of evictable blocks
* ``block_manager`` block / slot / snapshot pools, refcounts, byte-exact admission
* ``scheduler``     continuous batching, chunked prefill, prefix hits per SWA strategy, preemption
* ``detokenizer``   incremental detokenization, stop strings
* ``llm_engine``    add_request / step / abort; stop conditions; stats()
* ``profiles``      EngineConfig, the named endpoint profiles, pool sizing, CLI flags
* ``lookahead``     which decode step the runner may dispatch before the engine asks for it
"""

from dsv4_jax.engine.llm_engine import LLMEngine, RequestOutput
from dsv4_jax.engine.profiles import PROFILES, EngineConfig, make_config
from dsv4_jax.engine.request import RequestRefused
from dsv4_jax.engine.runner_api import SamplingParams

__all__ = [
    "PROFILES",
    "EngineConfig",
    "LLMEngine",
    "RequestOutput",
    "RequestRefused",
    "SamplingParams",
    "make_config",
]
