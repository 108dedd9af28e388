"""Print the KV-state accounting table: bytes per token of context per layer kind and in
total, and the fixed per-sequence state, for each preset and storage format.

    python scripts/kv_table.py                 # table for flash, pro, demo
    python scripts/kv_table.py --json          # JSON rows: preset, format, bytes_per_token,
                                               #   per_kind, fixed_bytes_per_seq, ...
    python scripts/kv_table.py --write docs/KV_CACHE.md

The table: ``dsv4_jax/bench/kv_table.py`` over ``dsv4_jax/model/accounting.py``.
"""

import sys

from dsv4_jax.bench.kv_table import main

if __name__ == "__main__":
    sys.exit(main())
