"""MTP speculative decoding on 8 fake devices (``data=2,expert=4``): greedy tokens and logprobs
equal one device serving without drafts, with drafts from the oracle (accepted and rejected
ones, tests/spec_utils.py) on pools split by sequence shard."""

import functools

import jax.numpy as jnp
import numpy as np
from spec_utils import OracleDrafts, pattern

from dsv4_jax.checkpoint import load_checkpoint
from dsv4_jax.engine import EngineConfig, LLMEngine
from dsv4_jax.engine.runner.model_runner import JaxModelRunner
from dsv4_jax.engine.sampling_params import SamplingParams
from dsv4_jax.parallel.mesh import parse_mesh

DEMO = "checkpoints/demo"
BT = 128


@functools.cache
def demo():
    return load_checkpoint(DEMO, jnp.float32)


def runner(mesh=None, k=0):
    cfg, params = demo()
    return JaxModelRunner(
        cfg,
        params,
        num_slots=8,
        num_blocks=32,
        block_tokens=BT,
        max_blocks_per_seq=4,
        num_snapshots=8,
        max_batch=8,
        max_tokens_per_step=512,
        dtype=jnp.float32,
        mesh=mesh,
        speculative_tokens=k,
    )


def run(r, reqs, k=0):
    e = LLMEngine(
        r, EngineConfig(block_tokens=BT, swa_strategy="full", speculative_tokens=k, spec_off_batch=64)
    )
    sp = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=0)
    rids = [e.add_request(p, sp) for p in reqs]
    while e.has_unfinished():
        e.step()
    out = [e.get_request(r) for r in rids]
    return [(q.output_token_ids, [lp for lp, _ in q.logprobs]) for q in out], e


def test_drafts_on_8_devices_equal_one_device_without():
    rng = np.random.RandomState(1)
    reqs = [rng.randint(2, 1000, n).tolist() for n in (150, 37, 60, 129)]
    want, _ = run(runner(), reqs)
    truth = {i: p + t for i, (p, (t, _)) in enumerate(zip(reqs, want))}
    got, e = run(
        OracleDrafts(runner(parse_mesh("data=2,expert=4,tensor=1"), k=3), truth, pattern(11)), reqs, k=3
    )
    for (gt, glp), (wt, wlp) in zip(got, want):
        assert gt == wt
        assert max(abs(a - b) for a, b in zip(glp, wlp)) < 1e-3  # expert-parallel sums in another order
    s = e.stats()
    assert 0 < s["spec_accepted_tokens"] < s["spec_draft_tokens"]
    assert e.block_manager.leaks() == []
