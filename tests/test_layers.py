"""Layer-by-layer parity: each component on the inputs the HF modules actually saw.

One HF forward of the tiny config runs with forward hooks on every component of a
SWA/hash layer, a CSA/hash layer and an HCA/top-k layer; our function for that
component is then applied to the captured inputs. A failure names the component.
"""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_parity import setup

from dsv4_jax.model import attention, compressor, indexer, moe, ops
from dsv4_jax.model import mhc as hc
from dsv4_jax.model.transformer import as_model

LENGTH = 45  # crosses the window (16), 11 CSA entries, 5 HCA entries


@functools.cache
def captured():
    """Inputs and outputs of each hooked HF module, keyed by (layer, component)."""
    cfg, params, _, model = setup("tiny")
    tokens = np.random.RandomState(7).randint(0, cfg.vocab_size, (2, LENGTH))
    rec: dict = {}
    hooks = []

    def hook(key):
        def fn(module, args, kwargs, out):
            rec[key] = (args, kwargs, out)

        return fn

    for i in (0, 1, 2):
        layer = model.model.layers[i]
        mods = {
            "attn_norm": layer.input_layernorm,
            "mhc": layer.attn_hc,
            "attention": layer.self_attn,
            "router": layer.mlp.gate,
            "moe": layer.mlp,
        }
        if layer.self_attn.compressor is not None:
            mods["compressor"] = layer.self_attn.compressor
            if hasattr(layer.self_attn.compressor, "indexer"):
                mods["indexer"] = layer.self_attn.compressor.indexer
                mods["scorer"] = layer.self_attn.compressor.indexer.scorer
        for name, mod in mods.items():
            hooks.append(mod.register_forward_hook(hook((i, name)), with_kwargs=True))
    hooks.append(model.model.hc_head.register_forward_hook(hook((-1, "hc_head")), with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=torch.from_numpy(tokens), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    assert (
        cfg.layer_kinds[:3] == ("swa", "csa", "hca")
        and cfg.mlp_kind(1) == "hash"
        and cfg.mlp_kind(2) == "topk"
    )
    return cfg, as_model(params, cfg), tokens, rec


def j(t):
    return jnp.asarray(t.detach().numpy())


def close(got, want, atol=2e-5, rtol=2e-5):
    want = want.detach().numpy() if isinstance(want, torch.Tensor) else np.asarray(want)
    np.testing.assert_allclose(np.asarray(got), want, atol=atol * max(1.0, np.abs(want).max()), rtol=rtol)


POS = np.broadcast_to(np.arange(LENGTH), (2, LENGTH))


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_rms_norm(layer):
    cfg, params, _, rec = captured()  # params: the merged model (nnx modules)
    (x,), _, out = rec[(layer, "attn_norm")]
    close(ops.rms_norm(j(x), params.layers[layer].attn_norm.weight[...], cfg.rms_norm_eps), out)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_mhc(layer):
    cfg, params, _, rec = captured()
    (x,), _, (post, comb, collapsed) = rec[(layer, "mhc")]
    m = params.layers[layer].hc_attn
    pre, mpost, mcomb = hc.hc_weights(j(x), m.fn[...], m.base[...], m.scale[...], cfg)
    close(mpost, post)
    close(mcomb, comb)
    close(hc.collapse(j(x), pre), collapsed)


@pytest.mark.parametrize("layer", [1, 2])
def test_compressor(layer):
    cfg, params, _, rec = captured()
    (x, *_), _, (entries, _) = rec[(layer, "compressor")]
    got = compressor.compress_sequence(
        j(x), params.layers[layer].attn.compressor, cfg.compress_ratio(layer), cfg
    )
    close(got, entries[:, 0])


def _indexer_inputs(cfg, params, rec):
    (x, q_res, *_), _, _ = rec[(1, "indexer")]
    ip = params.layers[1].attn.indexer
    keys = compressor.compress_sequence(j(x), ip.compressor, cfg.compress_ratio(1), cfg, indexer=True)
    return j(x), j(q_res), ip, keys


def test_indexer_scores():
    cfg, params, _, rec = captured()
    x, q_res, ip, keys = _indexer_inputs(cfg, params, rec)
    _, _, want = rec[(1, "scorer")]
    q, w = indexer.index_queries(x, q_res, jnp.asarray(POS), ip, cfg)
    close(indexer.index_scores(q, w, keys), want)


def test_indexer_topk_picks():
    cfg, params, _, rec = captured()
    x, q_res, ip, keys = _indexer_inputs(cfg, params, rec)
    _, _, want = rec[(1, "indexer")]
    got = indexer.indexer_topk(x, q_res, jnp.asarray(POS), keys, ip, cfg.compress_ratio(1), cfg)
    np.testing.assert_array_equal(np.sort(np.asarray(got), -1), np.sort(want.numpy(), -1))
    assert (np.asarray(got) == -1).any() and (np.asarray(got) >= 0).any()


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_attention(layer):
    cfg, params, _, rec = captured()
    (x,), _, (out, _) = rec[(layer, "attention")]
    got = attention.attention_sequence(j(x), jnp.asarray(POS), params.layers[layer].attn, layer, cfg)
    close(got, out)


@pytest.mark.parametrize("layer", [1, 2])
def test_router(layer):
    cfg, params, tokens, rec = captured()
    args, _, (_, weights, indices) = rec[(layer, "router")]
    x = j(args[0]).reshape(-1, cfg.hidden_size)
    idx, w = moe.route(
        x, jnp.asarray(tokens.reshape(-1)), params.layers[layer].ffn.gate, cfg, cfg.mlp_kind(layer) == "hash"
    )
    # HF's top-k is unsorted: compare as expert -> weight maps per token
    got = np.zeros((x.shape[0], cfg.n_routed_experts))
    want = np.zeros_like(got)
    np.put_along_axis(got, np.asarray(idx), np.asarray(w), -1)
    np.put_along_axis(want, indices.numpy(), weights.numpy(), -1)
    close(got, want)
    assert (got > 0).sum(-1).tolist() == [cfg.num_experts_per_tok] * x.shape[0]


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_moe(layer):
    cfg, params, tokens, rec = captured()
    args, _, out = rec[(layer, "moe")]
    got = moe.moe(j(args[0]), jnp.asarray(tokens), params.layers[layer].ffn, layer, cfg)
    close(got, out)


def test_hc_head():
    cfg, params, _, rec = captured()
    (x,), _, out = rec[(-1, "hc_head")]
    close(params.hc_head(j(x), cfg), out)


@pytest.mark.parametrize("layer", [1, 2])
def test_moe_clamps_large_activations(layer):
    """Inputs scaled ×30 push gate/up projections past ``swiglu_limit`` in routed and shared experts."""
    cfg, params, tokens, rec = captured()
    model = setup("tiny")[3]
    args, _, _ = rec[(layer, "moe")]
    x = args[0] * 30
    p = params.layers[layer].ffn
    gate_pre = np.asarray(ops.linear(j(x), p.shared_experts.w1.weight))
    assert (gate_pre > cfg.swiglu_limit).mean() > 0.1  # the clamp is really exercised
    with torch.no_grad():
        want = model.model.layers[layer].mlp(x, input_ids=torch.from_numpy(tokens))
    close(moe.moe(j(x), jnp.asarray(tokens), p, layer, cfg), want)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_block(layer):
    """A whole decoder block (mHC expand direction included) on the captured streams."""
    from dsv4_jax.model.transformer import ModelOptions

    cfg, params, tokens, rec = captured()
    model = setup("tiny")[3]
    (x,), _, _ = rec[(layer, "mhc")]
    hf_layer = model.model.layers[layer]
    hooks = {}
    h = hf_layer.register_forward_hook(lambda m, a, kw, out: hooks.setdefault("out", out), with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=torch.from_numpy(tokens), use_cache=False)
    finally:
        h.remove()
    got, _ = params.layers[layer](j(x), jnp.asarray(tokens), jnp.asarray(POS), cfg, ModelOptions())
    close(got, hooks["out"], atol=5e-5)
