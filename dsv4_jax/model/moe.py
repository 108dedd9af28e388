"""Mixture-of-experts FFN (ARCHITECTURE.md §6).

Router: ``σ = sqrt(softplus(x @ W_gᵀ))`` in fp32. Top-k layers select
``top_k(σ + bias)`` (the bias steers selection only); hash layers take the fixed
``tid2eid[token]`` row. Weights are the chosen σ renormalised to sum to one, times
``routed_scaling_factor``. Every expert, the shared one included, is a SwiGLU with
the gate clamped to ≤ limit and the up projection to [−limit, limit]; the routing
weight scales the hidden activation before ``w2``.

Routed experts run as a grouped matmul: the (token, choice) pairs are sorted by
expert and fed to ``ragged_dot`` so each expert's weights are read once per step. That is
the GPU path. ``ragged_dot`` has no grouped kernel on XLA:CPU (it is lowered as a dense
matmul over every expert, masked: E times the work), so on CPU:

* with no more (token, choice) rows than experts (small-batch decode) each row runs its own
  expert: ``_switched_experts`` (a ``lax.switch`` branch per expert, reading the expert in
  place) when the runner holds the experts split (``split_experts``), else
  ``_gathered_experts`` (the row's expert weights gathered, which XLA:CPU copies);
* with more rows, every expert runs on every token and the gate weight (zero where the
  expert was not chosen) scales its output (``_all_experts``): E/k times the ideal work,
  k times less than the masked ``ragged_dot``.

docs/PERF.md "MoE at small batch" has the measurements behind each choice.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels as pk
from dsv4_jax.config import Config
from dsv4_jax.model import choices, ops
from dsv4_jax.model.layers import Linear, buffer, dense, param, value
from dsv4_jax.quant import QuantizedWeight

F32 = jnp.float32


class Router(nnx.Module):
    """The gate (§6): ``weight`` [E, D]; top-k layers add the selection ``bias`` [E] (fp32), hash
    layers the fixed ``tid2eid`` [V, k] table (a ``Buffer``) instead."""

    def __init__(self, cfg: Config, layer: int, dtype, rngs: nnx.Rngs):
        e, d = cfg.n_routed_experts, cfg.hidden_size
        self.weight = param(rngs, (e, d), dtype, ("router", "embed"), "linear")
        self.hash_routed = cfg.mlp_kind(layer) == "hash"
        if self.hash_routed:
            self.tid2eid = buffer(rngs, (cfg.vocab_size, cfg.num_experts_per_tok), ("vocab_table", None), e)
        else:
            self.bias = param(rngs, (e,), F32, ("router",), "normal")


class ExpertStack(nnx.Module):
    """One matrix of every routed expert, stacked: ``weight`` [E, out, in] (the checkpoint has
    one tensor per expert, ``ffn.experts.{j}.w1.weight``; the loader stacks them)."""

    def __init__(self, e: int, out: int, inp: int, dtype, axes, rngs: nnx.Rngs):
        self.weight = param(rngs, (e, out, inp), dtype, axes, "linear")


class Experts(nnx.Module):
    """The routed experts: ``w1`` (gate) and ``w3`` (up) [E, F, D], ``w2`` (down) [E, D, F]."""

    def __init__(self, cfg: Config, dtype, rngs: nnx.Rngs):
        e, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.w1 = ExpertStack(e, f, d, dtype, ("expert", "mlp", "embed"), rngs)
        self.w3 = ExpertStack(e, f, d, dtype, ("expert", "mlp", "embed"), rngs)
        self.w2 = ExpertStack(e, d, f, dtype, ("expert", "embed", "mlp"), rngs)


class SharedExpert(nnx.Module):
    """The always-on expert (FP8 linears in the checkpoint): ``w1``, ``w3`` [F, D], ``w2`` [D, F]."""

    def __init__(self, cfg: Config, dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.shared_intermediate_size
        self.w1 = Linear(f, d, dtype, ("shared_mlp", "embed"), rngs)
        self.w3 = Linear(f, d, dtype, ("shared_mlp", "embed"), rngs)
        self.w2 = Linear(d, f, dtype, ("embed", "shared_mlp"), rngs)


class MoE(nnx.Module):
    """The FFN of every layer (§6): ``gate``, routed ``experts`` and ``shared_experts``."""

    def __init__(self, cfg: Config, layer: int, dtype, rngs: nnx.Rngs):
        self.gate = Router(cfg, layer, dtype, rngs)
        self.experts = Experts(cfg, dtype, rngs)
        self.shared_experts = SharedExpert(cfg, dtype, rngs) if cfg.shared_intermediate_size > 0 else None


def route(x: jax.Array, tokens: jax.Array, gate: Router, cfg: Config, hash_routed: bool):
    """Expert indices i32[N,k] and weights f32[N,k] for tokens x [N,D] (ids i32[N])."""
    logits = jnp.einsum("nd,ed->ne", x.astype(F32), gate.weight[...].astype(F32), preferred_element_type=F32)
    scores = jnp.sqrt(jax.nn.softplus(logits))
    if hash_routed:
        idx = gate.tid2eid[...][tokens].astype(jnp.int32)
    else:
        _, idx = jax.lax.top_k(scores + gate.bias[...].astype(F32), cfg.num_experts_per_tok)
        idx = choices.pick("router", idx)
    w = jnp.take_along_axis(scores, idx, axis=-1)
    if cfg.norm_topk_prob:
        w = w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-20)
    return idx, w * cfg.routed_scaling_factor


def swiglu(gate: jax.Array, up: jax.Array, limit: float) -> jax.Array:
    """``silu(min(gate, limit)) · clip(up, −limit, limit)`` in fp32."""
    gate = jnp.minimum(gate.astype(F32), limit)
    up = jnp.clip(up.astype(F32), -limit, limit)
    return jax.nn.silu(gate) * up


def _ragged(lhs: jax.Array, rhs, sizes: jax.Array) -> jax.Array:
    """Grouped ``lhs[rows of group e] @ rhs[e]ᵀ`` for rhs stored [E, out, in]: f32[M,out]."""
    dn = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(([1], [2]), ([], [])),
        lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[0],
    )
    return jax.lax.ragged_dot_general(lhs, dense(rhs, lhs.dtype), sizes, dn, preferred_element_type=F32)


def _mxfp4(w) -> pk.mxfp4.Mxfp4Weight | None:
    """The kernel's view of an expert stack held packed as MXFP4, else ``None``."""
    w = value(w)
    if isinstance(w, QuantizedWeight) and w.fmt == "mxfp4":
        return pk.mxfp4.Mxfp4Weight(w.data, w.scale)
    return None


