"""``scripts/train_demo.py --tiny``: the training script end to end at a few steps per phase
(both step shapes: dense with the retrieval hint, sparse top-16 with questions beyond the
window), then ``--export`` of its saved state gives the same checkpoint."""

import filecmp
import importlib
import json
import os
import sys

import jax.numpy as jnp
import numpy as np

from dsv4_jax.checkpoint import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _script():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    return importlib.import_module("train_demo")


def test_tiny_run_logs_trains_and_exports(tmp_path):
    td = _script()
    out, log, state = tmp_path / "ckpt", tmp_path / "log.jsonl", tmp_path / "state.npz"
    assert td.main(["--tiny", "--out", str(out), "--log", str(log), "--state", str(state)]) == 0
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in recs] == [10, 12]
    assert [r["length"] for r in recs] == [512, 512] and recs[0]["topk"] == 16
    for r in recs:
        assert {"lm", "answer", "kl", "hint", "answer_acc", "gnorm", "loss"} <= set(r)
        assert all(np.isfinite(v) for v in r.values())
    cfg, params = load_checkpoint(str(out), jnp.float32)
    assert cfg.index_topk == 16  # the shipped config, whatever top-k a phase trained with
    # The saved float params export to the very same files.
    again = tmp_path / "again"
    assert td.main(["--export", str(state), "--out", str(again)]) == 0
    for name in sorted(os.listdir(out)):
        assert filecmp.cmp(out / name, again / name, shallow=False), name
