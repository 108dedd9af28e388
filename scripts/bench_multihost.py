"""What multi-host lockstep costs per decode step: one process on 8 fake CPU devices against
two processes on 4 each (process 0 publishing every step, process 1 replaying it).

    python scripts/bench_multihost.py                    # demo, batches 1 and 8, 2 repeats
    python scripts/bench_multihost.py --json-out r.json  # also the numbers as JSON

What it measures and how: ``dsv4_jax/bench/multihost.py``.
"""

import sys

from dsv4_jax.bench.multihost import main

if __name__ == "__main__":
    sys.exit(main())
