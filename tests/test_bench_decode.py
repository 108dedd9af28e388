"""scripts/bench_decode.py (``dsv4_jax.bench.decode``) end to end at tiny sizes: builds a
checkpoint in the published format, runs our engine and the HF port on it, and writes valid
JSON with every figure."""

import json
import math

import pytest

from dsv4_jax.bench import decode as bench


@pytest.mark.slow  # CI time (make test must stay under 25 min): in make test-slow
def test_bench_decode_tiny_writes_json(tmp_path, capsys):
    ckpt = bench.build_checkpoint(str(tmp_path / "ckpt"), "tiny")
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    out = tmp_path / "bench.json"
    argv = [
        "--checkpoint",
        ckpt,
        "--batches",
        "1,2",
        "--prompt-len",
        "16",
        "--new-tokens",
        "4",
        "--bandwidth-mib",
        "16",
        "--json",
        "--out",
        str(out),
    ]
    assert bench.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    res = json.loads(out.read_text())
    assert printed == res
    assert res["bandwidth_GBps"] > 0 and res["weight_bytes"]["dense"] > 0
    for b in ("1", "2"):
        e = res["batches"][b]
        for key in ("roofline_tok_s", "jax_fraction_of_roofline", "speedup_decode", "speedup_prefill"):
            assert math.isfinite(e[key]) and e[key] > 0, (b, key)
        assert e["jax"]["decode_tok_s"] > 0 and e["hf"]["decode_tok_s"] > 0
        assert len(e["jax_tokens"][0]) == 4
        assert e["jax"]["compilations"] == 0  # steady state after the warm-up: no retracing
        assert 0 < e["jax"]["in_compiled_step_fraction"] <= 1
    # batch 2 touches more experts than batch 1, so it reads more bytes per step
    assert res["batches"]["2"]["weight_bytes_per_step"] > res["batches"]["1"]["weight_bytes_per_step"]
    for key in ("agreement_held_vs_hf", "agreement_f32_vs_hf"):
        assert res[key]["compared"] == 4
    assert res["held_vs_f32_weights"]["leaves_differing"] == 0  # FP8 / MXFP4 held as bf16 exactly
    assert res["agreement_f32_vs_hf"]["match_fraction"] == 1.0  # same math in float32 (HF_ORACLE.md §8.9)
