"""Convert a native DeepSeek-V4 safetensors directory into an orbax checkpoint.

    python scripts/convert_checkpoint.py SRC_DIR DST_DIR [--storage packed|bfloat16|float32]
                                         [--mesh expert=2,tensor=4] [--max-chunks N]

Restartable; the options: ``dsv4_jax/checkpoint/convert_cli.py``.
"""

import sys

from dsv4_jax.checkpoint.convert_cli import main

if __name__ == "__main__":
    sys.exit(main())
