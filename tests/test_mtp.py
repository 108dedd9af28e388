"""The MTP block (ARCHITECTURE.md §7) against an oracle assembled from HF modules.

HF builds no MTP block, but the block itself is an ordinary SWA-only, top-k-routed
decoder layer: the oracle wires HF's DecoderLayer, RMSNorm and HyperHead with the
MTP parameters exactly as §7 states, and takes the main model's streams from HF's
own forward (the input of its ``hc_head``).
"""

import jax.numpy as jnp
import numpy as np
import torch
from test_parity import assert_close, setup
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hfm

from dsv4_jax.bench.hf_port import _t, hf_config, hf_layer_state_dict
from dsv4_jax.model.params import to_native
from dsv4_jax.model.transformer import forward_streams, mtp_forward

T = 40


def test_mtp_matches_hf_components():
    cfg, params, _, model = setup("tiny")
    rng = np.random.RandomState(3)
    tokens = rng.randint(0, cfg.vocab_size, (2, T + 1))
    main, nxt = tokens[:, :-1], tokens[:, 1:]
    pos = np.broadcast_to(np.arange(T), main.shape)

    streams = {}
    h = model.model.hc_head.register_forward_hook(lambda m, a, out: streams.setdefault("x", a[0]))
    with torch.no_grad():
        model(input_ids=torch.from_numpy(main), use_cache=False)
    h.remove()
    x_main = streams["x"]  # [B,T,n,D]: HF's final streams before its HC head
    np.testing.assert_allclose(
        np.asarray(forward_streams(params, main, pos, cfg)[0]),
        x_main.numpy(),
        atol=1e-4 * max(1, float(x_main.abs().max())),
    )

    # HF modules holding the MTP weights: its block is an SWA-only top-k layer (§7)
    p = to_native(params)["mtp"][0]
    mcfg = hf_config(cfg.replace(num_hidden_layers=1, compress_ratios=(0, 0), num_hash_layers=0))
    layer = hfm.DeepseekV4DecoderLayer(mcfg, 0).float().eval()
    layer.load_state_dict({k.removeprefix("l."): v for k, v in hf_layer_state_dict(p, "l").items()})
    norms = {}
    for name in ("enorm", "hnorm", "norm"):
        norms[name] = hfm.DeepseekV4RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        norms[name].weight.data = _t(p[name]["weight"])
    head = hfm.DeepseekV4HyperHead(mcfg)
    head.hc_fn.data, head.hc_base.data, head.hc_scale.data = (
        _t(p[k]) for k in ("hc_head_fn", "hc_head_base", "hc_head_scale")
    )
    rot = hfm.DeepseekV4RotaryEmbedding(mcfg)
    pid = torch.from_numpy(pos.copy())
    d = pid[:, :, None] - pid[:, None, :]
    mask = torch.where((d >= 0) & (d < cfg.sliding_window), 0.0, float("-inf"))[:, None]
    with torch.no_grad():
        # §7: the token embedding is zero at position 0 (vLLM / SGLang feed the block that way)
        e = norms["enorm"](model.model.embed_tokens(torch.from_numpy(nxt)) * (pid != 0)[..., None])
        x = (
            norms["hnorm"](x_main) @ _t(p["h_proj"]["weight"]).T
            + (e @ _t(p["e_proj"]["weight"]).T)[:, :, None]
        )
        pe = {k: rot(x, pid, layer_type=k) for k in ("main", "compress")}
        x = layer(
            x, position_embeddings=pe, position_ids=pid, attention_mask=mask, input_ids=torch.from_numpy(nxt)
        )
        want = model.lm_head(norms["norm"](head(x)))

    got, got_streams = mtp_forward(params, jnp.asarray(x_main.numpy()), nxt, pos, cfg)
    assert_close(got, want.numpy())
    assert got_streams.shape == x_main.shape
