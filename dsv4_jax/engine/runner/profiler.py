"""Profiler traces of engine steps: ``--profile-dir DIR`` on serve, generate and benchmark.

``StepProfiler`` wraps ``num_steps`` consecutive engine steps (after skipping
``skip_steps`` busy ones, so JIT compilation of the first shapes stays out of the window)
in ``jax.profiler.start_trace`` / ``stop_trace``. Inside the window:

* each step is a ``StepTraceAnnotation("engine_step", step_num=n)`` (TensorBoard's and
  xprof's step view key on this name);
* ``instrument(engine)`` registers a step hook (``LLMEngine.add_step_hook``) that names the
  phases of ``LLMEngine.step`` as trace annotations: ``scheduler.schedule``,
  ``model_runner.execute`` (with the number of sequences, tokens and decodes),
  ``scheduler.commit``; the rest of a step is postprocessing (detokenize, stop checks);
* the device work carries the model's ``jax.named_scope`` names (``layer1_csa/attn/indexer``,
  ``layer2_hca/moe/experts``, ``head``...): XLA keeps them in each op's metadata, which the
  ``.xplane.pb`` holds and xprof shows per op (trace viewer, op profile, HLO op stats), so the
  trace reads like ``model.py``. (The perfetto JSON has the annotations above but only XLA's
  fusion names for device ops.)

The trace lands in ``DIR/plugins/profile/<timestamp>/`` (TOOLCHAIN.md §8):
``<host>.xplane.pb`` for xprof / TensorBoard's profile plugin (``xprof --logdir DIR``, or
``tensorboard --logdir DIR`` with ``tensorboard-plugin-profile``), and
``perfetto_trace.json.gz`` for https://ui.perfetto.dev. Neither viewer is a dependency.

This module imports jax, so it lives in ``engine/runner/``: the engine's own modules stay
host-only, and the hook is how device-side tooling sees their phases.
"""

from __future__ import annotations

import contextlib
import glob
import os

import jax
from absl import logging

from dsv4_jax.engine.llm_engine import StepHook


def _describe_plan(plan) -> dict:
    works = plan.works
    return {
        "num_seqs": len(works),
        "num_tokens": sum(len(w.tokens) for w in works),
        "num_decode": sum(len(w.tokens) == 1 for w in works),
    }


class PhaseAnnotations(StepHook):
    """Each phase of a step as a ``jax.profiler.TraceAnnotation`` (free while no trace is
    active). Postprocessing stays unnamed: it is the step's time outside the three."""

    def schedule(self):
        return jax.profiler.TraceAnnotation("scheduler.schedule")

    def execute(self, plan):
        return jax.profiler.TraceAnnotation("model_runner.execute", **_describe_plan(plan))

    def commit(self):
        return jax.profiler.TraceAnnotation("scheduler.commit")


def instrument(engine) -> None:
    """Name the phases of ``engine.step`` in traces (once per engine: a second call does
    nothing)."""
    if not any(isinstance(h, PhaseAnnotations) for h in engine.step_hooks):
        engine.add_step_hook(PhaseAnnotations())


class StepProfiler:
    def __init__(self, log_dir: str, num_steps: int = 10, skip_steps: int = 0):
        if num_steps < 1:
            raise ValueError(f"--profile-steps must be >= 1, got {num_steps}")
        self.log_dir = os.path.abspath(log_dir)
        self.num_steps, self.skip_steps = num_steps, skip_steps
        self._seen = 0  # busy steps seen
        self._active = False
        self.done = False
        self.trace_dirs: list[str] = []

    @contextlib.contextmanager
    def step(self):
        """Wrap one engine step."""
        n = self._seen
        self._seen += 1
        if self.done or n < self.skip_steps:
            yield
            return
        if not self._active:
            os.makedirs(self.log_dir, exist_ok=True)
            opts = jax.profiler.ProfileOptions()
            opts.python_tracer_level = 0  # Python call tracing makes traces 100x larger and steps slower
            jax.profiler.start_trace(self.log_dir, create_perfetto_trace=True, profiler_options=opts)
            self._active = True
            logging.info("profiler: tracing %d engine steps into %s", self.num_steps, self.log_dir)
        try:
            with jax.profiler.StepTraceAnnotation("engine_step", step_num=n):
                yield
        finally:
            if n + 1 >= self.skip_steps + self.num_steps:
                self.close()

    def close(self) -> None:
        """Stop an active trace (also at shutdown, if fewer steps ran than asked for)."""
        if not self._active:
            return
        self._active, self.done = False, True
        jax.profiler.stop_trace()
        self.trace_dirs = sorted(glob.glob(os.path.join(self.log_dir, "plugins", "profile", "*")))
        where = self.trace_dirs[-1] if self.trace_dirs else self.log_dir
        logging.info(
            "profiler: trace written to %s (open with `xprof --logdir %s`, or load "
            "perfetto_trace.json.gz in ui.perfetto.dev)",
            where,
            self.log_dir,
        )
