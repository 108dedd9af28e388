"""`python scripts/replicas.py`: N replicas of `scripts/serve.py`, each with its own prefix cache,
behind sglang-router's cache-aware policy (docs/SERVING.md "Replicas behind a router").

    pip install -e ".[router]"
    python scripts/replicas.py --replicas 2 --port 8000 -- --profile chat
    python scripts/replicas.py --replicas 2 --devices-per-replica 4 --host 0.0.0.0 -- \\
        --checkpoint /data/DeepSeek-V4-Flash --served-model-name deepseek-v4-flash --api-key "$KEY"

Flags after ``--`` go to every replica's serve.py. Start-up, supervision and shutdown:
``dsv4_jax/server/replicas.py``.
"""

import sys

from dsv4_jax.server.replicas import main

if __name__ == "__main__":
    sys.exit(main())
