"""Pallas kernels for DeepSeek-V4 (compressed sparse attention, indexer top-k, MXFP4
expert matmul), each beside a plain-jnp reference with the same signature.

Imports only jax. The model currently runs on its jnp code paths in ``dsv4_jax``.
"""
