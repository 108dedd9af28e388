"""`python scripts/serve.py`: the OpenAI-compatible server (not built yet).

Serving needs the checkpoint loader (issue 3), the decode state (issue 4) and the
engine (issue 6) first. Until they land this script says so and exits non-zero
rather than pretending to serve.
"""

import sys

MISSING = [
    "checkpoint loading and the bundled demo checkpoint (checkpoints/demo/)",
    "the incremental decode state (prefill/decode over paged KV state)",
    "the continuous-batching engine and the HTTP server",
]

if __name__ == "__main__":
    print("dsv4-jax: serving is not available in this build. Missing:", file=sys.stderr)
    for m in MISSING:
        print(f"  - {m}", file=sys.stderr)
    sys.exit(2)
