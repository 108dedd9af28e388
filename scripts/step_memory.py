"""Step temporaries at max_model_len 64K and 1M (Flash width, abstract inputs, no weights).

    python scripts/step_memory.py            # table
    python scripts/step_memory.py --json     # {"rows": [{"kind", "max_model_len", "temp_bytes", ...}]}

What is compiled and why: ``dsv4_jax/bench/step_memory.py``.
"""

import sys

from dsv4_jax.bench.step_memory import main

if __name__ == "__main__":
    sys.exit(main())
