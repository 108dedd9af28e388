"""Grammar masks, logit bias and prompt logprobs on 8 fake devices (``data=2,expert=4``), with and
without MTP drafts: the same tokens (and logprobs to 1e-3) as one device. On a speculative runner a
constrained row is verified inside the one speculative call, its mask filled before the dispatch
(runner/model_runner.py ``_run_group``); a prompt-logprobs chunk takes the split path there too."""

import functools
import json

import llguidance
import numpy as np
import pytest
from test_speculative_on_mesh import BT, DEMO, runner

from dsv4_jax.checkpoint.tokenizer import load_tokenizer
from dsv4_jax.engine import EngineConfig, LLMEngine
from dsv4_jax.engine.sampling_params import SamplingParams
from dsv4_jax.parallel.mesh import parse_mesh

SCHEMA = {
    "type": "object",
    "properties": {
        "k": {"type": "string", "enum": ["alpha", "beta"]},
        "n": {"type": "integer", "enum": [1, 2, 3]},
    },
    "required": ["k", "n"],
    "additionalProperties": False,
}


@functools.cache
def tok():
    return load_tokenizer(DEMO)


def run(r, k=0):
    e = LLMEngine(
        r, EngineConfig(block_tokens=BT, swa_strategy="full", speculative_tokens=k, spec_off_batch=64), tok()
    )
    g = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    rng = np.random.RandomState(3)
    p = [rng.randint(2, 1000, n).tolist() for n in (150, 37, 60, 200)]
    base = dict(temperature=0.0, logprobs=0)
    jobs = [
        (p[0], SamplingParams(max_tokens=40, grammar=g, **base)),
        (p[1], SamplingParams(max_tokens=12, ignore_eos=True, logit_bias=((7, 100.0),), **base)),
        (p[2], SamplingParams(max_tokens=12, ignore_eos=True, **base)),
        (p[3], SamplingParams(max_tokens=4, ignore_eos=True, prompt_logprobs=2, **base)),
    ]
    rids = [e.add_request(q, sp) for q, sp in jobs]
    while e.has_unfinished():
        e.step()
    assert e.block_manager.leaks() == []
    return [e.get_request(r) for r in rids]


@functools.cache
def one_device():
    return run(runner())


# In make test-slow (CI time: make test must stay under 25 min). make test covers grammar masks,
# bias and prompt logprobs on one device (tests/engine/test_constrained.py) and the mesh's steps
# with the same split path (test_serving_on_mesh.py, test_speculative_on_mesh.py).
@pytest.mark.slow
@pytest.mark.parametrize("k", [0, 3])
def test_constraints_bias_and_prompt_logprobs_on_8_devices_equal_one_device(k):
    want = one_device()
    got = run(runner(parse_mesh("data=2,expert=4,tensor=1"), k=k), k=k)
    for g, w in zip(got, want):
        assert g.output_token_ids == w.output_token_ids
        assert max(abs(a[0] - b[0]) for a, b in zip(g.logprobs, w.logprobs)) < 1e-3
    assert got[1].output_token_ids == [7] * 12
    assert set(json.loads(got[0].output_text)) == {"k", "n"}
    gp, wp = got[3].prompt_logprobs, want[3].prompt_logprobs
    assert gp[0] is None and len(gp) == 200
    np.testing.assert_allclose([x[0] for x in gp[1:]], [x[0] for x in wp[1:]], atol=1e-3)