def routed_experts(
    x: jax.Array,
    idx: jax.Array,
    w: jax.Array,
    experts: Experts,
    cfg: Config,
    *,
    sim_quant: bool = False,
    kernels: pk.Impl = pk.REFERENCE,
    num_experts: int | None = None,
) -> jax.Array:
    """``Σ_choices y_e`` for x [N,D], idx i32[N,k], w f32[N,k]: f32[N,D].

    Experts held as packed MXFP4 run through ``kernels`` (``pallas_kernels.Impl``): the
    MXFP4 grouped-matmul kernels (dequantized in registers, gate/up fused with the SwiGLU)
    or their jnp references; dense stacks as ``ragged_dot``.

    ``num_experts``: size of the ``experts`` stack when it is one shard's slice under expert
    parallelism (``moe_ep``); a choice equal to it is "no expert here": it sorts after every
    group and contributes nothing.
    """
    n, k = idx.shape
    flat = idx.reshape(-1)
    if is_split(experts):
        if n * k <= cfg.n_routed_experts:
            return (
                _switched_experts(x, flat, w.reshape(-1), experts, cfg, sim_quant=sim_quant)
                .reshape(n, k, -1)
                .sum(1)
            )
        return _all_experts(x, idx, w, experts, cfg, sim_quant=sim_quant)
    stacks = (experts.w1.weight, experts.w3.weight, experts.w2.weight)
    plain = all(not isinstance(value(s_), QuantizedWeight) for s_ in stacks)
    if num_experts is None and plain and n * k <= cfg.n_routed_experts:
        return (
            _gathered_experts(x, flat, w.reshape(-1), experts, cfg, sim_quant=sim_quant)
            .reshape(n, k, -1)
            .sum(1)
        )
    if num_experts is None and plain and jax.default_backend() == "cpu":
        return _all_experts(x, idx, w, experts, cfg, sim_quant=sim_quant)
    order = jnp.argsort(flat, stable=True)  # (token, choice) pairs grouped by expert
    tok = order // k
    e = cfg.n_routed_experts if num_experts is None else num_experts
    sizes = jnp.bincount(flat, length=e).astype(jnp.int32)  # ids >= e are not counted
    xs = x[tok]  # [N·k, D]
    row_w = w.reshape(-1)[order]  # f32[N·k]
    if sim_quant:
        xs = ops.fp8_sim(xs, 128)
    packed = [_mxfp4(s_) for s_ in stacks]
    if all(q is not None for q in packed):  # MXFP4 stacks: the kernels' grouped matmuls, or their spec
        h = kernels.mxfp4_swiglu(xs, packed[0], packed[1], sizes, row_w, limit=cfg.swiglu_limit)
        if sim_quant:
            h = ops.fp8_sim(h, 128)
        y = kernels.mxfp4_grouped_matmul(h, packed[2], sizes)  # f32[N·k,D]
    else:
        h = swiglu(_ragged(xs, stacks[0], sizes), _ragged(xs, stacks[1], sizes), cfg.swiglu_limit)
        h = (h * row_w[:, None]).astype(x.dtype)
        if sim_quant:
            h = ops.fp8_sim(h, 128)
        y = _ragged(h, stacks[2], sizes)  # f32[N·k, D]
    if num_experts is not None:  # rows past the groups (no local expert) are not defined by ragged_dot
        y = jnp.where((jnp.arange(n * k) < jnp.sum(sizes))[:, None], y, 0.0)
    return jnp.zeros((n, x.shape[-1]), F32).at[tok].add(y)


