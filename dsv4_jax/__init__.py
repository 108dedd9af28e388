"""dsv4-jax: a JAX/XLA serving system for DeepSeek-V4.

Reading order: ``config`` → ``params`` → ``model`` → the layer files (``ops``,
``hyper_connections``, ``attention``, ``compressor``, ``indexer``, ``moe``).
"""

from dsv4_jax.config import Config, ConfigError, preset
from dsv4_jax.model import ModelOptions, forward, forward_streams, mtp_forward
from dsv4_jax.params import init_params, param_infos

__all__ = [
    "Config", "ConfigError", "ModelOptions", "forward", "forward_streams", "init_params",
    "mtp_forward", "param_infos", "preset",
]
