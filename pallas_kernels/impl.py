"""One switch for the decode hot paths: the Pallas kernels or their jnp references.

The model never names a kernel function. It calls the fields of an :class:`Impl`, which
a caller builds once from its options (``dsv4_jax.model.ModelOptions.impl``). Both sets
take the same data arguments and keywords, so the choice, and ``interpret`` for the
kernels, is made here and nowhere else: ``REFERENCE`` is the model's CPU path and the
spec each kernel is tested against.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

from pallas_kernels.indexer_topk.kernel import indexer_topk
from pallas_kernels.indexer_topk.reference import indexer_topk_reference
from pallas_kernels.mxfp4_matmul.kernel import mxfp4_grouped_matmul, mxfp4_swiglu
from pallas_kernels.mxfp4_matmul.reference import mxfp4_grouped_matmul_reference, mxfp4_swiglu_reference
from pallas_kernels.sparse_attention.kernel import sparse_attention
from pallas_kernels.sparse_attention.reference import sparse_attention_reference

KINDS = ("reference", "pallas")


@dataclasses.dataclass(frozen=True)
class Impl:
    """The functions of one implementation; ``kind`` names it (``"reference"`` / ``"pallas"``)."""

    kind: str
    sparse_attention: Callable
    indexer_topk: Callable
    mxfp4_swiglu: Callable
    mxfp4_grouped_matmul: Callable


REFERENCE = Impl(
    "reference",
    sparse_attention_reference,
    indexer_topk_reference,
    mxfp4_swiglu_reference,
    mxfp4_grouped_matmul_reference,
)


@functools.cache
def implementation(kind: str, interpret: bool) -> Impl:
    """``REFERENCE``, or the kernels bound to ``interpret`` (True on a CPU backend, tests)."""
    if kind == "reference":
        return REFERENCE
    if kind != "pallas":
        raise ValueError(f"kernels: expected one of {KINDS}, got {kind!r}")
    bind = functools.partial
    return Impl(
        "pallas",
        bind(sparse_attention, interpret=interpret),
        bind(indexer_topk, interpret=interpret),
        bind(mxfp4_swiglu, interpret=interpret),
        bind(mxfp4_grouped_matmul, interpret=interpret),
    )
