"""`python scripts/benchmark.py`: the serving benchmark (modelled on `vllm bench serve` and
`python -m sglang.bench_serving`; SERVING.md §6).

    python scripts/benchmark.py --base-url http://127.0.0.1:8000 --dataset-name random \\
        --random-input-len 256 --random-output-len 64 --num-prompts 32 --max-concurrency 8
    python scripts/benchmark.py --profile chat --dataset-name shared-prefix --prefix-groups 4 \\
        --prompts-per-group 8 --prefix-len 512 --suffix-len 32 --compare-profiles chat,long-context

The modes and the backends: ``dsv4_jax/bench/serving.py``.
"""

import sys

from dsv4_jax.bench.serving import main

if __name__ == "__main__":
    sys.exit(main())
