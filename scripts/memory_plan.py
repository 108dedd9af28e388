"""Memory plan: bytes per device for weights and KV state, and the resulting capacity, for
DeepSeek-V4 Flash and Pro on one node of 8 H200 or B200, and on 2×8 and 4×8 across hosts
(docs/MEMORY_PLAN.md).

    python scripts/memory_plan.py                  # tables
    python scripts/memory_plan.py --json           # the same numbers as JSON
    python scripts/memory_plan.py --write docs/MEMORY_PLAN.md

How each figure is derived: ``dsv4_jax/bench/memory_plan.py``.
"""

import sys

from dsv4_jax.bench.memory_plan import main

if __name__ == "__main__":
    sys.exit(main())