def _gathered_experts(
    x: jax.Array, flat: jax.Array, row_w: jax.Array, experts: Experts, cfg: Config, *, sim_quant: bool
) -> jax.Array:
    """Each (token, choice) row m = token·k + choice through its own expert ``flat[m]``, with
    the expert's weights gathered: x [N,D], flat i32[M], row_w f32[M] → f32[M,D] (M = N·k).
    Same math as the ragged path, row by row."""
    k = flat.shape[0] // x.shape[0]
    xs = jnp.repeat(x, k, axis=0)  # [M, D], row m is token m // k
    if sim_quant:
        xs = ops.fp8_sim(xs, 128)

    def take(name):  # [M, out, in]: the chosen experts' weights in the activation dtype
        # mode="clip": ids are in range here (no expert parallelism); the default "fill" mode adds
        # a select against NaN over the gathered weights, which doubled the gather's time on CPU.
        return dense(jnp.take(getattr(experts, name).weight[...], flat, axis=0, mode="clip"), xs.dtype)

    up = lambda name: jnp.einsum("md,mfd->mf", xs, take(name), preferred_element_type=F32)
    h = swiglu(up("w1"), up("w3"), cfg.swiglu_limit)
    h = (h * row_w[:, None]).astype(x.dtype)
    if sim_quant:
        h = ops.fp8_sim(h, 128)
    return jnp.einsum("mf,mdf->md", h, take("w2"), preferred_element_type=F32)


