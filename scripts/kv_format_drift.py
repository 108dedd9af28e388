"""Accuracy cost of quantized KV storage: logit drift of FP8 / FP8+FP4 state against dense
storage, on the demo checkpoint and the tiny configs.

    python scripts/kv_format_drift.py              # table
    python scripts/kv_format_drift.py --json out.json

The method: ``dsv4_jax/bench/kv_drift.py``.
"""

import sys

from dsv4_jax.bench.kv_drift import main

if __name__ == "__main__":
    sys.exit(main())
