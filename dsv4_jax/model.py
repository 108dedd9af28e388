"""The DeepSeek-V4 forward pass as pure functions over a params pytree.

Axis legend for shape comments across the package (ARCHITECTURE.md uses other
letters; the mapping is given in brackets):
  B batch · T query tokens of this call [S] · S key positions [T] · D model dim [d]
  H heads · K head dim [D] · n mHC streams [n_hc] · E experts · F expert hidden
  C compressed entries · V vocab · k top-k picks

Data flow (§3): embed → copy to n streams → for each block: mHC(attention),
mHC(MoE) → HC head → final norm → untied head (fp32 logits).

``forward`` is the model boundary: ``forward(params, tokens, positions, state, meta)
-> (logits, state)``. With ``state=None`` it runs whole sequences that start at
position 0 (training, parity tests, one-shot prefill); the incremental state path
plugs in through the same signature. jit, donation and shapes are the runner's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dsv4_jax import attention, hyper_connections as hc, moe, ops
from dsv4_jax.config import Config

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """Static switches that change numerics, not the math.

    ``sim_quant`` reproduces the reference's QAT rounding (§2): FP8 activations before
    FP8/FP4 GEMMs, FP8 nope dims of KV and compressed KV, Hadamard + FP4 indexer q/k.
    Off by default (the HF port, our oracle, has none of it).
    """

    sim_quant: bool = False


def block(x, tokens, positions, p, layer: int, cfg: Config, opts: ModelOptions):
    """One decoder block on streams x [B,T,n,D] (§4): mHC(attention) then mHC(MoE)."""
    sq = opts.sim_quant

    def attn_fn(h):
        return attention.attention_sequence(h, positions, p["attn"], layer, cfg, sim_quant=sq), None

    def ffn_fn(h):
        return moe.moe(h, tokens, p["ffn"], layer, cfg, sim_quant=sq), None

    with jax.named_scope("attn"):
        x, _ = hc.hc_sublayer(x, p, "hc_attn", p["attn_norm"]["weight"], attn_fn, cfg)
    with jax.named_scope("moe"):
        x, _ = hc.hc_sublayer(x, p, "hc_ffn", p["ffn_norm"]["weight"], ffn_fn, cfg)
    return x


def forward_streams(params, tokens, positions, cfg: Config, opts: ModelOptions = ModelOptions()):
    """Final residual streams [B,T,n,D] before the HC head (the MTP block's input, §7)."""
    h0 = params["embed"]["weight"][tokens]  # [B,T,D]
    x = jnp.broadcast_to(h0[:, :, None, :], (*h0.shape[:2], cfg.hc_mult, h0.shape[-1]))
    for i, p in enumerate(params["layers"]):
        with jax.named_scope(f"layer{i}_{cfg.attn_kind(i)}"):
            x = block(x, tokens, positions, p, i, cfg, opts)
    return x


def head_logits(x, hc_params: dict, norm_w, head_w, cfg: Config):
    """HC head → final RMSNorm → untied head, logits in fp32: [B,T,V]."""
    with jax.named_scope("head"):
        y = hc.hc_head(x, hc_params["hc_head_fn"], hc_params["hc_head_base"], hc_params["hc_head_scale"], cfg)
        y = ops.rms_norm(y, norm_w, cfg.rms_norm_eps)
        return jnp.einsum("btd,vd->btv", y.astype(F32), head_w.astype(F32), preferred_element_type=F32)


def forward(params, tokens, positions, state=None, meta=None, *, cfg: Config,
            opts: ModelOptions = ModelOptions()):
    """Logits f32[B,T,V] for tokens i32[B,T] at positions i32[B,T], and the new state.

    With ``state=None`` every row is a whole sequence from position 0.
    """
    if state is not None or meta is not None:
        raise NotImplementedError("the incremental state path is not part of this build")
    x = forward_streams(params, tokens, positions, cfg, opts)
    return head_logits(x, params, params["norm"]["weight"], params["head"]["weight"], cfg), None


def mtp_forward(params, x_main, next_tokens, positions, cfg: Config, opts: ModelOptions = ModelOptions(),
                depth: int = 0):
    """The MTP block's draft logits for token t+2 at each position t (§7).

    ``x_main`` [B,T,n,D]: main-model streams before the HC head; ``next_tokens``
    i32[B,T]: token t+1 at each position. Returns (logits f32[B,T,V], streams) where
    the streams (pre-HC-head) can feed a further draft step.
    """
    p = params["mtp"][depth]
    layer = cfg.num_hidden_layers + depth
    e = ops.rms_norm(params["embed"]["weight"][next_tokens], p["enorm"]["weight"], cfg.rms_norm_eps)
    hm = ops.rms_norm(x_main, p["hnorm"]["weight"], cfg.rms_norm_eps)
    sq = opts.sim_quant
    x = ops.linear(hm, p["h_proj"]["weight"], quant_act=sq) + ops.linear(e, p["e_proj"]["weight"],
                                                                      quant_act=sq)[:, :, None, :]
    with jax.named_scope(f"mtp{depth}"):
        x = block(x, next_tokens, positions, p, layer, cfg, opts)
    return head_logits(x, p, p["norm"]["weight"], params["head"]["weight"], cfg), x
