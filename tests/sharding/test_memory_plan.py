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
    assert len(rows) == 2 * 6 * 2  # models × (8×H200, 8×B200, 2×8 and 4×8 of each) × layouts
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


# ----------------------------------------------------------------------------- the server's plan
def test_serving_plans_per_profile(plan):
    rows = {(r["model"], r["cluster"], r["profile"], r["context"]): r for r in plan["serving"]}
    assert len(rows) == 2 * 6 * 3 * 2  # Flash, Pro × 8 GPUs and 2×8, 4×8 (H200, B200) × profiles × contexts
    dp = {(p["model"], p["cluster"]): p for p in plan["plans"] if p["layout"] == "dp-attn"}
    for (model, cluster, profile, ctx), r in rows.items():
        if not r["fits"]:
            continue
        p = r["plan"]
        # packed weights, placed by the server's rules: the same bytes as the dp-attn table
        assert p["weights"] == pytest.approx(dp[model, cluster]["weights_per_device"]["total"], rel=1e-9)
        assert p["budget"] == int(0.9 * p["device_bytes"]) - p["weights"] - p["temps"]
        assert p["kv"] <= p["budget"]  # the pools fit the budget they were sized from
        assert 0 < r["seqs"] <= min(p["pools"]["num_slots"], r["seqs_budget_holds"])
    assert rows["flash", "8×B200", "long-context", "1M"]["seqs_budget_holds"] > 200
    assert not rows["pro", "8×H200", "balanced", "128K"]["fits"]  # Pro needs the tp-attn table there
    assert rows["pro", "8×B200", "long-context", "1M"]["fits"]
    # Across hosts (issue 22): the experts split over more GPUs, the KV budget per GPU grows
    weights = {
        c: rows["pro", c, "long-context", "1M"]["plan"]["weights"] for c in ("8×B200", "2×8 B200", "4×8 B200")
    }
    assert weights["8×B200"] > weights["2×8 B200"] > weights["4×8 B200"]
    holds = [
        rows["pro", c, "long-context", "1M"]["seqs_budget_holds"] for c in ("8×B200", "2×8 B200", "4×8 B200")
    ]
    assert holds[0] < holds[1] < holds[2]
    assert rows["pro", "2×8 H200", "long-context", "1M"]["fits"]  # where one H200 node does not


@pytest.mark.parametrize(
    "profile, overrides",
    [("balanced", {}), ("long-context", {"max_model_len": 1 << 20}), ("chat", {"num_snapshots": 12})],
)
def test_plan_equals_what_the_runner_allocates_at_flash_width(profile, overrides):
    """On 8 fake devices (``--mesh auto``), Flash width, packed: the pool arithmetic the server
    sizes with equals the shard shapes of the runner's own initialisers (abstractly), for a
    split store, the one-entry store of ``recompute`` and a store that does not divide 8."""
    import jax

    from dsv4_jax import held, memory
    from dsv4_jax.engine.profiles import make_config
    from dsv4_jax.engine.runner.layout import RunnerLayout, tree_bytes
    from dsv4_jax.model import state as kvc
    from dsv4_jax.parallel.mesh import parse_mesh
    from dsv4_jax.parallel.rules import DEFAULT_RULES, Layout

    cfg = preset("flash")
    lay = Layout.create(parse_mesh("auto"), DEFAULT_RULES)
    params = memory.abstract_weights(cfg, held.resolve(backend="gpu"))
    ec = make_config(profile, kv_format="fp8-fp4", **overrides)
    p = memory.plan(cfg, ec, params, layout=lay, backend="gpu", device_bytes=180 * 10**9)
    pools = p.pools
    cc = kvc.CacheConfig(
        num_slots=pools.num_slots,
        num_blocks=pools.num_blocks,
        max_blocks_per_seq=pools.max_blocks_per_seq,
        block_tokens=ec.block_tokens,
        fmt=kvc.KVFormat.parse(ec.kv_format),
        mtp_layers=1 if ec.speculative_tokens else 0,  # the profile drafts on GPU: MTP windows per slot
    )
    placement = RunnerLayout(cfg, cc, lay, pools.num_snapshots)
    assert memory.allocated(placement) == p.kv <= p.budget
    placed = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        params,
        lay.param_shardings(params, cfg),
    )
    assert tree_bytes(placed) == p.weights
    assert 25e9 < p.weights < 30e9  # Flash packed, experts split 8 ways (docs/MEMORY_PLAN.md)


def test_plan_equals_what_llm_allocates_on_the_demo():
    """``LLM(demo)`` on CPU and on 8 fake devices: the plan it sized its pools with is what its
    runner holds, measured on the live arrays."""
    from dsv4_jax import LLM
    from dsv4_jax.launch import DEMO_CHECKPOINT
    from dsv4_jax.parallel.mesh import parse_mesh

    for mesh, kw in ((None, {}), (parse_mesh("auto"), {"num_snapshots": 12})):
        llm = LLM(DEMO_CHECKPOINT, mesh=mesh, **kw)
        held = llm.engine.runner.held_bytes()
        assert held == {"weights": llm.memory.weights, "kv": llm.memory.kv}, (mesh, held, llm.memory)
        assert llm.memory.kv <= llm.memory.budget
