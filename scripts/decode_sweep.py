"""Per-token decode time against context length, in-process through ``dsv4_jax.LLM``.

    python scripts/decode_sweep.py --plot docs/decode_sweep.png --json sweep.json
    python scripts/decode_sweep.py --contexts 1024,2048 --new-tokens 4 --size tiny   # smoke run

The config and the method: ``dsv4_jax/bench/sweep.py``.
"""

import sys

from dsv4_jax.bench.sweep import main

if __name__ == "__main__":
    sys.exit(main())
