"""The engine's device side (docs/CODE_MAP.md): the only part of ``engine/`` that imports jax.

* ``model_runner`` ``JaxModelRunner``: a ``StepPlan`` → jitted ``step(params, state, batch)``
* ``layout``       where the runner's arrays live on a mesh; how a step's rows are ordered
* ``sampling``     batched, jittable sampling with per-request seeds; logprobs
* ``lookahead``    which decode step may be dispatched before the engine asks for it
* ``profiler``     ``jax.profiler`` traces of engine steps, attached as a step hook
"""
