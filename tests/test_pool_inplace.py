"""A decode step updates the paged pools and the slot stores in place: its cost must not grow
with the pool or the number of slots.

Regression test for the bug in docs/PERF.md "Decode": a scatter into a bf16 / FP8 pool was
compiled by XLA's CPU backend as convert(pool) → dynamic-update-slice → convert back plus a
copy, so every decode step read and rewrote every pool whole (1.2 s per step at 16,384
blocks). The check reads the compiled HLO of a donated decode step, as the runner compiles it:

* every state leaf is aliased to an output (donation took effect);
* no instruction of the entry computation produces a whole pool except the in-place updates:
  no ``copy``, no ``convert`` (also inside fusions), nothing but a scatter / dynamic-update-slice.

The same holds for the per-slot stores (SWA rings, compressor tails): they are read (the
slot's old rows) and written in one step, and XLA copied each whole store twice per step until
the written rows were made to depend on the reads (``attention_state._after``).
"""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax import init_params, preset
from dsv4_jax.model import state as kvc
from dsv4_jax.model.transformer import forward

NUM_BLOCKS = 37  # an odd size, so no other array of the model has it as its leading dim
NUM_SLOTS = 11  # likewise for the slot stores


def _compiled_decode_step(fmt: str, batch: int) -> tuple[str, int]:
    """(compiled HLO text, number of state leaves), compiled in a fresh interpreter.

    In the full suite's process (hundreds of compiles before it, the persistent compile cache
    switched on by the script tests) XLA:CPU crashed while compiling this step three runs in
    a row, and never when the file runs alone; a subprocess gives it the state it has alone."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = (
        f"import sys; sys.path.insert(0, {here!r}); import conftest, test_pool_inplace as t; "
        f"hlo, n = t._compile_here({fmt!r}, {batch}); sys.stdout.write(str(n) + chr(10) + hlo)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    n, hlo = out.stdout.split("\n", 1)
    return hlo, int(n)


def _compile_here(fmt: str, batch: int) -> tuple[str, int]:
    cfg = preset("tiny")
    params = init_params(cfg, jax.random.PRNGKey(0))
    cc = kvc.CacheConfig(
        num_slots=NUM_SLOTS,
        num_blocks=NUM_BLOCKS,
        max_blocks_per_seq=3,
        block_tokens=32,
        fmt=kvc.KVFormat.parse(fmt),
        dtype=jnp.bfloat16,
    )
    state = jax.eval_shape(lambda: kvc.init_state(cfg, cc))
    step = jax.jit(
        lambda p, t, q, s, m: forward(p, t, q, s, m, cfg=cfg, cache=cc, last_only=True), donate_argnums=(3,)
    )
    meta = kvc.StepMeta(
        np.arange(batch, dtype=np.int32), np.zeros((batch, 3), np.int32), np.ones(batch, np.int32)
    )
    tok = np.zeros((batch, 1), np.int32)
    return step.lower(params, tok, tok, state, meta).compile().as_text(), len(jax.tree.leaves(state))


def _fusion_bodies(hlo: str) -> dict[str, str]:
    """Computation name → its text, to look inside fusions."""
    bodies, name, lines = {}, None, []
    for line in hlo.splitlines():
        m = re.match(r"^%?([\w.\-]+) .*\{$", line)
        if m and not line.startswith(" "):
            name, lines = m.group(1), []
        elif line == "}" and name:
            bodies[name] = "\n".join(lines)
            name = None
        elif name:
            lines.append(line)
    return bodies


@pytest.mark.parametrize("fmt, batch", [("bf16", 1), ("fp8", 1), ("fp8-fp4", 2)])
def test_decode_step_updates_pools_in_place(fmt, batch):
    hlo, num_state_leaves = _compiled_decode_step(fmt, batch)
    header = hlo.splitlines()[0]
    aliased = re.findall(r"\{\d+\}: \((\d+),", header)
    assert len(aliased) == num_state_leaves, "every donated state leaf must alias an output"

    bodies = _fusion_bodies(hlo)
    entry = hlo[hlo.index("\nENTRY") :]
    pool_shape = re.compile(rf"= \w+\[({NUM_BLOCKS}|{NUM_SLOTS}),")
    bad = []
    for line in entry.splitlines():
        if not pool_shape.search(line) or " parameter(" in line:
            continue
        op = re.search(r"= \S+ ([\w\-]+)\(", line).group(1)
        if op == "fusion":
            body = bodies[re.search(r"calls=%([\w.\-]+)", line).group(1)]
            pool_ops = [ln for ln in body.splitlines() if pool_shape.search(ln) and " parameter(" not in ln]
            ok = all(re.search(r"= \S+ (scatter|dynamic-update-slice|bitcast)\(", ln) for ln in pool_ops)
            ok = ok and re.search(r"(scatter|dynamic-update-slice)\(", body) is not None
        else:
            ok = op in ("scatter", "dynamic-update-slice", "bitcast", "tuple", "get-tuple-element")
        if not ok:
            bad.append(line.strip()[:200])
    assert not bad, "whole-pool / whole-store ops besides the in-place update:\n" + "\n".join(bad)
