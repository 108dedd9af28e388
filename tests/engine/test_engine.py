"""Engine logic over the contract-checking FakeRunner: batching, budget, chunked prefill,
preemption, cancellation, stress, admission by bytes, refusals, stop conditions, the outputs
a step hands out, step hooks.

Every run is compared with ``reference_generate`` (the fake model run alone, without state),
so any scheduling or state mistake shows up as different tokens or a ``ContractError``.
"""

import contextlib
import random

import pytest
from fake_runner import (
    FakeRunner,
    drain,
    fake_logprobs,
    make_engine,
    make_limits,
    outputs,
    reference_generate,
)

from dsv4_jax import SamplingParams
from dsv4_jax.engine import EngineConfig, LLMEngine, RequestOutput, RequestRefused, StepHook

V = 1000
GREEDY = {"temperature": 0.0, "ignore_eos": True}


def prompt(n, seed):
    r = random.Random(seed)
    return [r.randrange(2, V) for _ in range(n)]


@pytest.mark.parametrize("spec", [0, 3])  # 3: MTP drafts from the fake drafter (fake_runner.py)
def test_mixed_lengths_arriving_at_different_steps_equal_each_request_alone(spec):
    engine, runner = make_engine("recompute", speculative_tokens=spec)
    arrivals = {0: [(5, 12), (40, 7)], 2: [(17, 20)], 3: [(90, 5)], 7: [(3, 30)], 8: [(64, 9), (33, 1)]}
    rids, wants = [], []
    for step in range(400):
        for n, m in arrivals.get(step, []):
            p = prompt(n, seed=n * 31 + m)
            rids.append(engine.add_request(p, SamplingParams(max_tokens=m, **GREEDY)))
            wants.append(reference_generate(p, m, V))
        if step > max(arrivals) and not engine.has_unfinished():
            break
        engine.step()
    assert outputs(engine, rids) == wants
    assert any(len(p.works) > 1 for p in runner.plans)  # really batched
    # prefill chunks and decodes shared steps (continuous batching, not phase-separated)
    assert (
        any(
            {len(w.tokens) for w in p.works} > {1} and 1 in {len(w.tokens) for w in p.works}
            for p in runner.plans
        )
        or spec
    )
    if spec:  # drafts verified, some accepted, some rejected, every position reached
        s = engine.stats()
        assert 0 < s["spec_accepted_tokens"] < s["spec_draft_tokens"]
        assert all(engine.spec_counters["accepted_per_position"])
    assert engine.block_manager.leaks() == []


def test_token_budget_chunked_prefill_and_decodes_first():
    engine, runner = make_engine("recompute", max_tokens_per_step=24, max_batch=4)
    short = engine.add_request(prompt(6, 1), SamplingParams(max_tokens=40, **GREEDY))
    engine.step()
    engine.step()  # `short` is decoding now
    long = engine.add_request(prompt(150, 2), SamplingParams(max_tokens=3, **GREEDY))
    drain(engine)
    assert outputs(engine, [short, long]) == [
        reference_generate(prompt(6, 1), 40, V),
        reference_generate(prompt(150, 2), 3, V),
    ]
    long_seq = engine._seqs[long].seq_id
    chunks = [len(w.tokens) for p in runner.plans for w in p.works if w.seq_id == long_seq and not w.sample]
    assert len(chunks) >= 150 // 24 and max(chunks) <= 24  # the prompt went in budget-sized chunks
    for p in runner.plans:
        assert sum(len(w.tokens) for w in p.works) <= 24
        if any(w.seq_id == long_seq and len(w.tokens) > 1 for w in p.works):
            # while the long prompt prefills, the decoding request still gets its token, first
            assert p.works[0].seq_id == engine._seqs[short].seq_id and len(p.works[0].tokens) == 1


