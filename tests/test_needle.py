"""``scripts/needle.py`` (``dsv4_jax.bench.needle``): needle-in-a-haystack prompts through the
real serving path.

Each prompt goes to ``dsv4_jax.LLM`` twice (cold, then a prefix-cache hit); the report has an
accuracy per pass, context length and depth. Besides the mechanics (prompt construction, the
engine path, prefix hits, the control's checkpoint), the trained demo must retrieve a needle
that lies outside the sliding window (≥ 95 %, cold and on prefix hits), and must lose it when
the lightning indexer is replaced by a random one: the needle is then reachable only if a
random top-16 happens to pick its entry. docs/NEEDLE.md has the full tables (to 16K tokens,
and a few prompts at 32K and 60K).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax.bench import needle
from dsv4_jax.checkpoint import load_checkpoint, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "checkpoints", "demo")


def test_prompts_hide_one_needle_at_each_depth():
    tok = load_tokenizer(DEMO)
    prompts = needle.build_prompts(tok, [512, 1024], [0.0, 1.0], 2, seed=0)
    assert [(p["length"], p["depth"]) for p in prompts] == [
        (512, 0.0),
        (512, 0.0),
        (512, 1.0),
        (512, 1.0),
        (1024, 0.0),
        (1024, 0.0),
        (1024, 1.0),
        (1024, 1.0),
    ]
    for p in prompts:
        toks = p["tokens"]
        assert len(toks) == p["length"]
        assert toks[p["length"] - 1 - p["distance"]] == p["value"]
        assert tok.decode(toks[-12:]).endswith("The secret word is")
    assert prompts[0]["distance"] > 128 > prompts[2]["distance"]
    assert prompts == needle.build_prompts(tok, [512, 1024], [0.0, 1.0], 2, seed=0)


def test_needle_json_through_the_engine_with_prefix_hits(capsys):
    argv = ["--lengths", "512", "--depths", "0,1", "--samples", "2", "--runs", "recompute:fp8-fp4", "--json"]
    assert needle.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    (r,) = report["runs"]
    assert r["name"] == "recompute:fp8-fp4" and report["indexer"] == "trained"
    assert r["prefix_hit_tokens"] >= 4 * 256  # each prompt's second pass hits its first block
    for name in ("cold", "hit"):
        assert set(r[name]) == {"512"} and set(r[name]["512"]) == {"0.0", "1.0"}
        cells = list(r[name]["512"].values())  # 2 samples per cell: 0, 0.5 or 1
        assert set(cells) <= {0.0, 0.5, 1.0} and sum(cells) / len(cells) >= 0.75, cells
    assert r["beyond_window"]["cold"] == r["cold"]["512"]["0.0"]


# Needles 500-1,900 tokens back (depths 0 and 0.5 of 1K and 2K prompts): 20 prompts, each
# sent cold and again as a prefix hit. Every needle is outside the 128-token window.
FAR = ["--lengths", "1024,2048", "--depths", "0,0.5", "--samples", "5", "--batch", "10", "--json"]


def _far_run(capsys, *extra) -> dict:
    assert needle.main(FAR + list(extra)) == 0
    (r,) = json.loads(capsys.readouterr().out)["runs"]
    for p in ("cold", "hit"):  # every length and depth was measured
        assert {n: sorted(d) for n, d in r[p].items()} == {"1024": ["0.0", "0.5"], "2048": ["0.0", "0.5"]}, r[
            p
        ]
    return r


def test_trained_demo_retrieves_beyond_the_window(capsys):
    acc = _far_run(capsys, "--runs", "checkpoint:fp8")["beyond_window"]
    assert acc["cold"] >= 0.95 and acc["hit"] >= 0.95, acc


@pytest.mark.slow  # CI time: make test-slow
def test_random_indexer_control_loses_the_needle(capsys):
    """The same prompts with a random indexer fail the bar above by a margin (measured 0.60 of
    20). A needle in the very first tokens (depth 0) stays partly reachable at 1-2K without the
    indexer's picks (docs/NEEDLE.md: 9 of 10 here); from the middle (depth 0.5) it is not."""
    r = _far_run(capsys, "--runs", "checkpoint:fp8", "--indexer", "random")
    for p in ("cold", "hit"):
        assert r["beyond_window"][p] <= 0.75, r["beyond_window"]
        middle = (r[p]["1024"]["0.5"] + r[p]["2048"]["0.5"]) / 2
        assert middle <= 0.5, r[p]


def test_random_indexer_control_redraws_only_the_indexer(tmp_path):
    needle.random_indexer_checkpoint(DEMO, str(tmp_path), seed=7)
    _, a = load_checkpoint(DEMO, jnp.float32)
    _, b = load_checkpoint(str(tmp_path), jnp.float32)
    for i in range(len(a["layers"])):  # by index: a list of layers, or a mapping keyed 0, 1, ...
        la, lb = a["layers"][i], b["layers"][i]
        ia, ib = la["attn"].pop("indexer", None), lb["attn"].pop("indexer", None)
        assert (ia is None) == (ib is None)
        if ia is not None:
            assert not np.array_equal(ia["wq_b"]["weight"], ib["wq_b"]["weight"]), i
        jax.tree.map(np.testing.assert_array_equal, la, lb)
