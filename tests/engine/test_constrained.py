"""Grammar masks, logit bias and prompt logprobs on the demo checkpoint, through the engine.

Each feature is data in the jitted sampler (runner/sampling.py, runner/steps.py), so the
checks here are about the serving paths: constrained and free rows in one batch, under
preemption and prefix hits, with no program compiled per grammar; a bias changes only its
own row; prompt logprobs equal a teacher-forced forward of the whole sequence, also when the
prompt runs in several chunks and when the prefix cache holds it.
"""

import dataclasses
import functools
import json

import jax.numpy as jnp
import llguidance
import numpy as np
import pytest
from test_e2e_demo import BT, DEMO, Limited, demo, shared_runner, toks

from dsv4_jax.checkpoint.tokenizer import load_tokenizer
from dsv4_jax.engine import EngineConfig, LLMEngine
from dsv4_jax.engine.request import RequestRefused
from dsv4_jax.engine.sampling_params import SamplingParams
from dsv4_jax.model.transformer import forward

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "n": {"type": "integer", "minimum": 0, "maximum": 999},
    },
    "required": ["name", "n"],
    "additionalProperties": False,
}


@functools.cache
def tok():
    return load_tokenizer(DEMO)


def grammar(schema=SCHEMA) -> str:
    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})


def engine(strategy="recompute", **limits) -> LLMEngine:
    r = Limited(shared_runner("f32"), **limits)
    cfg = EngineConfig(block_tokens=BT, swa_strategy=strategy, num_snapshots=r.limits.num_snapshots)
    return LLMEngine(r, cfg, tok())


def run(e: LLMEngine, jobs) -> list:
    rids = [e.add_request(p, sp) for p, sp in jobs]
    while e.has_unfinished():
        e.step()
    return [e.release(r) for r in rids]


def valid(text: str, schema=SCHEMA) -> dict:
    obj = json.loads(text)
    assert set(obj) == set(schema["required"]) and isinstance(obj["n"], int) and isinstance(obj["name"], str)
    assert len(obj["name"]) <= 10
    return obj


PROMPT = tok().encode("def parse(line):\n    return").ids


def test_constrained_and_free_rows_share_a_batch_and_free_rows_are_unchanged():
    free = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    alone = run(engine(), [(PROMPT, free)])[0].output_token_ids
    jobs = [
        (PROMPT, SamplingParams(temperature=0.0, max_tokens=48, grammar=grammar())),
        (PROMPT, free),
        (toks(40, 3), SamplingParams(temperature=1.0, seed=7, max_tokens=48, grammar=grammar())),
    ]
    a, b, c = run(engine(), jobs)
    for r in (a, c):
        assert r.finish_reason.value == "stop" and r.output_token_ids[-1] == 1  # ended by EOS once complete
        valid(r.output_text)
    assert b.output_token_ids == alone
    # seeded sampling under a grammar is reproducible
    again = run(engine(), [jobs[2]])[0]
    assert again.output_token_ids == c.output_token_ids


def test_a_new_grammar_compiles_no_new_program():
    e = engine()
    run(e, [(PROMPT, SamplingParams(temperature=0.0, max_tokens=40, grammar=grammar()))])
    n = shared_runner("f32").compilations
    other = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    (r,) = run(e, [(PROMPT, SamplingParams(temperature=0.0, max_tokens=40, grammar=grammar(other)))])
    assert json.loads(r.output_text)["ok"] in (True, False)
    assert shared_runner("f32").compilations == n


@pytest.mark.parametrize("strategy", ["full", "recompute"])
def test_constrained_outputs_survive_preemption_and_prefix_hits(strategy):
    sp = SamplingParams(temperature=0.0, max_tokens=60, grammar=grammar())
    # each prompt ends a few tokens before its 2nd block does: the outputs need a 3rd, 9 > 7 blocks
    ps = [toks(2 * BT - 4 - i - len(PROMPT), 40 + i) + PROMPT for i in range(3)]
    want = [run(engine(strategy), [(p, sp)])[0].output_token_ids for p in ps]
    e = engine(strategy, num_blocks=7, max_tokens_per_step=128)
    got = run(e, [(p, sp) for p in ps])
    assert e.stats()["preemptions"] > 0
    assert [r.output_token_ids for r in got] == want
    for r in got:
        valid(r.output_text)
    hit = run(e, [(ps[0], sp)])[0]  # its prompt's blocks are in the cache now
    assert e.stats()["prefix_cache_hit_tokens"] > 0 and hit.output_token_ids == want[0]
    assert e.block_manager.leaks() == []


def test_a_grammar_that_does_not_compile_is_refused_by_name():
    with pytest.raises(RequestRefused, match="grammar"):
        engine().add_request(
            PROMPT, SamplingParams(grammar='{"grammars": [{"lark_grammar": "start: @nope"}]}')
        )


def test_logit_bias_forces_and_bans_only_in_its_own_row():
    free = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    base = run(engine(), [(PROMPT, free)])[0].output_token_ids
    forced = 500
    jobs = [
        (PROMPT, dataclasses.replace(free, logit_bias=((forced, 100.0),))),
        (PROMPT, dataclasses.replace(free, logit_bias=tuple((t, -100.0) for t in set(base)))),
        (PROMPT, free),
    ]
    a, b, c = run(engine(), jobs)
    assert a.output_token_ids == [forced] * 6
    assert not set(b.output_token_ids) & set(base)
    assert c.output_token_ids == base
    with pytest.raises(RequestRefused, match="logit_bias token id 5000"):
        engine().add_request(PROMPT, dataclasses.replace(free, logit_bias=((5000, 1.0),)))


def teacher_forced(ids: list[int]) -> np.ndarray:
    """log p(ids[p] | ids[:p]) for p >= 1, from one full-sequence forward (no state)."""
    cfg, params = demo(jnp.float32)
    x = np.asarray(ids, np.int32)[None]
    logits = np.asarray(
        forward(params, x, np.arange(len(ids), dtype=np.int32)[None], cfg=cfg)[0][0], np.float64
    )
    lse = np.logaddexp.reduce(logits, axis=-1)
    return logits[np.arange(len(ids) - 1), x[0, 1:]] - lse[:-1]


def test_prompt_logprobs_equal_teacher_forcing_in_chunks_and_past_the_prefix_cache():
    p = toks(300, 50)
    want = teacher_forced(p)
    e = engine(max_tokens_per_step=128)  # the prompt runs in 3 chunks
    run(e, [(p, SamplingParams(temperature=0.0, max_tokens=2))])  # fills the prefix cache
    hits = e.stats()["prefix_cache_hit_tokens"]
    sp = SamplingParams(temperature=0.0, max_tokens=0, prompt_logprobs=3)
    (r,) = run(e, [(p, sp)])
    assert e.stats()["prefix_cache_hit_tokens"] == hits  # scoring reads no hit
    assert r.output_token_ids == [] and r.finish_reason.value == "length"
    got = r.prompt_logprobs
    assert got[0] is None and len(got) == len(p)
    np.testing.assert_allclose([g[0] for g in got[1:]], want, atol=1e-4)
    for g in got[1:]:
        assert len(g[1]) == 3 and g[1][0][1] >= g[0] - 1e-6  # the top alternative is at least as likely
    # with generation: the same prompt logprobs, then tokens as usual
    (r2,) = run(e, [(p, dataclasses.replace(sp, max_tokens=3))])
    assert len(r2.output_token_ids) == 3
    np.testing.assert_allclose([g[0] for g in r2.prompt_logprobs[1:]], want, atol=1e-4)
