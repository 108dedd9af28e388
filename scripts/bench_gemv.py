"""Decode-sized dots on XLA:CPU: GB/s by weight size, and one routed expert's gate and up held
apart or stacked (why ``moe.split_experts`` stacks them).

    python scripts/bench_gemv.py                 # markdown table
    python scripts/bench_gemv.py --json --out gemv.json

What it measures and how: ``dsv4_jax/bench/gemv.py``.
"""

import sys

from dsv4_jax.bench.gemv import main

if __name__ == "__main__":
    sys.exit(main())
