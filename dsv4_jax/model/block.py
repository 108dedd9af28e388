"""The decoder block and the MTP block (ARCHITECTURE.md §4, §7).

``Block``: mHC(attention) then mHC(MoE) on the residual streams X [B,T,n,D]. Without a decode
state the rows are whole sequences from position 0 (``attention.attention_sequence``); with
the layer's state (``state.LayerState``), the step's ``meta`` and the cache config, the
attention runs incrementally over it (``attention_state.attention_chunk``). On a mesh the
options' layout (``parallel.rules.Layout``) runs both sub-layers split over devices; the
model only calls its ``attention_chunk`` / ``moe`` / ``constrain`` and never imports it.

``MTPBlock``: a ``Block`` whose input is ``h_proj(hnorm(X_main)) + e_proj(enorm(embed(t+1)))``
and that has its own HC head and final norm (§7).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels as pk
from dsv4_jax.config import Config
from dsv4_jax.model import attention, attention_state, moe, ops
from dsv4_jax.model.attention import Attention
from dsv4_jax.model.layers import Linear, RMSNorm
from dsv4_jax.model.mhc import MHC, HCHead
from dsv4_jax.model.moe import MoE


class Block(nnx.Module):
    """One decoder block: ``attn_norm``, ``hc_attn``, ``attn``, ``ffn_norm``, ``hc_ffn``, ``ffn``."""

    def __init__(self, cfg: Config, layer: int, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.layer = layer
        self.attn_norm = RMSNorm(d, "embed", rngs)
        self.ffn_norm = RMSNorm(d, "embed", rngs)
        self.hc_attn = MHC(cfg, rngs)
        self.hc_ffn = MHC(cfg, rngs)
        self.attn = Attention(cfg, layer, dtype, rngs)
        self.ffn = MoE(cfg, layer, dtype, rngs)

    def __call__(self, x, tokens, positions, cfg: Config, opts, st=None, meta=None, cc=None, taps=None):
        """Streams x [B,T,n,D] → (new streams, new layer state or ``None``). ``taps``: see
        ``attention.attention_sequence`` (training)."""
        layer, sq, lay = self.layer, opts.sim_quant, opts.layout

        def attn_fn(h):
            if st is None:
                return attention.attention_sequence(
                    h, positions, self.attn, layer, cfg, sim_quant=sq, taps=taps
                ), None
            chunk = attention_state.attention_chunk if lay is None else lay.attention_chunk
            return chunk(h, positions, self.attn, st, meta, layer, cfg, cc, sim_quant=sq, kernels=opts.impl)

        def ffn_fn(h):
            kernels = opts.impl if st is not None else pk.REFERENCE
            if lay is None:
                return moe.moe(h, tokens, self.ffn, layer, cfg, sim_quant=sq, kernels=kernels), None
            return lay.moe(h, tokens, self.ffn, layer, cfg, sim_quant=sq, kernels=kernels), None

        with jax.named_scope("attn"):
            x, new_st = self.hc_attn(x, self.attn_norm, attn_fn, cfg)
        with jax.named_scope("moe"):
            x, _ = self.hc_ffn(x, self.ffn_norm, ffn_fn, cfg)
        return x, new_st


class MTPBlock(Block):
    """The multi-token-prediction block (§7): a block plus ``e_proj``, ``h_proj``, ``enorm``,
    ``hnorm``, its own ``hc_head`` and final ``norm``; shares embedding and head with the model."""

    def __init__(self, cfg: Config, layer: int, dtype, rngs: nnx.Rngs):
        super().__init__(cfg, layer, dtype, rngs)
        d = cfg.hidden_size
        self.e_proj = Linear(d, d, dtype, ("embed_out", "embed"), rngs)
        self.h_proj = Linear(d, d, dtype, ("embed_out", "embed"), rngs)
        self.enorm = RMSNorm(d, "embed", rngs)
        self.hnorm = RMSNorm(d, "embed", rngs)
        self.norm = RMSNorm(d, "embed", rngs)
        self.hc_head = HCHead(cfg, rngs)

    def inputs(self, x_main, embedded, positions, cfg: Config, sim_quant: bool):
        """The block's input streams [B,T,n,D] from the main model's streams before its HC head
        and the embedding of token t+1 [B,T,D]. The embedding is zero at position 0, as vLLM
        and SGLang feed DeepSeek's MTP (ARCHITECTURE.md §7): the block was trained that way."""
        embedded = jnp.where((positions == 0)[..., None], 0.0, embedded).astype(embedded.dtype)
        e = ops.rms_norm(embedded, self.enorm.weight[...], cfg.rms_norm_eps)
        hm = ops.rms_norm(x_main, self.hnorm.weight[...], cfg.rms_norm_eps)
        return (
            ops.linear(hm, self.h_proj.weight, quant_act=sim_quant)
            + ops.linear(e, self.e_proj.weight, quant_act=sim_quant)[:, :, None, :]
        )
