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
position 0 (training, parity tests); with a decode state (``kv_cache``) and a
``StepMeta`` it continues each row's sequence by a prefill chunk or a decode step
(``attention_state``). jit, donation and shapes are the runner's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dsv4_jax import attention, dp_attention, moe_ep, ops
from dsv4_jax import hyper_connections as hc
from dsv4_jax import kv_cache as kvc
from dsv4_jax.config import Config
from dsv4_jax.sharding import Layout, constrain

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """Static switches that change numerics, not the math.

    ``sim_quant`` reproduces the reference's QAT rounding (§2): FP8 activations before
    FP8/FP4 GEMMs, FP8 nope dims of KV and compressed KV, Hadamard + FP4 indexer q/k.
    Off by default (the HF port, our oracle, has none of it).

    ``kernels`` selects the implementation of the decode hot paths on the state path:
    ``"reference"`` (jnp) or ``"pallas"`` (the kernels of ``pallas_kernels``: sparse
    attention, indexer top-k, and the MXFP4 expert matmul when the experts are held
    packed). The full-sequence path (no state) always runs the jnp code.

    ``layout`` (``sharding.Layout``: a mesh and the rules table) runs the model split over
    devices: experts through ``moe_ep`` (all-to-all), attention over the state through
    ``dp_attention`` (each sequence on its shard), activations pinned to the batch axes at
    layer boundaries. ``None``: one device, the plain code.
    """

    sim_quant: bool = False
    kernels: str = "reference"
    layout: Layout | None = None

    def __post_init__(self):
        if self.kernels not in ("reference", "pallas"):
            raise ValueError(f"ModelOptions.kernels: expected 'reference' or 'pallas', got {self.kernels!r}")


def block(x, tokens, positions, p, layer: int, cfg: Config, opts: ModelOptions, st=None, meta=None, cc=None,
          taps: list | None = None):
    """One decoder block on streams x [B,T,n,D] (§4): mHC(attention) then mHC(MoE).

    Without ``st`` the rows are whole sequences from position 0; with the layer's state
    ``st`` (and the step's ``meta``/``cc``) the attention runs incrementally over it.
    ``taps``: see ``attention.attention_sequence`` (training). Returns ``(x, new_st)``.
    """
    sq = opts.sim_quant

    def attn_fn(h):
        if st is None:
            return attention.attention_sequence(h, positions, p["attn"], layer, cfg, sim_quant=sq, taps=taps), None
        return dp_attention.attention_chunk(h, positions, p["attn"], st, meta, layer, cfg, cc, opts.layout,
                                            sim_quant=sq, kernels=opts.kernels)

    def ffn_fn(h):
        return moe_ep.moe(h, tokens, p["ffn"], layer, cfg, opts.layout, sim_quant=sq,
                          kernels=opts.kernels if st is not None else "reference"), None

    with jax.named_scope("attn"):
        x, new_st = hc.hc_sublayer(x, p, "hc_attn", p["attn_norm"]["weight"], attn_fn, cfg)
    with jax.named_scope("moe"):
        x, _ = hc.hc_sublayer(x, p, "hc_ffn", p["ffn_norm"]["weight"], ffn_fn, cfg)
    return x, new_st


def forward_streams(params, tokens, positions, cfg: Config, opts: ModelOptions = ModelOptions(), state=None,
                    meta: kvc.StepMeta | None = None, cache: kvc.CacheConfig | None = None,
                    taps: list | None = None, layer_taps: list | None = None):
    """Final residual streams [B,T,n,D] before the HC head (the MTP block's input, §7), and
    the advanced state (``None`` without one). ``taps``: the indexer-loss hook (training);
    ``layer_taps``: a list each block appends its output streams to (the numerics report)."""
    h0 = params["embed"]["weight"][tokens]  # [B,T,D]
    x = jnp.broadcast_to(h0[:, :, None, :], (*h0.shape[:2], cfg.hc_mult, h0.shape[-1]))
    new_layers = []
    for i, p in enumerate(params["layers"]):
        st = None if state is None else state["layers"][i]
        with jax.named_scope(f"layer{i}_{cfg.attn_kind(i)}"):
            x, st = block(x, tokens, positions, p, i, cfg, opts, st, meta, cache, taps)
        x = constrain(x, ("batch", None, None, "embed"), opts.layout)  # [B,T,n,D] stays split by sequence
        new_layers.append(st)
        if layer_taps is not None:
            layer_taps.append(x)
    return x, (None if state is None else {**state, "layers": new_layers})


def head_logits(x, hc_params: dict, norm_w, head_w, cfg: Config):
    """HC head → final RMSNorm → untied head, logits in fp32: [B,T,V]."""
    with jax.named_scope("head"):
        y = hc.hc_head(x, hc_params["hc_head_fn"], hc_params["hc_head_base"], hc_params["hc_head_scale"], cfg)
        y = ops.rms_norm(y, norm_w, cfg.rms_norm_eps)
        return jnp.einsum("btd,vd->btv", y.astype(F32), head_w.astype(F32), preferred_element_type=F32)


def forward(params, tokens, positions, state=None, meta: kvc.StepMeta | None = None, *, cfg: Config,
            opts: ModelOptions = ModelOptions(), cache: kvc.CacheConfig | None = None, last_only: bool = False,
            taps: list | None = None, layer_taps: list | None = None):
    """Logits f32[B,T,V] for tokens i32[B,T] at positions i32[B,T], and the new state.

    ``state=None``: every row is a whole sequence from position 0 (returns ``None`` state).
    With a state (``kv_cache.init_state``), ``meta`` and ``cache``: each row continues its
    sequence from ``positions[:, 0]`` with ``meta.lengths`` valid tokens (prefill chunk or
    decode step); the state is read, advanced and returned. ``last_only`` returns only the
    logits of each row's last valid token, f32[B,1,V]. ``taps`` (full-sequence path only): a list
    each CSA layer appends its indexer scores and attention inputs to (``dsv4_jax.train.loss``);
    ``layer_taps``: a list each block appends its output streams [B,T,n,D] to.
    """
    if (state is None) != (meta is None) or (state is not None and cache is None):
        raise ValueError("forward: pass state, meta and cache together (or none of them)")
    x, state = forward_streams(params, tokens, positions, cfg, opts, state, meta, cache, taps, layer_taps)
    if last_only:
        last = (meta.lengths - 1) if meta is not None else jnp.full((x.shape[0],), x.shape[1] - 1)
        x = jnp.take_along_axis(x, jnp.maximum(last, 0)[:, None, None, None], axis=1)
    logits = head_logits(x, params, params["norm"]["weight"], params["head"]["weight"], cfg)
    return logits, state


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
        x, _ = block(x, next_tokens, positions, p, layer, cfg, opts)
    return head_logits(x, p, p["norm"]["weight"], params["head"]["weight"], cfg), x
