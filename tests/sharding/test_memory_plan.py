"""``scripts/memory_plan.py``: its JSON interface, its arithmetic against the accounting it
builds on, and docs/MEMORY_PLAN.md being its current output (no hand-edited numbers)."""

import json
import math
import os
import subprocess
import sys

import pytest

from dsv4_jax.config import preset
from dsv4_jax.model.accounting import kv_bytes
from dsv4_jax.model.state import KVFormat

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
SCRIPT = os.path.join(ROOT, "scripts", "memory_plan.py")


@pytest.fixture(scope="module")
def plan():
    out = subprocess.run(
        [sys.executable, SCRIPT, "--json"], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout)


def test_weights_match_the_published_checkpoint(plan):
    flash = plan["models"]["flash"]["weights"]
    assert abs(flash["total"] / 1e9 - 159.6) < 0.5  # 46 shards, 159.6 GB (ARCHITECTURE.md §8)
    assert flash["mxfp4"] > 0.9 * flash["total"]  # the routed experts are most of it
    assert plan["models"]["pro"]["weights"]["total"] > 5 * flash["total"]


def test_per_device_numbers_follow_from_the_layout(plan):
    rows = {(p["model"], p["cluster"], p["layout"]): p for p in plan["plans"]}
    assert len(rows) == 2 * 3 * 2
    for (model, cluster, layout), p in rows.items():
        w = plan["models"][model]["weights"]
        n = p["devices"]
        # experts split n ways in both layouts; nothing is split more than n ways
        assert math.isclose(p["weights_per_device"]["mxfp4"], w["mxfp4"] / n, rel_tol=1e-9)
        assert w["total"] / n <= p["weights_per_device"]["total"] <= w["total"]
        assert p["seq_shards"] * p["kv_replication"] == n
        assert p["kv_replication"] == (1 if layout == "dp-attn" else n)
        cfg = preset(model)
        for kv in p["kv"]:
            acc = kv_bytes(cfg, KVFormat.parse(kv["format"]))
            assert kv["bytes_per_token"] == acc.bytes_per_token
            assert kv["fixed_bytes_per_seq"] == acc.fixed_bytes_per_seq + 5 * cfg.vocab_size
            if p["free_per_device"] > 0:
                assert math.isclose(
                    kv["tokens"], p["seq_shards"] * p["free_per_device"] / acc.bytes_per_token
                )
                per_seq = acc.bytes_per_token * 8192 + kv["fixed_bytes_per_seq"]
                assert kv["seqs"]["8K"] == p["seq_shards"] * math.floor(p["free_per_device"] / per_seq)
                assert kv["seqs"]["8K"] >= kv["seqs"]["128K"] >= kv["seqs"]["1M"]
    # Pro's replicated FP8 attention does not fit next to 1/8 of its experts on an H200
    assert rows["pro", "8×H200", "dp-attn"]["free_per_device"] < 0
    assert rows["pro", "8×H200", "tp-attn"]["free_per_device"] > 0


def test_published_figures_are_compared(plan):
    claims = {c["claim"].split(":")[0]: c for c in plan["published"]}
    assert len(plan["published"]) == 5 and all(c["ours"] > 0 for c in plan["published"])
    pro_h200 = claims["Pro FP4 8×H200 SGLang"]
    assert pro_h200["ours_swa_history"] < pro_h200["ours"]  # keeping every SWA row costs capacity


def test_the_document_is_the_scripts_output():
    out = subprocess.run(
        [sys.executable, SCRIPT], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    with open(os.path.join(ROOT, "docs", "MEMORY_PLAN.md")) as f:
        doc = f.read()
    generated = doc.split("<!-- memory_plan.py: begin -->\n")[1].split("<!-- memory_plan.py: end -->")[0]
    assert generated == out, (
        "docs/MEMORY_PLAN.md is stale: rerun scripts/memory_plan.py --write docs/MEMORY_PLAN.md"
    )
