"""The serving engine (docs/ENGINE.md). Host code, one role per file, none of it imports jax
except the device side in ``runner/``, which this package does not import (``LLM`` does, lazily):

* ``runner_api``    the contract with the device-side model runner (StepPlan / SeqWork / limits)
* ``request``       Request (what the user sees) and Sequence (the scheduler's state)
* ``prefix_cache``  content-addressed block keys, cache entries, LRU of evictable blocks
* ``block_manager`` block / slot / snapshot pools, refcounts, byte-exact admission
* ``scheduler``     continuous batching, chunked prefill, prefix hits per SWA strategy, preemption
* ``detokenizer``   incremental detokenization, stop strings
* ``output``        RequestOutput: what a step hands out per request (the only output type)
* ``llm_engine``    add_request / step / abort; stop conditions; step hooks; stats()
* ``profiles``      EngineConfig, the named endpoint profiles, pool sizing, CLI flags
* ``runner/``       the device side: JaxModelRunner, sampling, decode lookahead, profiler
"""

from dsv4_jax.engine.llm_engine import LLMEngine, StepHook
from dsv4_jax.engine.output import RequestOutput
from dsv4_jax.engine.profiles import PROFILES, EngineConfig, make_config
from dsv4_jax.engine.request import RequestRefused
from dsv4_jax.engine.sampling_params import SamplingParams

__all__ = [
    "PROFILES",
    "EngineConfig",
    "LLMEngine",
    "RequestOutput",
    "RequestRefused",
    "SamplingParams",
    "StepHook",
    "make_config",
]