@pytest.mark.parametrize("strategy", ["recompute", "checkpoint", "full", None])
@pytest.mark.parametrize("spec", [0, 3])  # 3: MTP drafts from the fake drafter (fake_runner.py)
def test_preemption_and_resumption_do_not_change_outputs(strategy, spec):
    # 14 blocks of 16 tokens for four requests that grow to ~100 tokens each: decodes run out
    # of blocks and preempt the newest; they resume (via their own cached blocks when caching).
    engine, _ = make_engine(
        strategy or "recompute",
        cache=strategy is not None,
        num_blocks=14,
        num_snapshots=8,
        max_tokens_per_step=48,
        speculative_tokens=spec,
    )
    ps = [prompt(n, 10 + n) for n in (30, 45, 20, 52)]
    sps = [
        SamplingParams(max_tokens=60, **GREEDY),
        SamplingParams(max_tokens=50, temperature=0.8, seed=7),
        SamplingParams(max_tokens=70, **GREEDY),
        SamplingParams(max_tokens=40, temperature=1.0, seed=3),
    ]
    rids = [engine.add_request(p, sp) for p, sp in zip(ps, sps)]
    streamed = drain(engine)
    want = [
        reference_generate(
            p,
            sp.max_tokens,
            V,
            eos=None if sp.ignore_eos else 1,
            temperature=sp.temperature,
            seed=sp.seed or 0,
        )
        for p, sp in zip(ps, sps)
    ]
    assert outputs(engine, rids) == want
    assert [streamed[r] for r in rids] == want  # each token streamed exactly once despite recomputes
    assert engine.stats()["preemptions"] > 0
    assert sum(engine.get_request(r).num_preemptions for r in rids) == engine.stats()["preemptions"]
    assert engine.block_manager.leaks() == []


def test_cancellation_frees_everything_at_once():
    engine, _ = make_engine("full", num_slots=2, max_batch=2)
    rids = [engine.add_request(prompt(40 + i, i), SamplingParams(max_tokens=30, **GREEDY)) for i in range(4)]
    for _ in range(3):
        engine.step()
    assert engine.stats()["requests_running"] == 2 and engine.stats()["requests_waiting"] == 2
    assert engine.abort(rids[0]) and engine.abort(rids[3])  # one running, one waiting
    assert not engine.abort(rids[0]) and not engine.abort("nope")
    out = engine.step()
    assert {(o.request_id, o.finish_reason) for o in out if o.finished} >= {
        (rids[0], "abort"),
        (rids[3], "abort"),
    }
    drain(engine)
    assert outputs(engine, rids[1:3]) == [reference_generate(prompt(40 + i, i), 30, V) for i in (1, 2)]
    assert engine.block_manager.leaks() == []
    engine.reset_prefix_cache()
    st = engine.stats()
    assert st["blocks_free"] == st["blocks_total"] and st["slots_free"] == 2
    assert st["snapshots_free"] == engine.limits.num_snapshots


@pytest.mark.parametrize("strategy", ["recompute", "checkpoint", "full"])
@pytest.mark.parametrize("spec", [0, 3])  # 3: MTP drafts from the fake drafter (fake_runner.py)
def test_random_stress_with_cancellations_returns_every_block_slot_and_snapshot(strategy, spec):
    rng = random.Random({"recompute": 1, "checkpoint": 2, "full": 3}[strategy])
    engine, _ = make_engine(
        strategy,
        num_blocks=16,
        num_slots=3,
        max_batch=3,
        num_snapshots=6,
        max_tokens_per_step=40,
        interval=32,
        speculative_tokens=spec,
    )
    bases = [prompt(120, 100 + i) for i in range(3)]  # shared prefixes → hits, mid-block ones too
    live, aborted = {}, set()
    for step in range(1500):
        if step < 200 and rng.random() < 0.3:
            base = rng.choice(bases)
            p = base[: rng.randrange(1, 120)] + prompt(rng.randrange(0, 30), rng.random())
            sp = SamplingParams(
                max_tokens=rng.randrange(1, 25),
                temperature=rng.choice([0.0, 0.7]),
                seed=rng.randrange(100),
                ignore_eos=rng.random() < 0.5,
            )
            live[engine.add_request(p, sp)] = (p, sp)
        if live and rng.random() < 0.05:
            rid = rng.choice(sorted(live))
            if engine.abort(rid):
                aborted.add(rid)
        engine.step()
        if step >= 200 and not engine.has_unfinished():
            break
    assert not engine.has_unfinished()
    for rid, (p, sp) in live.items():
        got = engine.get_request(rid)
        if rid in aborted:
            assert got.finish_reason.value == "abort"
            continue
        want = reference_generate(
            p, sp.max_tokens, V, eos=None if sp.ignore_eos else 1, temperature=sp.temperature, seed=sp.seed
        )
        assert got.output_token_ids == want, rid
    st = engine.stats()
    assert len(aborted) > (1 if spec else 3) and st["prefix_cache_hits"] > 5 and st["preemptions"] > 0
    assert engine.block_manager.leaks() == []
    engine.reset_prefix_cache()
    st = engine.stats()
    assert (st["blocks_free"], st["slots_free"], st["snapshots_free"]) == (16, 3, 6)
    assert st["blocks_cached"] == 0


