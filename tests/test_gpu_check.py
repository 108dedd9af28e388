"""``scripts/gpu_check.py`` in its tiny mode (CPU, interpret mode): every step runs, the JSON has
what docs/PERF.md records, and float32 packed + Pallas serving equals the reference path."""

import json

import pytest

from dsv4_jax.bench import gpu_check


@pytest.mark.slow  # CI time (make test must stay under 25 min): in make test-slow
def test_gpu_check_tiny_runs_every_step(capsys):
    assert gpu_check.main(["--tiny", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["tiny"] and res["ok"]
    assert [r["kernel"] for r in res["kernels"]] == ["attention_csa", "attention_hca", "indexer", "moe"]
    assert all(r["ok"] for r in res["kernels"]) and res["copy_bandwidth_GBps"] > 0
    runs = res["engine"]["against_f32"]
    assert set(runs) == {"f32+reference", "packed+pallas f32"} and all(
        c["equal"] for c in runs["packed+pallas f32"]
    )
    assert "packed" in res["engine"]["held"] and "pallas" in res["engine"]["held"]
    (d,) = res["engine"]["decode"]
    assert d["batch"] == 1 and d["decode_tok_s"] > 0 and 0 < d["roofline_fraction"]
