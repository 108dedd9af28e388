"""What serve, generate and benchmark share: model/engine flags, building the ``LLM``,
the persistent compile cache, warm-up and the profiler flags.

Warm-up: a jitted step compiles once per shape bucket (``JaxModelRunner``: decode batches
and prefill (batch, tokens) buckets, powers of two). On a GPU that is seconds per shape; on
this project's 2-core CPU machines ~10 s for the demo model. On accelerators ``warm_up``
compiles every shape the profile can emit (``LLM.precompile``) before the port opens. On CPU
it runs throw-away
requests through the engine itself (so it works with any runner) that touch the prefill
buckets 8, 16, … up to ``max_prefill`` at batch 1, and batches 2, 4, … up to ``max_batch``
of short prompts with one decode step each. Shapes outside that set compile on first use.
The warm-up's prefix-cache entries are dropped afterwards, and the server's counters start
after it. The persistent compile cache (``--compile-cache``, on by default) makes the second
start of the same model and flags skip most of the compile time (TOOLCHAIN.md §10).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import random
import time

from absl import logging

from dsv4_jax.engine.profiles import add_cli_args, config_from_args
from dsv4_jax.engine.sampling_params import SamplingParams
from dsv4_jax.intmath import cdiv

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO_CHECKPOINT = str(ROOT / "checkpoints" / "demo")
DEMO_MAX_POSITIONS = 65536  # checkpoints/demo/config.json max_position_embeddings
DEFAULT_COMPILE_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "dsv4-jax", "jax")


def add_model_args(parser: argparse.ArgumentParser, profiling: bool = True) -> None:
    """``--checkpoint``, ``--weights`` / ``--kernels`` / ``--dtype``, the engine profile and knobs, ``--mesh``, the compile
    cache and (optionally) the profiler flags."""
    parser.add_argument(
        "--checkpoint",
        default=DEMO_CHECKPOINT,
        help="safetensors or orbax checkpoint directory (default: the bundled demo)",
    )
    add_held_args(parser)
    add_cli_args(parser)  # --profile, --swa-strategy, --max-model-len, --kv-format, --max-batch, ...
    parser.add_argument(
        "--no-qat",
        action="store_true",
        help="run the HF port's unquantized math instead of the reference's QAT rounding "
        "(the default for V4 checkpoints); KV storage then defaults to bf16",
    )
    parser.add_argument(
        "--allow-lossy-kv",
        action="store_true",
        help="accept --kv-format fp8 / fp8-fp4 with --no-qat (changes answers)",
    )
    parser.add_argument(
        "--max-num-seqs",
        dest="max_batch",
        type=int,
        default=None,
        help="vLLM's name for --max-batch: sequences running at once",
    )
    from dsv4_jax.parallel.mesh import add_mesh_args

    add_mesh_args(parser)  # --mesh data=1,expert=8,tensor=1 and the multi-host flags
    parser.add_argument(
        "--compile-cache",
        default=DEFAULT_COMPILE_CACHE,
        help="persistent XLA compile cache directory ('' disables)",
    )
    if profiling:
        add_profiler_args(parser)


def add_held_args(parser: argparse.ArgumentParser) -> None:
    """``--weights``, ``--kernels``, ``--dtype``: ``LLM``'s held format (``dsv4_jax.held``)."""
    from dsv4_jax.held import DTYPES, KERNELS, WEIGHTS

    parser.add_argument(
        "--weights",
        default="auto",
        choices=WEIGHTS,
        help="how weights are held: packed FP8/MXFP4 bytes, or dequantized to bf16 / f32 "
        "(auto: packed on GPU, f32 on CPU)",
    )
    parser.add_argument(
        "--kernels",
        default="auto",
        choices=KERNELS,
        help="decode hot paths: Pallas kernels or their jnp references (auto: Pallas on GPU)",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=DTYPES,
        help="compute dtype (with --weights auto: weights dequantized into it)",
    )


def add_profiler_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("profiler (jax.profiler; docs/SERVING.md#profiling)")
    g.add_argument("--profile-dir", default=None, help="write a trace of --profile-steps engine steps here")
    g.add_argument("--profile-steps", type=int, default=10, help="engine steps in the trace")
    g.add_argument(
        "--profile-skip-steps", type=int, default=0, help="busy steps to run before the trace starts"
    )