def test_admission_control_by_bytes_queues_what_does_not_fit_now_and_refuses_what_never_fits():
    engine, _ = make_engine(
        "recompute", num_blocks=10, bytes_per_block=4096, bytes_per_slot=65536, max_tokens_per_step=128
    )
    with pytest.raises(
        RequestRefused, match=r"needs up to 12 blocks .*49,152 B.* pool holds 10 blocks .*40,960 B"
    ):
        engine.add_request(prompt(100, 0), SamplingParams(max_tokens=90))
    a = engine.add_request(prompt(80, 1), SamplingParams(max_tokens=10, **GREEDY))  # 6 blocks
    b = engine.add_request(prompt(80, 2), SamplingParams(max_tokens=10, **GREEDY))
    engine.step()
    st = engine.stats()
    assert (st["requests_running"], st["requests_waiting"]) == (1, 1)
    reason = engine._seqs[b].wait_reason
    assert "needs 6 new blocks + 1 slot" in reason and "4 blocks" in reason and "16.00 KiB" in reason
    assert st["kv_bytes_in_use"] == 6 * 4096 + 65536
    drain(engine)
    assert outputs(engine, [a, b]) == [reference_generate(prompt(80, s), 10, V) for s in (1, 2)]


def test_refusals_name_the_limit():
    engine, _ = make_engine("recompute", max_blocks_per_seq=8)  # 128-token context
    with pytest.raises(RequestRefused, match=r"128 tokens; the context limit is 128 .*max_blocks_per_seq=8"):
        engine.add_request(prompt(128, 0))
    engine2, _ = make_engine("recompute", max_model_len=100)
    with pytest.raises(RequestRefused, match=r"context limit is 100 tokens .*max_model_len=100"):
        engine2.add_request(prompt(100, 0))
    with pytest.raises(RequestRefused, match="empty"):
        engine.add_request([])
    with pytest.raises(RequestRefused, match=r"token id 1000 is outside the vocabulary \[0, 1000\)"):
        engine.add_request([5, 1000])
    with pytest.raises(RequestRefused, match="tokenizer"):
        engine.add_request("text without a tokenizer")
    with pytest.raises(RequestRefused, match="stop strings need a tokenizer"):
        engine.add_request([5], SamplingParams(stop=("x",)))
    with pytest.raises(RequestRefused, match="SamplingParams"):
        engine.add_request([5], {"max_tokens": 3})
    for bad, field in [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"logprobs": 99}, "logprobs"),
    ]:
        with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
            SamplingParams(**bad)
    assert not engine.has_unfinished()


