"""Build ``checkpoints/demo/``: a tiny DeepSeek-V4 in the exact published format.

    python scripts/make_demo_checkpoint.py [OUT_DIR]      # default: checkpoints/demo

The config, the tokenizer and the writer: ``dsv4_jax/checkpoint/demo.py``.
"""

import sys

from dsv4_jax.checkpoint.demo import main

if __name__ == "__main__":
    sys.exit(main())
