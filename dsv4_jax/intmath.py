"""Integer helpers shared by the host (engine, never jax) and the device side: one of each.

``pallas_kernels`` keeps its own copies in ``_common``: that package imports only jax and
numpy, never ``dsv4_jax``.
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for non-negative ints (blocks that hold ``a`` tokens, tiles that cover ``a`` rows)."""
    return -(-a // b)


def next_pow2(n: int, lo: int = 1) -> int:
    """The smallest power of two ≥ ``n`` and ≥ ``lo``: padded batch and chunk sizes, so the
    number of compiled shapes grows with log2 of the largest."""
    return max(lo, 1 << max(0, n - 1).bit_length())
