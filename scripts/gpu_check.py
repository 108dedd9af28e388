"""One-call device check: kernels against references, GB/s against copy bandwidth, packed + Pallas
serving against bf16 + references, decode against the roofline (≤ 8 minutes on one GPU).

    python scripts/gpu_check.py --json     # on a GPU: record the table in docs/PERF.md
    python scripts/gpu_check.py --tiny     # CPU: tiny shapes in interpret mode (make test runs it)

What each step does: ``dsv4_jax/bench/gpu_check.py``.
"""

import sys

from dsv4_jax.bench.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