def split_experts(params):
    """``params`` (an ``nnx.State``) as the runner holds them on XLA:CPU: each dense routed expert
    its own arrays, gate and up rows stacked: ``w1`` a tuple of E arrays [2F, D] (``w1[e]`` over
    ``w3[e]``), ``w3`` an empty tuple, ``w2`` a tuple of E arrays [D, F]; the shared expert's
    dense ``w1`` / ``w3`` stacked the same way. Packed weights stay as they are.

    Why split: a decode row that takes its expert out of a stack reads a copy on XLA:CPU (the
    gather, or a slice, is materialised before the dot: each chosen expert is read, written
    and read again), while a ``lax.switch`` branch over separate arrays reads it in place
    (``_switched_experts``). Why gate and up stacked: XLA:CPU runs a dot over at least 2 MiB of
    weights through Eigen on every core and a smaller one as a one-thread GEMV; at V4 widths
    both are large, at the mid benchmark's (768 × 512 f32, 1.5 MiB) stacking moves gate and up
    to the faster path (docs/PERF.md "Gate and up stacked"). The runner holds experts this way
    on CPU without a mesh (``RunnerLayout.place_params``); with expert parallelism, and on
    GPUs, they stay stacked by expert and apart by projection.
    """
    flat = dict(
        jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    )

    def keys(path):
        return [getattr(p, "key", None) for p in path]

    def sibling(path, name):  # the variable at ``path`` with the projection key replaced by ``name``
        out = list(path)
        i = max(j for j, k in enumerate(keys(path)) if k in ("w1", "w3", "w2"))
        out[i] = type(path[i])(name)
        return flat.get(tuple(out))

    def is_dense(x):
        return isinstance(x, jax.Array)

    def split(path, v):
        ks = keys(path)
        w = value(v)
        routed = "experts" in ks and is_dense(w) and w.ndim == 3
        shared = "shared_experts" in ks and is_dense(w) and w.ndim == 2
        if not (routed or shared):
            return v
        proj = next(k for k in reversed(ks) if k in ("w1", "w3", "w2"))
        if proj == "w2":
            return v.replace(tuple(w[e] for e in range(w.shape[0]))) if routed else v
        other = value(sibling(path, "w3" if proj == "w1" else "w1"))
        if not (is_dense(other) and other.shape == w.shape):
            return v  # the pair is not two dense arrays of one shape: leave both apart
        if proj == "w3":
            return v.replace(())
        if shared:
            return v.replace(jnp.concatenate([w, other], axis=0))
        return v.replace(tuple(jnp.concatenate([w[e], other[e]], axis=0) for e in range(w.shape[0])))

    return jax.tree_util.tree_map_with_path(split, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def is_split(experts: Experts) -> bool:
    """Whether ``experts`` is held one array per expert (``split_experts``)."""
    return isinstance(value(experts.w1.weight), tuple)


def gate_up(proj, w1, w3) -> tuple[jax.Array, jax.Array]:
    """Gate and up projections ``proj(w)`` ([..., F] each), from separate ``w1`` / ``w3`` or from
    ``w1`` holding both stacked ([2F, D], ``w3`` an empty tuple: ``split_experts``)."""
    if isinstance(w3, tuple) and not w3:
        gu = proj(w1)  # [..., 2F]
        f = gu.shape[-1] // 2
        return gu[..., :f], gu[..., f:]
    return proj(w1), proj(w3)


def _switched_experts(
    x: jax.Array, flat: jax.Array, row_w: jax.Array, experts: Experts, cfg: Config, *, sim_quant: bool
) -> jax.Array:
    """``_gathered_experts`` for experts held split: each row m runs branch ``flat[m]`` of a
    ``lax.switch`` whose branches close over one expert's arrays, so the dots read the
    chosen expert where it lies (rows one after another, ``lax.map``): f32[M,D]."""
    k = flat.shape[0] // x.shape[0]
    xs = jnp.repeat(x, k, axis=0)  # [M, D], row m is token m // k
    if sim_quant:
        xs = ops.fp8_sim(xs, 128)
    w13, w2 = value(experts.w1.weight), value(experts.w2.weight)

    def branch(e: int):  # [1, D], f32[] -> f32[1, D]
        return lambda xr, rw: _one_expert(xr, w13[e], w2[e], rw, cfg, x.dtype, sim_quant)

    branches = [branch(e) for e in range(len(w13))]
    return jax.lax.map(
        lambda a: jax.lax.switch(a[0], branches, a[1][None], a[2])[0], (flat, xs, row_w)
    )  # f32[M, D]


def _all_experts(
    x: jax.Array, idx: jax.Array, w: jax.Array, experts: Experts, cfg: Config, *, sim_quant: bool
) -> jax.Array:
    """Every expert on every token, its output scaled by the token's gate weight for it (zero
    where not chosen; summed where a hash row repeats an expert): x [N,D] → f32[N,D].
    Each expert's weights are read once, as in the grouped matmul, for E·N rows of work
    instead of k·N; on CPU that beats the masked ``ragged_dot`` (E·k·N)."""
    n, e = x.shape[0], cfg.n_routed_experts
    gates = jnp.zeros((n, e), F32).at[jnp.arange(n)[:, None], idx].add(w)  # f32[N, E]
    xs = ops.fp8_sim(x, 128) if sim_quant else x
    w1, w3, w2 = (value(getattr(experts, name).weight) for name in ("w1", "w3", "w2"))

    if not is_split(experts):  # one einsum over the stack: [E, N, F]
        up = lambda wt: jnp.einsum("nd,efd->enf", xs, dense(wt, xs.dtype), preferred_element_type=F32)
        h = (swiglu(up(w1), up(w3), cfg.swiglu_limit) * gates.T[:, :, None]).astype(x.dtype)
        if sim_quant:
            h = ops.fp8_sim(h, 128)
        return jnp.einsum("enf,edf->nd", h, dense(w2, h.dtype), preferred_element_type=F32)
    out = jnp.zeros((n, x.shape[-1]), F32)
    for j in range(e):  # expert by expert, each array read in place; split, w1[j] is gate and up stacked
        out = out + _one_expert(xs, w1[j], w2[j], gates[:, j : j + 1], cfg, x.dtype, sim_quant)
    return out


def _one_expert(xs: jax.Array, w13, w2, gate: jax.Array, cfg: Config, dtype, sim_quant: bool) -> jax.Array:
    """One expert held split (gate and up rows stacked in ``w13`` [2F, D]) on rows xs [N,D], the
    SwiGLU output scaled by ``gate`` f32[N,1] (or a scalar) before ``w2``, as every routed
    path does: f32[N,D]."""
    up = lambda w: jnp.einsum("nd,fd->nf", xs, dense(w, xs.dtype), preferred_element_type=F32)
    h = (swiglu(*gate_up(up, w13, ()), cfg.swiglu_limit) * gate).astype(dtype)
    if sim_quant:
        h = ops.fp8_sim(h, 128)
    return jnp.einsum("nf,df->nd", h, dense(w2, h.dtype), preferred_element_type=F32)


def shared_expert(x: jax.Array, p: SharedExpert, cfg: Config, *, sim_quant: bool = False) -> jax.Array:
    """The always-on expert, same clamped SwiGLU (§11.1): f32[..., D]."""
    proj = lambda w: ops.linear(x, w, quant_act=sim_quant)
    h = swiglu(*gate_up(proj, p.w1.weight, value(p.w3.weight)), cfg.swiglu_limit)
    h = h.astype(x.dtype)
    if sim_quant:
        h = ops.fp8_sim(h, 128)
    return jnp.einsum("...i,oi->...o", h, dense(p.w2.weight, h.dtype), preferred_element_type=F32)


def moe(
    x: jax.Array,
    tokens: jax.Array,
    p: MoE,
    layer: int,
    cfg: Config,
    *,
    sim_quant: bool = False,
    kernels: pk.Impl = pk.REFERENCE,
):
    """The MoE sub-layer on normed input x [B,T,D] with token ids i32[B,T]: [B,T,D]."""
    b, t, d = x.shape
    xf = x.reshape(b * t, d)
    with jax.named_scope("route"):
        idx, w = route(xf, tokens.reshape(-1), p.gate, cfg, cfg.mlp_kind(layer) == "hash")
    with jax.named_scope("experts"):
        out = routed_experts(xf, idx, w, p.experts, cfg, sim_quant=sim_quant, kernels=kernels)
    if p.shared_experts is not None:
        with jax.named_scope("shared"):
            out = out + shared_expert(xf, p.shared_experts, cfg, sim_quant=sim_quant)
    return out.astype(x.dtype).reshape(b, t, d)
