"""The DeepSeek-V4 model: the ``DeepseekV4`` NNX module and the pure forward over its params.

Axis legend for shape comments across the package (ARCHITECTURE.md uses other
letters; the mapping is given in brackets):
  B batch · T query tokens of this call [S] · S key positions [T] · D model dim [d]
  H heads · K head dim [D] · n mHC streams [n_hc] · E experts · F expert hidden
  C compressed entries · V vocab · k top-k picks

Data flow (§3): embed → copy to n streams → for each block: mHC(attention),
mHC(MoE) → HC head → final norm → untied head (fp32 logits).

The module tree mirrors the checkpoint's names (``layers[3].attn.wq_a.weight`` is
``layers.3.attn.wq_a.weight``; the mHC parameters ``hc_attn.fn`` are ``hc_attn_fn``). At the
jit boundary the model is pure: ``graphdef, params = nnx.split(model)`` once (``init_params``
and the checkpoint loader return the ``params`` half, an ``nnx.State``), and
``forward(params, tokens, positions, state, meta) -> (logits, state)`` merges them inside the
trace. With ``state=None`` it runs whole sequences that start at position 0 (training, parity
tests); with a decode state (``state.DecodeState``) and a ``StepMeta`` it continues each row's
sequence by a prefill chunk or a decode step (``attention_state``). jit, donation and shapes
are the runner's.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels as pk
from dsv4_jax.config import Config
from dsv4_jax.model import mhc, ops
from dsv4_jax.model import state as kvc
from dsv4_jax.model.block import Block, MTPBlock
from dsv4_jax.model.layers import Linear, RMSNorm, param, shapes_only

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """Static switches that change numerics or placement, not the math.

    ``sim_quant`` reproduces the reference's QAT rounding (§2): FP8 activations before
    FP8/FP4 GEMMs, FP8 nope dims of KV and compressed KV, Hadamard + FP4 indexer q/k
    (docs/SERVING.md "Numerics modes": ``LLM``'s ``qat``).

    ``kernels`` selects the implementation of the decode hot paths on the state path:
    ``"reference"`` (the jnp specs of ``pallas_kernels``) or ``"pallas"`` (the kernels: sparse
    attention, indexer top-k, and the MXFP4 expert matmul when the experts are held packed).
    ``interpret`` runs the Pallas kernels in interpret mode (CPU, tests); ``None`` means "on
    CPU", decided once from the backend. The full-sequence path (no state) always runs jnp.

    ``layout`` (``parallel.rules.Layout``: a mesh and the rules table) runs the model split over
    devices: its ``attention_chunk`` and ``moe`` replace the single-device sub-layers and its
    ``constrain`` pins activations at layer boundaries. ``None``: one device, the plain code.
    """

    sim_quant: bool = False
    kernels: str = "reference"
    interpret: bool | None = None
    layout: Any = None

    def __post_init__(self):
        if self.kernels not in pk.impl.KINDS:
            raise ValueError(f"ModelOptions.kernels: expected one of {pk.impl.KINDS}, got {self.kernels!r}")

    @property
    def impl(self) -> pk.Impl:
        """The functions the state path calls (``pallas_kernels.impl``): kernels or references."""
        interpret = jax.default_backend() == "cpu" if self.interpret is None else self.interpret
        return pk.implementation(self.kernels, interpret)


class Embedding(nnx.Module):
    """The token embedding ``weight`` [V, D] (not tied to the head)."""

    def __init__(self, cfg: Config, dtype, rngs: nnx.Rngs):
        self.weight = param(rngs, (cfg.vocab_size, cfg.hidden_size), dtype, ("vocab", "embed"), "normal")

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.weight[...][tokens]  # [B,T,D]


class DeepseekV4(nnx.Module):
    """The whole model: ``embed``, ``layers``, ``norm``, ``hc_head``, ``head`` and the ``mtp``
    blocks (ARCHITECTURE.md §3, §7). ``dtype`` is the weights' (fp32 leaves stay fp32)."""

    def __init__(self, cfg: Config, *, dtype=F32, include_mtp: bool = True, rngs: nnx.Rngs):
        d, v, n = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
        self.embed = Embedding(cfg, dtype, rngs)
        self.head = Linear(v, d, dtype, ("vocab", "embed"), rngs)
        self.norm = RMSNorm(d, "embed", rngs)
        self.hc_head = mhc.HCHead(cfg, rngs)
        self.layers = nnx.List([Block(cfg, i, dtype, rngs) for i in range(n)])
        mtp = include_mtp and cfg.num_nextn_predict_layers
        self.mtp = nnx.List([MTPBlock(cfg, n + k, dtype, rngs) for k in range(mtp)]) if mtp else None


@functools.lru_cache(maxsize=32)
def graphdef(cfg: Config, include_mtp: bool = True) -> nnx.GraphDef:
    """The static half of ``nnx.split(DeepseekV4(cfg))`` (built abstractly, nothing allocated)."""
    with shapes_only():
        return nnx.graphdef(DeepseekV4(cfg, include_mtp=include_mtp, rngs=nnx.Rngs(0)))


def as_model(params, cfg: Config) -> DeepseekV4:
    """``params`` merged with the model's graphdef: the module to call. ``params`` is the
    ``nnx.State`` of ``nnx.split``, or its values alone (``nnx.to_pure_dict``: what the runner
    passes through jit, because plain dicts flatten in C++); the graphdef carries the metadata."""
    return nnx.merge(graphdef(cfg, "mtp" in params), params)


def constrain(x: jax.Array, axes: tuple[str | None, ...], opts: ModelOptions) -> jax.Array:
    """Pin an activation's layout at a boundary (no-op on one device)."""
    return x if opts.layout is None else opts.layout.constrain(x, axes)


def forward_streams(
    params,
    tokens,
    positions,
    cfg: Config,
    opts: ModelOptions = ModelOptions(),
    state=None,
    meta: kvc.StepMeta | None = None,
    cache: kvc.CacheConfig | None = None,
    taps: list | None = None,
    layer_taps: list | None = None,
):
    """Final residual streams [B,T,n,D] before the HC head (the MTP block's input, §7), and
    the advanced state (``None`` without one). ``taps``: the indexer-loss hook (training);
    ``layer_taps``: a list each block appends its output streams to (the numerics report)."""
    model = as_model(params, cfg)
    h0 = model.embed(tokens)  # [B,T,D]
    x = jnp.broadcast_to(h0[:, :, None, :], (*h0.shape[:2], cfg.hc_mult, h0.shape[-1]))
    new_layers = []
    for i, blk in enumerate(model.layers):
        st = None if state is None else state.layers[i]
        with jax.named_scope(f"layer{i}_{cfg.attn_kind(i)}"):
            x, st = blk(x, tokens, positions, cfg, opts, st, meta, cache, taps)
        x = constrain(x, ("batch", None, None, "embed"), opts)  # [B,T,n,D] stays split by sequence
        new_layers.append(st)
        if layer_taps is not None:
            layer_taps.append(x)
    if state is None:
        return x, None
    # the MTP blocks' windows (``CacheConfig.mtp_layers``) follow the main layers, untouched here
    return x, dataclasses.replace(state, layers=new_layers + state.layers[len(new_layers) :])


def head_logits(x, hc_head: mhc.HCHead, norm: RMSNorm, head: Linear, cfg: Config):
    """HC head → final RMSNorm → untied head, logits in fp32: [B,T,V]."""
    with jax.named_scope("head"):
        y = ops.rms_norm(hc_head(x, cfg), norm.weight[...], cfg.rms_norm_eps)
        return jnp.einsum(
            "btd,vd->btv", y.astype(F32), head.weight[...].astype(F32), preferred_element_type=F32
        )


def forward(
    params,
    tokens,
    positions,
    state=None,
    meta: kvc.StepMeta | None = None,
    *,
    cfg: Config,
    opts: ModelOptions = ModelOptions(),
    cache: kvc.CacheConfig | None = None,
    last_only: bool = False,
    taps: list | None = None,
    layer_taps: list | None = None,
):
    """Logits f32[B,T,V] for tokens i32[B,T] at positions i32[B,T], and the new state.

    ``state=None``: every row is a whole sequence from position 0 (returns ``None`` state).
    With a state (``state.init_state``), ``meta`` and ``cache``: each row continues its
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
    model = as_model(params, cfg)
    return head_logits(x, model.hc_head, model.norm, model.head, cfg), state


def mtp_streams(
    params,
    x_main,
    next_tokens,
    positions,
    cfg: Config,
    opts: ModelOptions = ModelOptions(),
    state=None,
    meta: kvc.StepMeta | None = None,
    cache: kvc.CacheConfig | None = None,
    depth: int = 0,
):
    """The MTP block's output streams [B,T,n,D] (pre-HC-head) and, with a decode state, the
    state with its window advanced (§7). ``state`` is the whole ``DecodeState``; the block's
    window is ``state.layers[num_hidden_layers + depth]`` and runs through the same
    ``attention_chunk`` as a main SWA layer (``meta.commit`` rows written)."""
    model = as_model(params, cfg)
    blk = model.mtp[depth]
    x = blk.inputs(x_main, model.embed(next_tokens), positions, cfg, opts.sim_quant)
    at = cfg.num_hidden_layers + depth
    st = None if state is None else state.layers[at]
    with jax.named_scope(f"mtp{depth}"):
        x, st = blk(x, next_tokens, positions, cfg, opts, st, meta, cache)
    if state is None:
        return x, None
    layers = list(state.layers)
    layers[at] = st
    return x, dataclasses.replace(state, layers=layers)


def mtp_logits(params, x, cfg: Config, depth: int = 0):
    """Draft logits f32[B,T,V] from MTP streams [B,T,n,D]: its HC head and norm, the shared head."""
    model = as_model(params, cfg)
    blk = model.mtp[depth]
    return head_logits(x, blk.hc_head, blk.norm, model.head, cfg)


def main_logits(params, x, cfg: Config):
    """Logits f32[B,T,V] from the main model's final streams [B,T,n,D]."""
    model = as_model(params, cfg)
    return head_logits(x, model.hc_head, model.norm, model.head, cfg)


def mtp_forward(
    params, x_main, next_tokens, positions, cfg: Config, opts: ModelOptions = ModelOptions(), depth: int = 0
):
    """The MTP block's draft logits for token t+2 at each position t (§7).

    ``x_main`` [B,T,n,D]: main-model streams before the HC head; ``next_tokens``
    i32[B,T]: token t+1 at each position. Returns (logits f32[B,T,V], streams) where
    the streams (pre-HC-head) can feed a further draft step.
    """
    x, _ = mtp_streams(params, x_main, next_tokens, positions, cfg, opts, depth=depth)
    return mtp_logits(params, x, cfg, depth), x
