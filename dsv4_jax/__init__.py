"""dsv4-jax: a JAX/XLA serving system for DeepSeek-V4.

The map of the code is docs/CODE_MAP.md: ``model/`` (the Flax NNX modules, the forward, the
decode state), ``parallel/`` (mesh and rules), ``engine/`` (host-only scheduling) with its
device side in ``engine/runner/``, ``server/`` (HTTP), ``checkpoint/``, ``train/`` and
``bench/``. The serving API is ``LLM`` / ``SamplingParams``.

Every name here is imported on first use, so ``import dsv4_jax.engine`` (host code) does
not pull in jax, and ``from dsv4_jax import Config`` does not pull in the server.
"""

import importlib

_EXPORTS = {
    "LLM": "dsv4_jax.llm",
    "Output": "dsv4_jax.llm",
    "StreamOutput": "dsv4_jax.llm",
    "SamplingParams": "dsv4_jax.engine.sampling_params",
    "Config": "dsv4_jax.config",
    "ConfigError": "dsv4_jax.config",
    "preset": "dsv4_jax.config",
    "ModelOptions": "dsv4_jax.model.transformer",
    "forward": "dsv4_jax.model.transformer",
    "forward_streams": "dsv4_jax.model.transformer",
    "mtp_forward": "dsv4_jax.model.transformer",
    "init_params": "dsv4_jax.model.params",
    "param_infos": "dsv4_jax.model.params",
}

__all__ = [  # noqa: RUF022 - grouped as in _EXPORTS
    "LLM",
    "Output",
    "SamplingParams",
    "Config",
    "ConfigError",
    "preset",
    "ModelOptions",
    "forward",
    "forward_streams",
    "mtp_forward",
    "init_params",
    "param_infos",
]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dsv4_jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
