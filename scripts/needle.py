"""Needle in a haystack through the serving path: can the demo model find one token anywhere?

    python scripts/needle.py [--checkpoint checkpoints/demo] [--json] [--plot needle.png]
    python scripts/needle.py --lengths 1024 --depths 0,0.5 --samples 4 --indexer random --json

The prompts, the runs and the report: ``dsv4_jax/bench/needle.py`` (docs/NEEDLE.md).
"""

import sys

from dsv4_jax.bench.needle import main

if __name__ == "__main__":
    sys.exit(main())
