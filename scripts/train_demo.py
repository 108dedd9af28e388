"""Train the bundled demo model: a tiny DeepSeek-V4 that retrieves a needle and writes Python.

    python scripts/train_demo.py [--out checkpoints/demo] [--seed 0] [--log train_log.jsonl]
    python scripts/train_demo.py --tiny --out /tmp/x     # a 2-minute smoke run

The data, the curriculum (``PHASES``) and the export: ``dsv4_jax/train/demo.py``; docs/NEEDLE.md.
"""

import sys

from dsv4_jax.train.demo import main

if __name__ == "__main__":
    sys.exit(main())
