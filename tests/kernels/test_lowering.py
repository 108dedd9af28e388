"""Every kernel still lowers for CUDA through Pallas' Triton backend (TOOLCHAIN.md §4): the
CPU jaxlib emits the Triton module into a StableHLO custom call without compiling PTX,
which catches unsupported primitives, non-power-of-two tiles and scalar-prefetch misuse
in CPU CI. ``interpret=False`` is forced; the custom call must be Triton's, not Mosaic GPU's
(the 0.10.2 default when no Triton compiler params are passed).
"""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import kv_format, mxfp4
from pallas_kernels.indexer_topk.kernel import indexer_topk
from pallas_kernels.mxfp4_matmul.kernel import moe_experts
from pallas_kernels.sparse_attention.kernel import sparse_attention

S = jax.ShapeDtypeStruct
TRITON = "__gpu$xla.gpu.triton"


def _i32(*shape):
    return S(shape, jnp.int32)


def _lower(fn, *args) -> str:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _assert_triton(text: str, calls: int = 1) -> None:
    assert text.count(TRITON) == calls
    assert "mosaic" not in text.lower()


def _kv_rows(prefix, fmt, k, r):
    if fmt == "bf16":
        return S(prefix + (k,), jnp.bfloat16)
    return kv_format.Fp8Rows(
        S(prefix + (k - r,), jnp.float8_e4m3fn),
        S(prefix + (r,), jnp.bfloat16),
        S(prefix + (kv_format.kv_scale_bytes(k - r),), jnp.uint8),
    )


# Flash decode (64 heads, K=512, W=128, 64 CSA / 2 HCA entries per 256-token block, top-512),
# a Pro-width prefill chunk (128 heads), and the tiny test width (nope 48 = 32+16 chunks).
@pytest.mark.parametrize("fmt", ["bf16", "fp8_ds_mla"])
@pytest.mark.parametrize("mode", ["csa", "hca", "swa"])
@pytest.mark.parametrize(
    "b,t,h,k,r,w,splits",
    [(8, 1, 64, 512, 64, 128, 4), (1, 4, 128, 512, 64, 128, 1), (2, 3, 4, 64, 16, 16, None)],
)
def test_sparse_attention_lowers(fmt, mode, b, t, h, k, r, w, splits):
    e = {"csa": 64, "hca": 2, "swa": 1}[mode]
    args = (
        S((b, t, h, k), jnp.bfloat16),
        S((b, t, k), jnp.bfloat16),
        _kv_rows((b + 2, w), fmt, k, r),
        _i32(b),
        None if mode == "swa" else _kv_rows((64, e), fmt, k, r),
        None if mode == "swa" else _i32(b, 32),
        _i32(b, t, 512) if mode == "csa" else None,
        S((h,), jnp.float32),
        _i32(b),
        _i32(b),
    )
    ratio = {"csa": 4, "hca": 128, "swa": 0}[mode]
    _assert_triton(
        _lower(lambda *a: sparse_attention(*a, ratio=ratio, num_splits=splits, interpret=False), *args)
    )


@pytest.mark.parametrize("fmt", ["bf16", "indexer_fp8", "indexer_fp4"])
@pytest.mark.parametrize("b,t,h,d,topk", [(8, 1, 64, 128, 512), (1, 2, 16, 32, 8)])
def test_indexer_topk_lowers(fmt, b, t, h, d, topk):
    pre = (256, 64)
    keys = {
        "bf16": S(pre + (d,), jnp.bfloat16),
        "indexer_fp8": kv_format.Fp8IndexerKeys(S(pre + (d,), jnp.float8_e4m3fn), S(pre + (1,), jnp.float32)),
        "indexer_fp4": kv_format.Fp4IndexerKeys(
            S(pre + (d // 2,), jnp.uint8), S(pre + (d // 32,), jnp.uint8)
        ),
    }[fmt]
    args = (S((b, t, h, d), jnp.bfloat16), S((b, t, h), jnp.float32), keys, _i32(b, 128), _i32(b), _i32(b))
    _assert_triton(_lower(lambda *a: indexer_topk(*a, ratio=4, topk=topk, interpret=False), *args))


@pytest.mark.parametrize("n,e,d,f", [(1, 256, 4096, 2048), (64, 256, 4096, 2048)])
def test_moe_experts_lowers(n, e, d, f):
    def w(o, i):
        return mxfp4.Mxfp4Weight(S((e, o, i // 2), jnp.uint8), S((e, o, i // 32), jnp.uint8))

    args = (S((n, d), jnp.bfloat16), _i32(n, 6), S((n, 6), jnp.float32), w(f, d), w(d, f), w(f, d))
    _assert_triton(_lower(lambda *a: moe_experts(*a, limit=10.0, interpret=False), *args), calls=2)


def test_indexer_topk_lowers_at_one_million_tokens():
    """1M tokens at blocks of 256 (4,096 blocks of 64 CSA entries): the kernel runs in a loop
    over groups of splits (one launch in the loop body), not one launch of 64 splits."""
    b, h, d = 64, 64, 128
    keys = kv_format.Fp4IndexerKeys(S((4096, 64, d // 2), jnp.uint8), S((4096, 64, d // 32), jnp.uint8))
    args = (S((b, 1, h, d), jnp.bfloat16), S((b, 1, h), jnp.float32), keys, _i32(b, 4096), _i32(b), _i32(b))
    text = _lower(lambda *a: indexer_topk(*a, ratio=4, topk=512, interpret=False), *args)
    _assert_triton(text)
    assert "stablehlo.while" in text