@pytest.mark.parametrize("spec", [0, 3])  # 3: MTP drafts from the fake drafter (fake_runner.py)
def test_generation_is_capped_at_the_context_limit(spec):
    engine, _ = make_engine("recompute", max_blocks_per_seq=4, speculative_tokens=spec)  # 64 tokens
    rid = engine.add_request(prompt(60, 3), SamplingParams(max_tokens=50, **GREEDY))
    drain(engine)
    req = engine.get_request(rid)
    assert len(req.output_token_ids) == 4 and req.finish_reason.value == "length"
    assert req.output_token_ids == reference_generate(prompt(60, 3), 4, V)


@pytest.mark.parametrize("spec", [0, 3])  # 3: MTP drafts from the fake drafter (fake_runner.py)
def test_stop_conditions_eos_stop_tokens_max_tokens(spec):
    p = prompt(20, 5)
    ref = reference_generate(p, 40, V)
    engine, _ = make_engine("recompute", eos_token_id=ref[5], speculative_tokens=spec)
    eos = engine.add_request(p, SamplingParams(max_tokens=40, temperature=0))
    ign = engine.add_request(p, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    stop = engine.add_request(
        p, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop_token_ids=(ref[3], 999999))
    )
    drain(engine)
    r = {k: engine.get_request(k) for k in (eos, ign, stop)}
    first = lambda t: ref.index(t) + 1
    assert r[eos].output_token_ids == ref[: first(ref[5])] and r[eos].finish_reason.value == "stop"
    assert r[ign].output_token_ids == ref and r[ign].finish_reason.value == "length"
    n = min(first(ref[3]), first(ref[5]) if ref[5] == ref[3] else 99)
    assert r[stop].output_token_ids == ref[:n] and r[stop].stop_reason == ref[3]


def test_runner_limits_drive_the_engine_and_config_must_agree():
    runner = FakeRunner(make_limits(num_snapshots=0))
    with pytest.raises(ValueError, match="num_snapshots=0"):
        LLMEngine(runner, EngineConfig(block_tokens=16, swa_strategy="full"))
    with pytest.raises(ValueError, match="not a multiple of block_tokens=16"):
        LLMEngine(
            FakeRunner(make_limits()),
            EngineConfig(block_tokens=8, swa_strategy="checkpoint", checkpoint_interval=24),
        )
    engine = LLMEngine(runner, EngineConfig(block_tokens=16, swa_strategy="recompute"))
    assert engine.scheduler.max_running == 4 and engine.max_model_len == 32 * 16


