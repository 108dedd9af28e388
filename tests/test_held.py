"""``weights=`` / ``kernels=`` resolution (``dsv4_jax.held``): what ``LLM(dir)`` holds by default
on each backend, and that contradictory requests are refused with a message naming both."""

import pytest

from dsv4_jax.held import resolve


def test_auto_is_packed_with_kernels_on_gpu_and_f32_with_references_on_cpu():
    gpu = resolve(backend="gpu")
    assert (gpu.weights, gpu.dtype, gpu.kernels, gpu.storage) == ("packed", "bfloat16", "pallas", "packed")
    cpu = resolve(backend="cpu")
    assert (cpu.weights, cpu.dtype, cpu.kernels, cpu.storage) == (
        "f32",
        "float32",
        "reference",
        "dequantized",
    )
    assert resolve(backend="tpu").kernels == "reference"  # the kernels are Triton (GPU) kernels


def test_dtype_alone_picks_the_dequantized_format_and_packed_takes_a_compute_dtype():
    assert resolve(dtype="bfloat16", backend="cpu").weights == "bf16"
    assert resolve(dtype="float32", backend="gpu").weights == "f32"
    p = resolve("packed", "pallas", "float32", backend="cpu")
    assert (p.weights, p.dtype, p.kernels) == ("packed", "float32", "pallas")


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(weights="bf16", dtype="float32"), "weights='bf16'"),
        (dict(weights="fp8"), "weights must be one of"),
        (dict(kernels="triton"), "kernels must be one of"),
        (dict(dtype="float16"), "dtype must be one of"),
    ],
)
def test_bad_requests_name_the_argument(kw, needle):
    with pytest.raises(ValueError, match=needle):
        resolve(**kw, backend="cpu")
