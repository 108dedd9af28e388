"""`python scripts/generate.py`: batch generation from a JSONL file, offline, resumable.

    python scripts/generate.py --input prompts.jsonl --output outputs.jsonl --max-tokens 64

The input and output lines, and resuming: ``dsv4_jax/generate.py``.
"""

import sys

from dsv4_jax.generate import main

if __name__ == "__main__":
    sys.exit(main())