def test_outputs_carry_each_delta_its_logprobs_and_the_counts_so_far():
    p = prompt(40, 8)  # two full 16-token blocks for the second request to hit
    engine, _ = make_engine("checkpoint")
    a = engine.add_request(p, SamplingParams(max_tokens=9, logprobs=2, **GREEDY))
    b = engine.add_request(p[:20], SamplingParams(max_tokens=3, **GREEDY))
    outs: dict[str, list[RequestOutput]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    c = engine.add_request(p, SamplingParams(max_tokens=2, **GREEDY))  # after `a` published its blocks
    hits_before = engine.stats()["prefix_cache_hit_tokens"]
    for o in drain_outputs(engine):
        outs.setdefault(o.request_id, []).append(o)
    for rid, n_prompt in ((a, 40), (b, 20), (c, 40)):
        req, os_ = engine.get_request(rid), outs[rid]
        assert [o.finished for o in os_] == [False] * (len(os_) - 1) + [True]
        assert [t for o in os_ for t in o.token_ids] == req.output_token_ids
        counts = [o.num_output_tokens for o in os_]
        assert counts == [sum(len(o.token_ids) for o in os_[: i + 1]) for i in range(len(os_))]
        assert {o.num_prompt_tokens for o in os_} == {n_prompt}
        assert os_[-1].finish_reason == "length" and os_[-1].metrics is req.metrics and os_[-1].error is None
    want = [fake_logprobs(t, 2, V) for t in engine.get_request(a).output_token_ids]
    assert [x for o in outs[a] for x in o.logprobs] == want and len(want) == 9
    assert all(o.logprobs is None for o in outs[b] + outs[c])  # not asked for
    assert outs[a][-1].num_cached_tokens == 0 and outs[b][-1].num_cached_tokens == 0
    assert outs[c][-1].num_cached_tokens == 32 == engine.stats()["prefix_cache_hit_tokens"] - hits_before


def drain_outputs(engine):
    while engine.has_unfinished():
        yield from engine.step()


def test_abort_hands_back_the_callers_reason_on_the_final_output():
    engine, _ = make_engine("recompute")
    rid = engine.add_request(prompt(10, 1), SamplingParams(max_tokens=50, **GREEDY))
    got = [o for _ in range(3) for o in engine.step()]
    why = RuntimeError("shutting down")
    assert engine.abort(rid, error=why) and not engine.abort(rid, error=ValueError())
    (last,) = engine.step()
    assert (last.request_id, last.finished, last.finish_reason, last.error) == (rid, True, "abort", why)
    assert last.token_ids == [] and last.num_output_tokens == got[-1].num_output_tokens == len(got)


class Recorder(StepHook):
    """Logs entering and leaving each phase, and the plans ``execute`` sees."""

    def __init__(self, name, log):
        self.name, self.log, self.plans = name, log, []

    @contextlib.contextmanager
    def _span(self, phase):
        self.log.append((self.name, phase, "enter"))
        yield
        self.log.append((self.name, phase, "exit"))

    def schedule(self):
        return self._span("schedule")

    def execute(self, plan):
        self.plans.append(plan)
        return self._span("execute")

    def commit(self):
        return self._span("commit")

    def postprocess(self):
        return self._span("postprocess")


def test_step_hooks_wrap_the_phases_in_order_and_see_the_plan():
    engine, runner = make_engine("recompute")
    log = []
    outer, inner = Recorder("outer", log), Recorder("inner", log)
    engine.add_step_hook(outer)
    engine.add_step_hook(inner)
    assert engine.step_hooks == (outer, inner)
    nest = [("outer", "enter"), ("inner", "enter"), ("inner", "exit"), ("outer", "exit")]  # first = outermost
    assert engine.step() == [] and log == [(h, "schedule", e) for h, e in nest]  # nothing to run
    log.clear()
    engine.add_request(prompt(30, 2), SamplingParams(max_tokens=4, **GREEDY))
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    per_step = [(h, ph, e) for ph in ("schedule", "execute", "commit", "postprocess") for h, e in nest]
    assert log == per_step * steps
    assert outer.plans == inner.plans == runner.plans and len(runner.plans) == steps  # the very plans run

    class OnlyExecute(StepHook):  # the other phases keep StepHook's no-ops
        def execute(self, plan):
            sizes.append(len(plan.works))
            return contextlib.nullcontext()

    sizes = []
    engine.remove_step_hook(outer)
    engine.remove_step_hook(inner)
    engine.add_step_hook(OnlyExecute())
    log.clear()
    rid = engine.add_request(prompt(5, 3), SamplingParams(max_tokens=2, **GREEDY))
    drain(engine)
    assert log == [] and sizes == [1, 1] and len(engine.get_request(rid).output_token_ids) == 2
    with pytest.raises(TypeError, match="phase methods"):
        engine.add_step_hook(object())


def test_profiler_instruments_through_a_step_hook_and_patches_nothing():
    from dsv4_jax.engine.runner.profiler import PhaseAnnotations, instrument

    engine, runner = make_engine("recompute")
    scheduler = engine.scheduler
    instrument(engine)
    instrument(engine)  # once per engine
    assert [type(h) for h in engine.step_hooks] == [PhaseAnnotations]
    assert engine.runner is runner and engine.scheduler is scheduler
    assert not {"schedule", "commit"} & set(vars(scheduler)) and "execute" not in vars(runner)
    rid = engine.add_request(prompt(20, 4), SamplingParams(max_tokens=5, **GREEDY))
    drain(engine)
    assert outputs(engine, [rid]) == [reference_generate(prompt(20, 4), 5, V)]
