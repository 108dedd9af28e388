"""dsv4-jax: a JAX/XLA serving system for DeepSeek-V4.

Reading order: ``config`` → ``params`` → ``model`` → the layer files (``ops``,
``hyper_connections``, ``attention``, ``compressor``, ``indexer``, ``moe``); the serving
API is ``LLM`` / ``SamplingParams`` (``dsv4_jax/llm.py``, ``dsv4_jax/engine/``).
"""

from dsv4_jax.config import Config, ConfigError, preset
from dsv4_jax.engine.runner_api import SamplingParams
from dsv4_jax.model import ModelOptions, forward, forward_streams, mtp_forward
from dsv4_jax.params import init_params, param_infos

__all__ = [
    "LLM", "Config", "ConfigError", "ModelOptions", "Output", "SamplingParams", "forward", "forward_streams",
    "init_params", "mtp_forward", "param_infos", "preset",
]  # fmt: skip


def __getattr__(name):
    # The serving API is imported on first use, so ``import dsv4_jax`` stays the model only.
    if name in ("LLM", "Output", "StreamOutput"):
        from dsv4_jax import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'dsv4_jax' has no attribute {name!r}")
