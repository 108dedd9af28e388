"""Test set-up: CPU only, 8 fake devices for sharding tests, fp32 matmuls at full precision.

XLA's CPU backend is asked for less LLVM optimisation: the tests run tiny models whose
cost is almost all compilation, and this halves it (a 2-core CI machine runs the
whole suite). Subprocesses started by tests (server, multi-host) inherit the flags.
The environment must be set before jax is first imported, hence module level here.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
for flag in (
    "--xla_force_host_platform_device_count=8",
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
):
    if flag.split("=")[0] not in flags:
        flags = (flags + " " + flag).strip()
os.environ["XLA_FLAGS"] = flags

import jax

jax.config.update("jax_default_matmul_precision", "highest")

# Every JaxModelRunner jits its own step, so two runners of the same shapes (most engine tests
# build several) compile the same program twice. A compilation cache turns the second compile
# into a load. `make test` creates one for the whole run, shared by its pytest processes and the
# servers and workers they start (through the environment), and deletes it afterwards; a bare
# pytest run gets one private to it. Nothing outlives the run, so a run never depends on an
# earlier one.
_cache = os.environ.get("DSV4_TEST_COMPILE_CACHE")
if not _cache:
    _cache = tempfile.mkdtemp(prefix="dsv4-test-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
# A size limit turns on JAX's file lock around every cache read and write; without it an entry
# is written in place, and another process could read it half-written.
_CACHE_MAX_BYTES = 50 * 2**30
os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(_CACHE_MAX_BYTES)
jax.config.update("jax_compilation_cache_dir", _cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_compilation_cache_max_size", _CACHE_MAX_BYTES)
