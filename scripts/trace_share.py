"""How much of each engine step an XLA executor is busy, read from a ``--profile-dir`` trace.

    python scripts/generate.py ... --profile-dir /tmp/trace --profile-steps 10 --profile-skip-steps 6
    python scripts/trace_share.py /tmp/trace [--json]

What counts as busy: ``dsv4_jax/bench/trace_share.py``.
"""

import sys

from dsv4_jax.bench.trace_share import main

if __name__ == "__main__":
    sys.exit(main())
