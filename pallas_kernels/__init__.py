"""Pallas kernels for DeepSeek-V4 decode, each beside a pure-jnp reference with the same
data arguments (``*_reference``: the spec, and the CPU path):

- ``sparse_attention``: window ring + chunk rows + CSA top-k / HCA compressed rows + sink,
  one online softmax over paged bf16 or "fp8_ds_mla" rows (ARCHITECTURE.md §5.4);
- ``indexer_topk``: lightning-indexer scores with an exact streaming top-k over paged
  bf16 / FP8 / FP4 keys (§5.3);
- ``mxfp4_grouped_matmul`` / ``mxfp4_swiglu`` / ``moe_experts``: MXFP4 routed experts,
  gate/up fused with the clamped SwiGLU (§6, §8).

``kv_format`` holds the row formats of the decode state and their codecs, ``mxfp4`` the
MXFP4 codec; ``impl`` the one switch between the kernels and the references that the
model calls (``Impl``). Kernels lower to Triton on GPU and run in interpret mode on CPU
(``interpret=None`` decides by backend). This package imports
only jax and numpy; docs/KERNELS.md has the design and the integration notes.
"""

from pallas_kernels import kv_format, mxfp4
from pallas_kernels.impl import REFERENCE, Impl, implementation
from pallas_kernels.indexer_topk.kernel import indexer_topk
from pallas_kernels.indexer_topk.reference import indexer_topk_reference
from pallas_kernels.mxfp4_matmul.kernel import moe_experts, mxfp4_grouped_matmul, mxfp4_swiglu
from pallas_kernels.mxfp4_matmul.reference import (
    moe_experts_reference,
    mxfp4_grouped_matmul_reference,
    mxfp4_swiglu_reference,
)
from pallas_kernels.sparse_attention.kernel import sparse_attention
from pallas_kernels.sparse_attention.reference import sparse_attention_reference

__all__ = [
    "REFERENCE",
    "Impl",
    "implementation",
    "indexer_topk",
    "indexer_topk_reference",
    "kv_format",
    "moe_experts",
    "moe_experts_reference",
    "mxfp4",
    "mxfp4_grouped_matmul",
    "mxfp4_grouped_matmul_reference",
    "mxfp4_swiglu",
    "mxfp4_swiglu_reference",
    "sparse_attention",
    "sparse_attention_reference",
]
