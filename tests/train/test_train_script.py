"""``scripts/train_demo.py --tiny`` (``dsv4_jax.train.demo``): the training script end to end at
a few steps per phase (both step shapes: dense with the retrieval hint, sparse top-16 with
questions beyond the window; then the MTP phase), then ``--export`` of its saved state gives
the same checkpoint."""

import filecmp
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax.checkpoint import load_checkpoint
from dsv4_jax.train import demo as td


@pytest.mark.slow  # CI time: make test-slow
def test_tiny_run_logs_trains_and_exports(tmp_path):
    out, log, state = tmp_path / "ckpt", tmp_path / "log.jsonl", tmp_path / "state.npz"
    assert td.main(["--tiny", "--out", str(out), "--log", str(log), "--state", str(state)]) == 0
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    recs = [r for r in lines if "step" in r]
    assert [r["step"] for r in recs] == [10, 12]
    assert [r["mtp_step"] for r in lines if "mtp_step" in r] == [4]  # MTP_TINY, logged at its end
    assert {"text", "needle"} == set(lines[-1]["mtp_heldout"])
    assert [r["length"] for r in recs] == [512, 512] and recs[0]["topk"] == 16
    for r in recs:
        assert {"lm", "answer", "kl", "hint", "answer_acc", "gnorm", "loss"} <= set(r)
        assert all(np.isfinite(v) for v in r.values())
    cfg, _ = load_checkpoint(str(out), jnp.float32)
    assert cfg.index_topk == 16  # the shipped config, whatever top-k a phase trained with
    # The saved float params export to the very same files.
    again = tmp_path / "again"
    assert td.main(["--export", str(state), "--out", str(again)]) == 0
    for name in sorted(os.listdir(out)):
        assert filecmp.cmp(out / name, again / name, shallow=False), name


def test_schedule_restarts_the_rate_where_a_phase_names_one():
    phases = [
        td.Phase(100, 1, 256, 16, 0.5),
        td.Phase(100, 1, 512, 16, 0.5),
        td.Phase(40, 1, 1024, 16, 0.5, lr=5e-4),
    ]
    s = lambda k: float(td.schedule(phases, 2e-3)(k))
    assert s(0) == 0.0 and abs(s(50) - 2e-3) < 1e-8  # warmup over min(100, 200 // 4) steps
    assert abs(s(199) - 2e-4) < 1e-6  # cosine to a tenth by the end of the first run of phases
    assert s(200) == 0.0 and abs(s(210) - 5e-4) < 1e-8  # the third phase warms up again to its rate
    assert abs(s(239) - 5e-5) < 3e-6
    assert abs(float(td.schedule(phases[:2], 1e-3)(50)) - 1e-3) < 1e-8  # no restart: one schedule
    # The default curriculum (the shipped checkpoint) ends with restarts at 4K and 8K tokens.
    assert [(p.length, p.lr) for p in td.PHASES[-2:]] == [(4096, 5e-4), (8192, 5e-4)]
