"""scripts/bench_grammar_mask.py (``dsv4_jax.bench.grammar_mask``) on the demo tokenizer at
tiny counts: every grammar drives through its instances, and the JSON has every figure
(xgrammar, which requires torch, is measured only where it is importable)."""

import json
import math

from dsv4_jax.bench import grammar_mask as bench


def test_bench_grammar_mask_demo_writes_json(tmp_path, capsys):
    out = tmp_path / "grammar.json"
    argv = ["--vocab", "demo", "--reps", "2", "--compile-reps", "1", "--batch-reps", "1"]
    assert bench.main([*argv, "--cache-dir", str(tmp_path), "--out", str(out)]) == 0
    assert "| llguidance | demo" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["env"]["cpu_count"] >= 1 and res["env"]["versions"]["llguidance"]
    v = res["vocabs"]["demo"]
    assert v["tokens"] == 1006 and v["n_vocab"] == 1024
    rows = {(r["engine"], r["grammar"]): r for r in res["results"]}
    assert set(rows) == {(e, g) for e in bench.ENGINES for g in bench.GRAMMARS}
    for (engine, grammar), r in rows.items():
        assert r["vocab"] == "demo"
        if not r["installed"]:
            assert engine == "xgrammar", "llguidance is a base dependency"
            continue
        for key in ("tokenizer_setup_ms", "compile_ms", "first_mask_us"):
            assert math.isfinite(r[key]) and r[key] > 0, (engine, grammar, key)
        for key in ("mask_us", "batch_us_per_step", "batch_serial_us_per_step"):
            s = r[key]
            assert s["n"] > 0 and 0 < s["p50"] <= s["p99"] <= s["max"] and s["mean"] > 0, (engine, key)
        assert r["mask_us"]["n"] == sum(r["tokens_per_instance"][:2])
        assert r["batch"] == 8 and all(n > 2 for n in r["tokens_per_instance"])
