"""How the serving path holds the weights and which implementation runs the hot paths.

``LLM(dir, weights=..., kernels=...)`` and ``--weights`` / ``--kernels`` (docs/SERVING.md
"Held formats and kernels"):

* ``weights="packed"``: FP8 block-scaled linears and MXFP4 routed experts stay in their
  published bytes (``quant.QuantizedWeight``) in device memory, about a third of bf16's
  bytes for V4-Flash (28 vs 86 GB per B200 at EP 8) and the only way V4-Pro fits 8 GPUs.
  Experts go through the MXFP4 grouped-matmul kernel (or its reference); each FP8 linear is
  dequantized inside the jitted step right before its dot (``layers.dense``), which XLA fuses
  into the dot's operand read: no Pallas kernel, because the scale grid is 128×128 (one scale
  per weight tile) and the fusion already reads each byte once.
* ``"bf16"`` / ``"f32"``: every weight dequantized once at load into that dtype (the compute
  dtype follows).
* ``"auto"``: ``packed`` on accelerators; on CPU ``f32``, which measures fastest on XLA:CPU
  (its bf16 matvecs convert every element; docs/PERF.md "Decode with `LLM(dir)`'s defaults"), with the
  routed experts held one array per expert, gate and up rows stacked (``moe.split_experts``).

``kernels``: ``"pallas"`` (the Pallas kernels; interpret mode on CPU), ``"reference"`` (their
jnp specs, which read the same paged state) or ``"auto"``: Pallas on GPU, references elsewhere.

``dtype`` (compute and plain-leaf dtype) is kept for callers that name it: with
``weights="auto"`` it picks the dequantized format of that dtype; with ``packed`` it sets the
dtype the packed weights are dequantized into.
"""

from __future__ import annotations

import dataclasses

WEIGHTS = ("auto", "packed", "bf16", "f32")
KERNELS = ("auto", "pallas", "reference")
DTYPES = ("bfloat16", "float32")
_DTYPE_OF = {"bf16": "bfloat16", "f32": "float32"}


@dataclasses.dataclass(frozen=True)
class Held:
    weights: str  # "packed" | "bf16" | "f32"
    dtype: str  # compute dtype: "bfloat16" | "float32"
    kernels: str  # "pallas" | "reference"

    @property
    def storage(self) -> str:
        """``load_checkpoint``'s ``storage``."""
        return "packed" if self.weights == "packed" else "dequantized"

    def describe(self) -> str:
        w = f"packed ({self.dtype} compute)" if self.weights == "packed" else self.weights
        return f"weights {w}, kernels {self.kernels}"


def resolve(weights: str = "auto", kernels: str = "auto", dtype: str | None = None, *, backend: str) -> Held:
    """The concrete choice for ``backend`` (``jax.default_backend()``: "cpu", "gpu", "tpu")."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    accel = backend != "cpu"
    if weights == "auto":
        if dtype is not None:
            weights = {v: k for k, v in _DTYPE_OF.items()}[dtype]
        else:
            weights = "packed" if accel else "f32"
    if weights in _DTYPE_OF:
        if dtype is not None and dtype != _DTYPE_OF[weights]:
            raise ValueError(
                f"weights={weights!r} computes in {_DTYPE_OF[weights]}, but dtype={dtype!r} was asked for; "
                f"pass one of them (or weights='packed' with dtype={dtype!r})"
            )
        dtype = _DTYPE_OF[weights]
    if kernels == "auto":
        kernels = "pallas" if backend == "gpu" else "reference"
    return Held(weights, dtype or "bfloat16", kernels)
