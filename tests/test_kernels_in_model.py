"""The model on the Pallas kernels (interpret mode on CPU): one switch, same logits.

``ModelOptions(kernels="pallas")`` routes the state path's attention core, indexer top-k
and (for experts held packed as MXFP4) the expert matmuls through ``pallas_kernels``.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from state_utils import cache, run
from test_parity import assert_close, setup

from dsv4_jax.checkpoint import load_checkpoint
from dsv4_jax.model import state as kvc
from dsv4_jax.model.params import to_native
from dsv4_jax.model.transformer import ModelOptions, forward

PALLAS = ModelOptions(kernels="pallas")


def test_kernels_match_full_forward():
    cfg, params, fwd, _ = setup("tiny")
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, 40)
    cc = cache(cfg, slots=2, blocks=6, max_blocks=3, block_tokens=32)
    got, _ = run(
        cfg, cc, params, kvc.init_state(cfg, cc, poison=True), tokens, [13] + [1] * 27, 1, [4, 0], PALLAS
    )
    assert_close(got, np.asarray(fwd(params, tokens[None], np.arange(40)[None]))[0])


def test_kernels_read_fp8_rows_and_fp4_keys():
    """FP8 main rows and FP4 indexer keys decoded in-kernel give what the jnp path gives."""
    cfg, params, _, _ = setup("tiny")
    tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, 36)
    cc = cache(cfg, fmt="fp8-fp4", slots=2, blocks=6, max_blocks=3, block_tokens=32, dtype=jnp.bfloat16)
    out = {}
    for k in ("reference", "pallas"):
        out[k], state = run(
            cfg,
            cc,
            params,
            kvc.init_state(cfg, cc, poison=True),
            tokens,
            [21] + [1] * 15,
            0,
            [3, 5],
            ModelOptions(sim_quant=True, kernels=k),
        )
    assert isinstance(state.layers[1].idx, kvc.kv_format.Fp4IndexerKeys)
    assert_close(out["pallas"], out["reference"])


@pytest.mark.slow  # CI time: make test-slow
def test_mxfp4_expert_kernel_on_the_packed_demo():
    """Experts held packed (the checkpoint's MXFP4 bytes) run through the MXFP4 kernel."""
    cfg, dense = load_checkpoint("checkpoints/demo", jnp.float32)
    _, packed = load_checkpoint("checkpoints/demo", jnp.float32, storage="packed")
    assert (
        type(to_native(packed)["layers"][2]["ffn"]["experts"]["w1"]["weight"]).__name__ == "QuantizedWeight"
    )
    tokens = np.random.RandomState(2).randint(2, cfg.vocab_size, 30)
    full, _ = forward(dense, tokens[None], np.arange(30)[None], cfg=cfg)
    cc = cache(cfg, slots=2, blocks=2, max_blocks=1, block_tokens=128)
    got, _ = run(
        cfg, cc, packed, kvc.init_state(cfg, cc, poison=True), tokens, [17] + [1] * 13, 1, [1], PALLAS
    )
    assert_close(got, np.asarray(full)[0])


def test_unknown_kernel_choice_is_refused():
    with pytest.raises(ValueError, match="ModelOptions.kernels"):
        ModelOptions(kernels="triton")
