"""Float32 spot check at Flash's real widths (ARCHITECTURE.md §1.1): 3 layers (SWA, CSA,
HCA), 8 experts, the shipped ratios, 300 tokens so HCA entries exist. Minutes on 2
cores and ~12 GB of memory: ``make test-slow``."""

import jax
import numpy as np
import pytest
from test_parity import assert_close

from dsv4_jax.bench.hf_port import hf_logits, hf_model
from dsv4_jax.config import preset
from dsv4_jax.model.params import init_params
from dsv4_jax.model.transformer import forward


@pytest.mark.slow
def test_flash_width_spot_check():
    cfg = preset("flash").replace(
        num_hidden_layers=3,
        compress_ratios=(0, 4, 128, 0),
        n_routed_experts=8,
        num_hash_layers=1,
        vocab_size=8192,
    )
    params = init_params(cfg, jax.random.PRNGKey(0), include_mtp=False)
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (1, 300))
    got = jax.jit(lambda p, t, q: forward(p, t, q, cfg=cfg)[0])(params, tokens, np.arange(300)[None])
    got = np.asarray(got)
    want = hf_logits(hf_model(cfg, params), tokens)
    assert_close(got, want)
