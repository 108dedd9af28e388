"""Decode at the memory-bandwidth limit: our ``LLM`` against the HF port on the same weights.

    python scripts/bench_decode.py                       # mid-size checkpoint (built once, cached)
    python scripts/bench_decode.py --json                # the result as JSON on stdout
    python scripts/bench_decode.py --checkpoint DIR      # any checkpoint in the published format
    python scripts/bench_decode.py --size tiny           # seconds-long smoke run (the test uses it)

What it measures and how: ``dsv4_jax/bench/decode.py``.
"""

import sys

from dsv4_jax.bench.decode import main

if __name__ == "__main__":
    sys.exit(main())
