"""Engines over the FakeRunner (tests/engine/fake_runner.py) for the server tests, and runners
that script their output, fail on demand or run slowly. (conftest.py puts tests/engine on the path.)"""

import time

from fake_runner import FakeRunner, make_limits

from dsv4_jax.engine.llm_engine import LLMEngine
from dsv4_jax.engine.profiles import EngineConfig

VOCAB = 1006  # the demo tokenizer's size: every fake token decodes


class ScriptedRunner(FakeRunner):
    """The FakeRunner's state checks, but sample k of every request is ``script[k]``."""

    def __init__(self, script, **kw):
        super().__init__(**kw)
        self.script = list(script)

    def execute(self, plan):
        out = super().execute(plan)
        for w in plan.works:
            if w.seq_id in out:
                out[w.seq_id].token = self.script[min(w.sample_index, len(self.script) - 1)]
        return out


class PoisonRunner(FakeRunner):
    """Raises in ``execute`` when a scheduled prompt contains ``poison`` (an engine fault)."""

    def __init__(self, poison=999, **kw):
        super().__init__(**kw)
        self.poison = poison

    def execute(self, plan):
        if any(self.poison in w.tokens for w in plan.works):
            raise RuntimeError("simulated device failure")
        return super().execute(plan)


class SlowRunner(FakeRunner):
    """Every step takes ``delay`` seconds, so requests are still running when a test acts."""

    def __init__(self, delay=0.005, **kw):
        super().__init__(**kw)
        self.delay = delay

    def execute(self, plan):
        time.sleep(self.delay)
        return super().execute(plan)


def fake_engine(tok, runner=None, max_model_len=None, speculative_tokens=0, **limit_kw):
    """An ``LLMEngine`` (checkpoint SWA strategy, prefix cache on) over ``runner``
    (default: a FakeRunner with ``make_limits(vocab_size=VOCAB, **limit_kw)``);
    ``speculative_tokens``: MTP drafts per step at every load (the FakeRunner's fake drafter)."""
    runner = runner or FakeRunner(
        make_limits(vocab_size=VOCAB, max_draft_tokens=speculative_tokens, **limit_kw)
    )
    lim = runner.limits
    cfg = EngineConfig(
        block_tokens=lim.block_tokens,
        swa_strategy="checkpoint",
        checkpoint_interval=2 * lim.block_tokens,
        num_snapshots=lim.num_snapshots,
        speculative_tokens=speculative_tokens,
        spec_off_batch=1 << 20,
    )
    engine = LLMEngine(runner, cfg, tok, max_model_len=max_model_len)
    runner.bind(engine)
    runner.snapshot_interval = cfg.snapshot_interval
    return engine


def make_client(engine, api_key=None, model="demo"):
    """A TestClient over the full app (lifespan starts the engine thread); use as a context manager."""
    from fastapi.testclient import TestClient

    from dsv4_jax.server.api_server import ServerState, build_app
    from dsv4_jax.server.engine_thread import AsyncEngine
    from dsv4_jax.server.metrics import ServerMetrics

    metrics = ServerMetrics(model)
    state = ServerState(AsyncEngine(engine, metrics), model, metrics, api_key=api_key)
    return TestClient(build_app(state), raise_server_exceptions=False), state


def limits(**kw):
    return make_limits(vocab_size=VOCAB, **kw)
