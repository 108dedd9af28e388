"""Grammar engines on our vocabularies: schema compile time and next-token mask time per
token (single request and batch-8), for llguidance and, where it is importable, xgrammar.

    python scripts/bench_grammar_mask.py                         # demo and 129k vocabularies
    python scripts/bench_grammar_mask.py --vocab demo --out grammar.json
    PYTHONPATH=. /tmp/xgvenv/bin/python scripts/bench_grammar_mask.py --out grammar.json

xgrammar requires torch, so it is never installed in .venv: measure it from a throwaway
venv (``pip install xgrammar==0.2.8 torch==2.13.0 llguidance==1.9.1``). What it measures
and how: ``dsv4_jax/bench/grammar_mask.py``.
"""

import sys

from dsv4_jax.bench.grammar_mask import main

if __name__ == "__main__":
    sys.exit(main())
