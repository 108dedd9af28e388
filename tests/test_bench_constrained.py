"""``scripts/bench_constrained.py`` runs end to end (tiny sizes) and reports every row."""

import json

from dsv4_jax.bench.constrained import run


def test_bench_constrained_reports_each_mode_and_batch(tmp_path):
    out = tmp_path / "c.json"
    res = run(["--batch", "1", "--tokens", "6", "--repeats", "1", "--modes", "free,regex", "--out", str(out)])
    rows = {(r["mode"], r["batch"]): r for r in res["rows"]}
    assert set(rows) == {("free", 1), ("regex", 1)}
    for r in rows.values():
        assert r["decode_tok_s"] > 0 and r["tokens_per_run"] == 5 * r["batch"]  # EOS banned: full length
    assert json.loads(out.read_text())["rows"][0]["mode"] == "free"
