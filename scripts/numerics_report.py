"""Numerics report: each serving configuration's drift from float32, beside the HF port's bf16.

    python scripts/numerics_report.py                      # markdown table (docs/PERF.md)
    python scripts/numerics_report.py --json > numerics.json
    python scripts/numerics_report.py --checkpoints demo,narrow:1 --prompts 16 --configs all

Flags: ``dsv4_jax/bench/numerics_cli.py`` (also ``--help``); what each figure means:
``dsv4_jax/bench/numerics.py``.
"""

import sys

from dsv4_jax.bench.numerics_cli import main

if __name__ == "__main__":
    sys.exit(main())
