"""`python scripts/serve.py`: the OpenAI-compatible server (docs/SERVING.md).

With no arguments it serves the bundled demo checkpoint (``checkpoints/demo``) on
http://127.0.0.1:8000 under the model name ``demo``::

    python scripts/serve.py --checkpoint /data/DeepSeek-V4-Flash --profile long-context \\
        --max-model-len 262144 --api-key "$KEY" --port 8000

Start-up order and shutdown: ``dsv4_jax/server/cli.py``.
"""

import sys

from dsv4_jax.server.cli import main

if __name__ == "__main__":
    sys.exit(main())