def setup_compile_cache(path: str | None) -> None:
    if not path:
        return
    import jax

    path = os.path.expanduser(path)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def build_llm(args: argparse.Namespace):
    """The ``LLM`` (checkpoint, tokenizer, runner, engine) the flags describe."""
    from dsv4_jax.llm import LLM

    config = config_from_args(args)
    kw = dataclasses.asdict(config)
    if getattr(args, "speculative_tokens", None) is None:
        del kw[
            "speculative_tokens"
        ]  # LLM's default: the profile's depth (off on CPU, or without an MTP block)
    shards = 1
    if getattr(args, "mesh", None) is not None or getattr(args, "coordinator", None) is not None:
        from dsv4_jax.parallel.mesh import mesh_from_args
        from dsv4_jax.parallel.rules import DEFAULT_RULES, Layout

        kw["mesh"] = mesh_from_args(args)  # --coordinator alone: 'auto' over every process's devices
        if kw["mesh"] is not None:
            shards = Layout.create(kw["mesh"], DEFAULT_RULES).num_seq_shards
    setup_compile_cache(getattr(args, "compile_cache", None))
    if _is_demo(args.checkpoint) and config.num_blocks is None and config.kv_cache_bytes is None:
        # Memory-sized pools would give the 3-layer demo up to every slot at full context (16K
        # blocks, hundreds of MB on a laptop); it gets one full-context sequence's worth (per
        # sequence shard on a mesh), which still holds many short ones.
        max_len = min(config.max_model_len or DEMO_MAX_POSITIONS, DEMO_MAX_POSITIONS)
        kw["num_blocks"] = cdiv(max_len, config.block_tokens) * shards
        logging.info(
            "demo checkpoint: %d pool blocks (--num-blocks / --kv-cache-bytes to change)", kw["num_blocks"]
        )
    t0 = time.monotonic()
    llm = LLM(
        args.checkpoint,
        profile=args.profile,
        weights=getattr(args, "weights", "auto"),
        kernels=getattr(args, "kernels", "auto"),
        dtype=args.dtype,
        qat=qat_arg(args),
        allow_lossy_kv=getattr(args, "allow_lossy_kv", False),
        **kw,
    )
    logging.info(
        "loaded %s in %.1f s: profile %s, %s, QAT %s, KV %s, max_model_len %d; %s",
        args.checkpoint,
        time.monotonic() - t0,
        args.profile or "balanced",
        llm.held.describe(),
        "on" if llm.qat else "off",
        llm.engine.config.kv_format,
        llm.engine.max_model_len,
        llm.memory.describe(),
    )
    return llm


def join_group(llm):
    """Several processes (``--coordinator``): this one's part in the lockstep group over
    ``llm``'s engine (``engine/runner/lockstep.Group``: process 0 leads, the others follow). Call it
    before the first step, warm-up included."""
    from dsv4_jax.engine.runner.lockstep import Group

    return Group(llm.engine)


def qat_arg(args: argparse.Namespace) -> bool | None:
    """``LLM``'s ``qat``: ``False`` under ``--no-qat``, else the checkpoint's default."""
    return False if getattr(args, "no_qat", False) else None


def _is_demo(checkpoint: str) -> bool:
    return os.path.realpath(checkpoint) == os.path.realpath(DEMO_CHECKPOINT)


def per_kind_bytes(llm) -> dict[str, float] | None:
    """Bytes per token of each compressed pool (for the per-pool gauges), if the model is known."""
    if getattr(llm, "model_config", None) is None:
        return None
    from dsv4_jax.model.accounting import kv_bytes
    from dsv4_jax.model.state import KVFormat

    return dict(kv_bytes(llm.model_config, KVFormat.parse(llm.engine.config.kv_format)).per_kind)


def warm_up(llm, shapes: str = "auto", max_batch: int = 1, max_prefill: int = 64, seed: int = 0) -> float:
    """Compile step shapes before serving; returns the seconds it took. ``shapes="all"`` (the
    default on accelerators): every shape the profile can emit (``LLM.precompile``), and the
    memory plan's temporaries measured; ``"common"`` (default on CPU, where a compile of the
    demo takes seconds): the throw-away requests of the module docstring."""
    import jax

    every = shapes == "all" or (shapes == "auto" and jax.default_backend() != "cpu")
    if every and getattr(llm, "memory", None) is not None:  # an LLM over a real runner
        out = llm.precompile()
        logging.info(
            "compiled %d step shapes in %.1f s; %s",
            out["compiled"],
            out["seconds"],
            llm.memory.describe(),
        )
        return out["seconds"]
    engine = llm.engine
    lim, rng, t0 = engine.limits, random.Random(seed), time.monotonic()
    # with MTP drafts: long enough that prefills ask for drafts and decodes verify them
    k = min(lim.max_draft_tokens, engine.config.speculative_tokens)
    sp = SamplingParams(max_tokens=2 + (2 * k + 2 if k else 0), temperature=0.0, ignore_eos=True)
    budget = lim.max_tokens_per_step

    def run(lengths):
        rids = [engine.add_request([rng.randrange(2, lim.vocab_size) for _ in range(n)], sp) for n in lengths]
        while engine.has_unfinished():
            engine.step()
        for r in rids:
            engine.release(r)

    t = 8
    while t <= min(max_prefill, budget, engine.max_model_len - sp.max_tokens):
        run([t])
        t *= 2
    if max_prefill < 8:
        run([1])
    b = 2
    while b <= min(max_batch, lim.max_batch):
        run([max(1, min(8, budget // b))] * b)
        b *= 2
    engine.reset_prefix_cache()
    dt = time.monotonic() - t0
    logging.info("warm-up: %.1f s", dt)
    return dt


def make_profiler(args, engine):
    """A ``StepProfiler`` for ``--profile-dir`` (engine phases annotated), or None."""
    if not getattr(args, "profile_dir", None):
        return None
    from dsv4_jax.engine.runner.profiler import StepProfiler, instrument

    instrument(engine)
    return StepProfiler(args.profile_dir, args.profile_steps, args.profile_skip_steps)
