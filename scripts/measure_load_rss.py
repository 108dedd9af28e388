"""Peak host memory (RSS) of checkpoint loading, for docs/PERF.md ("Checkpoint loading").

    python scripts/measure_load_rss.py [--workdir /tmp/dsv4_rss] [--skip-synthetic]

The cases and the claim under test: ``dsv4_jax/bench/load_rss.py``.
"""

import sys

from dsv4_jax.bench.load_rss import main

if __name__ == "__main__":
    sys.exit(main())
