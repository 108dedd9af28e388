"""The bf16 path rounds where DeepSeek's reference rounds, and nowhere else (issue 17).

With bf16 inputs, each op below must equal the same op computed in float32 on the upcast
inputs and rounded to bf16 once at its output: a result within half a bf16 ulp of the float32
one, everywhere (round-to-nearest of the exact value). An op that rounds an intermediate to
bf16 first (the mHC mix did: ``post`` and ``comb`` were cast to bf16 before mixing, as the HF
port does and the reference does not) misses that bound on many elements. docs/PERF.md
"bf16 numerics" has the op-by-op table this checks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv4_jax.config import preset
from dsv4_jax.model import attention, compressor, moe, ops
from dsv4_jax.model import mhc as hc
from dsv4_jax.model.params import init_params
from dsv4_jax.model.transformer import as_model, head_logits

BF16, F32 = jnp.bfloat16, jnp.float32
CFG = preset("tiny")


def _rounded_once(got, want_f32) -> None:
    """``got`` (bf16) is ``want_f32`` rounded to bf16 once: within half an ulp everywhere, plus the
    float32 summation-order slack of the two programs (1e-6 relative, and 1e-7 of the tensor's
    largest value for results that cancel to near zero)."""
    got, want = np.asarray(got, np.float32), np.asarray(want_f32, np.float32)
    ulp = 2.0 ** (np.frexp(want)[1] - 8.0)  # bf16: 8 significant bits; |want| in [2^(e-1), 2^e)
    err = np.abs(got - want)
    bad = err > ulp / 2 + 1e-6 * np.abs(want) + 1e-7 * np.abs(want).max()
    assert not bad.any(), (
        f"{bad.sum()} of {bad.size} elements off by more than half a bf16 ulp (max {err.max():.3g})"
    )


def _bf16(seed, shape, scale=1.0):
    return jnp.asarray(np.random.RandomState(seed).standard_normal(shape) * scale, BF16)


@pytest.fixture(scope="module")
def p():
    return as_model(init_params(CFG, jax.random.PRNGKey(3)), CFG)


def _both(fn, *args):
    """fn on the bf16 args, and on their float32 upcasts (float32 args stay)."""
    up = [a.astype(F32) if isinstance(a, jax.Array) and a.dtype == BF16 else a for a in args]
    return jax.jit(fn)(*args), jax.jit(fn)(*up)


def test_mhc_mixes_round_once(p):
    m = p.layers[1].hc_attn
    x = _bf16(0, (2, 9, CFG.hc_mult, CFG.hidden_size))
    z = _bf16(1, (2, 9, CFG.hidden_size))
    pre, post, comb = hc.hc_weights(x, m.fn[...], m.base[...], m.scale[...], CFG)
    assert pre.dtype == post.dtype == comb.dtype == F32  # the reference's split + Sinkhorn run in fp32
    _rounded_once(*_both(lambda x, z: hc.expand(x, z, post, comb), x, z))
    _rounded_once(*_both(lambda x: hc.collapse(x, pre), x))
    _rounded_once(*_both(lambda x: p.hc_head(x, CFG), x))


def test_norm_rope_and_attention_core_round_once(p):
    x = _bf16(2, (2, 9, CFG.hidden_size))
    _rounded_once(*_both(lambda x: ops.rms_norm(x, p.norm.weight[...], CFG.rms_norm_eps), x))
    q = _bf16(3, (2, 9, CFG.num_attention_heads, CFG.head_dim))
    kv = _bf16(4, (2, 9, CFG.head_dim))
    pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
    cos, sin = ops.rope_angles(pos, ops.rope_inv_freq(CFG, True))
    _rounded_once(*_both(lambda q: ops.apply_rope(q, cos[:, :, None], sin[:, :, None]), q))
    sink = p.layers[1].attn.attn_sink[...]
    seg = lambda kv: [attention.Segment(kv, attention.window_mask(pos, pos, CFG.sliding_window))]
    _rounded_once(*_both(lambda q, kv: attention.attend(q, seg(kv), sink), q, kv))


def test_compressor_entries_round_once(p):
    """Pooling in fp32 from fp32 projections, one rounding after the norm (the reference casts
    the pooled vector before its norm: we keep it fp32 there, more precise). RoPE then rounds the
    trailing dims a second time, as the reference's in-place rotation of a bf16 tensor does, so
    only the other dims are checked here."""
    cp = p.layers[1].attn.compressor  # CSA layer: overlap pooling
    x = _bf16(5, (2, 16, CFG.hidden_size))
    got, want = _both(lambda x: compressor.compress_sequence(x, cp, CFG.compress_ratio(1), CFG), x)
    nope = CFG.head_dim - CFG.qk_rope_head_dim
    _rounded_once(got[..., :nope], want[..., :nope])


def test_router_runs_in_float32_and_the_moe_output_is_rounded_once(p):
    graph, fp = nnx.split(p.layers[3].ffn)  # top-k routed layer
    x = _bf16(6, (10, CFG.hidden_size))
    toks = jnp.asarray(np.random.RandomState(6).randint(0, CFG.vocab_size, 10), jnp.int32)
    held = nnx.merge(
        graph, jax.tree.map(lambda a: a.astype(BF16) if a.dtype == F32 and a.ndim >= 2 else a, fp)
    )
    r16 = moe.route(x, toks, held.gate, CFG, False)
    r32 = moe.route(x.astype(F32), toks, held.gate, CFG, False)
    for a, b in zip(r16, r32):  # same decision and weights as float32 on the same input
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    idx, w = r16
    routed = moe.routed_experts(x, idx, w, held.experts, CFG)
    shared = moe.shared_expert(x, held.shared_experts, CFG)
    assert routed.dtype == shared.dtype == F32  # summed in fp32 (§6), not per expert in bf16
    got = moe.moe(x[None], toks[None], held, 3, CFG)[0]
    np.testing.assert_array_equal(np.asarray(got), np.asarray((routed + shared).astype(BF16)))


def test_logits_are_float32_from_the_bf16_stream(p):
    x = _bf16(7, (2, 3, CFG.hc_mult, CFG.hidden_size))
    graph, head = nnx.split(p.head)
    head = nnx.merge(graph, jax.tree.map(lambda a: a.astype(BF16), head))
    got = head_logits(x, p.hc_head, p.norm, head, CFG)
    assert got.dtype == F32
