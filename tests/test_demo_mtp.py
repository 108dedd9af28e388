"""The demo's MTP block drafts (``dsv4_jax.train.mtp``): the committed block agrees with the main
model's own greedy next token on held-out text far above chance and above the untrained block;
the MTP phase trains the ``mtp.*`` params only, and the main weights are fixed points of the
storage rounding the phase computes the main streams with (so training saw the served model).

The held-out rows are ``mtp.heldout_rows`` (the corpus's held-out tail, ``Corpus.eval``, at
``mtp.EVAL_SEED``): never trained on, by the main model or the MTP block. checkpoints/demo/README.md
has the measured figures."""

import filecmp
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax.checkpoint import demo as mdc
from dsv4_jax.checkpoint import load_checkpoint, load_tokenizer
from dsv4_jax.checkpoint.safetensors_io import SafetensorsCheckpoint
from dsv4_jax.config import Config
from dsv4_jax.model.params import init_params, native_names, to_native
from dsv4_jax.model.transformer import ModelOptions
from dsv4_jax.train import data
from dsv4_jax.train import demo as td
from dsv4_jax.train import mtp as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "checkpoints", "demo")


@functools.cache
def demo():
    return load_checkpoint(DEMO, jnp.float32)


@pytest.fixture(scope="module")
def corpus():
    return td.corpus_and_tokenizer(load_tokenizer(DEMO))[0]


def test_demo_mtp_drafts_the_main_models_next_token(corpus):
    cfg, params = demo()
    rows = M.heldout_rows(corpus, 4, 512)
    got = M.agreement(params, cfg, rows)
    native = to_native(params)
    untrained = to_native(init_params(cfg, jax.random.PRNGKey(0)))["mtp"]  # the block it shipped with
    base = M.agreement({**native, "mtp": untrained}, cfg, rows)
    # Measured on these 2,040 positions: agree_main 0.484, acc_true 0.335 (the main model's own
    # next-token accuracy there: 0.322); the untrained block 0.002 / 0.001 (chance: 1/1006).
    assert got["agree_main"] >= 0.40 and got["acc_true"] >= 0.25, got
    assert base["agree_main"] < 0.02 and got["agree_main"] > base["agree_main"] + 0.3, base


def test_demo_main_weights_are_fixed_points_of_the_storage_rounding():
    """The MTP phase computes the main streams from the weights rounded as stored; on the loaded
    checkpoint that rounding is the identity, so ``--mtp-only`` trains on the served main model."""
    cfg, params = demo()
    native = to_native(params)
    stored, loaded = native_names(M.frozen_main(native, M.stored_formats(cfg))), native_names(native)
    for name, x in stored.items():
        np.testing.assert_array_equal(x, np.asarray(loaded[name]), err_msg=name)


def _small_cfg() -> Config:
    """The demo's widths (every FP8 block and MXFP4 group full) with one SWA layer + the MTP block."""
    return Config(**{**mdc.DEMO, "num_hidden_layers": 1, "compress_ratios": (0, 0), "num_hash_layers": 1})


def test_mtp_phase_lowers_the_mtp_loss_and_trains_only_the_mtp_block(corpus):
    cfg = _small_cfg()
    native = to_native(init_params(cfg, jax.random.PRNGKey(1)))
    before = {n: np.array(x) for n, x in native_names(native).items()}
    formats = M.stored_formats(cfg)
    main = M.frozen_main(native, formats)
    toks, text, ans, _ = data.train_batch(corpus, np.random.RandomState(5), 2, 128, 0.5, 1)
    x_main, greedy = M.main_pass(cfg, ModelOptions())(main, toks[:, :-1])
    loss = jax.jit(M.make_mtp_loss(cfg, formats))
    l0 = float(loss(native["mtp"], main, x_main, toks, text, ans, greedy)[0])

    out = M.train(native, cfg, corpus, (M.MTPPhase(8, 2, 128, 0.5, 1),), lr=3e-3)
    l1 = float(loss(out["mtp"], main, x_main, toks, text, ans, greedy)[0])
    assert l1 < l0 - 0.5, (l0, l1)
    after = native_names(out)
    assert set(after) == set(before)
    changed = {n for n in before if not np.array_equal(before[n], np.asarray(after[n]))}
    assert changed and all(n.startswith("mtp.") for n in changed), sorted(changed)
    assert {n for n in before if n.startswith("mtp.") and n.endswith("proj.weight")} <= changed
    for name in before:  # the frozen leaves are the very arrays passed in
        if not name.startswith("mtp."):
            assert after[name] is native_names(native)[name], name


@pytest.mark.slow  # CI time: make test-slow
def test_mtp_only_script_rewrites_only_the_mtp_tensors(tmp_path):
    """``scripts/train_demo.py --mtp-only --tiny``: the whole checkpoint written again, every
    non-``mtp.`` tensor byte for byte, config and tokenizer files unchanged."""
    out = tmp_path / "ckpt"
    argv = ["--mtp-only", "--tiny", "--init", DEMO, "--out", str(out), "--log", str(tmp_path / "log.jsonl")]
    assert td.main(argv) == 0
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert filecmp.cmp(out / name, os.path.join(DEMO, name), shallow=False), name
    old, new = SafetensorsCheckpoint(DEMO), SafetensorsCheckpoint(str(out))
    assert sorted(old.entries) == sorted(new.entries)
    moved = [n for n in old.entries if old.read(n).tobytes() != new.read(n).tobytes()]
    assert moved and all(n.startswith("mtp.") for n in moved), moved
