"""Benchmark the Pallas kernels at V4-Flash decode shapes: correctness against the jnp
reference first, then timing, reported against the bytes and FLOPs each kernel must move.

    python scripts/bench_kernels.py                      # GPU: every kernel, B 1/8/64, 8K/128K/1M
    python scripts/bench_kernels.py --kernels indexer --batch 1 --context 1048576
    python scripts/bench_kernels.py --smoke              # CPU: tiny shapes in interpret mode

The must-move formulas and the timing method: ``dsv4_jax/bench/kernels.py`` (also ``--help``).
"""

import sys

from dsv4_jax.bench.kernels import main

if __name__ == "__main__":
    sys.exit(main())
