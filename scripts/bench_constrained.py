"""Grammar-constrained decoding against free decoding: decode tok/s at each batch size, same model.

    python scripts/bench_constrained.py                      # demo checkpoint, batch 1 and 8
    python scripts/bench_constrained.py --batch 1,8 --repeats 5 --out constrained.json

What it measures and how: ``dsv4_jax/bench/constrained.py``.
"""

import sys

from dsv4_jax.bench.constrained import main

if __name__ == "__main__":
    sys.exit(main())
