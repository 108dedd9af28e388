"""The model runner on 8 fake devices serves the demo checkpoint exactly as on one device.

The checkpoint goes through orbax and is restored straight onto the mesh; one plan script
(batched chunked prefill, decode, an SWA snapshot saved on one shard and restored on
another, a repetition penalty, logprobs) runs on a one-device runner and on a
``data=2,expert=4`` runner, and every sampled token must agree.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sharding_cases import collectives, forbidden, gathered

from dsv4_jax.checkpoint import convert, load_checkpoint
from dsv4_jax.engine.runner.model_runner import JaxModelRunner
from dsv4_jax.engine.runner_api import SeqWork, StepPlan
from dsv4_jax.engine.sampling_params import SamplingParams
from dsv4_jax.parallel.mesh import parse_mesh
from dsv4_jax.parallel.rules import Layout

DEMO = "checkpoints/demo"
MESH = "data=2,expert=4,tensor=1"
GREEDY = SamplingParams(temperature=0.0, max_tokens=64)


@pytest.fixture(scope="module")
def demo_on_mesh(tmp_path_factory):
    dst = str(tmp_path_factory.mktemp("orbax") / "demo")
    convert(DEMO, dst, storage="packed")
    mesh = parse_mesh(MESH)
    cfg, params = load_checkpoint(dst, jnp.float32, mesh=mesh)
    return cfg, params, mesh


@functools.cache
def demo():
    return load_checkpoint(DEMO, jnp.float32)


def make_runner(cfg, params, mesh):
    return JaxModelRunner(
        cfg,
        params,
        num_slots=8,
        num_blocks=16,
        block_tokens=128,
        max_blocks_per_seq=2,
        num_snapshots=8,
        max_batch=8,
        max_tokens_per_step=1024,
        dtype=jnp.float32,
        mesh=mesh,
    )


def test_orbax_restores_straight_into_the_layout(demo_on_mesh):
    """Every restored leaf already has the layout's sharding (the runner moves nothing) and each
    device holds only its own piece."""
    cfg, params, mesh = demo_on_mesh
    want = Layout.create(mesh).param_shardings(params, cfg)
    for leaf, sh in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        assert leaf.sharding.is_equivalent_to(sh, leaf.ndim), (leaf.sharding, sh)
        assert all(s.data.shape == sh.shard_shape(leaf.shape) for s in leaf.addressable_shards)
    w1 = params["layers"][1]["ffn"]["experts"]["w1"]["weight"]
    assert w1.addressable_shards[0].data.shape[0] == cfg.n_routed_experts // 4
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(demo()[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def script(runner, vocab: int) -> list:
    """Prefill three sequences (one with a huge repetition penalty, one with logprobs) and a
    128-token prefix saved as snapshot 3, decode five steps, then resume a sequence sharing
    the prefix from that snapshot in a slot on another shard. Returns every output."""
    rng = np.random.RandomState(0)
    p = {i: list(rng.randint(2, vocab, n)) for i, n in ((1, 150), (2, 37), (3, 60), (4, 128))}
    penal = SamplingParams(temperature=0.0, repetition_penalty=1e6, max_tokens=64)
    lp = SamplingParams(temperature=0.0, logprobs=2, max_tokens=64)
    seqs = {1: (1, [2, 3], GREEDY), 2: (4, [8], lp), 3: (6, [12], penal)}  # id: slot, blocks, sampling
    works = [
        SeqWork(
            seq_id=i,
            slot=s,
            block_ids=b,
            tokens=p[i],
            start=0,
            sample=True,
            sampling=sp,
            prompt_len=len(p[i]),
            fresh=True,
        )
        for i, (s, b, sp) in seqs.items()
    ]
    works.append(
        SeqWork(
            seq_id=4,
            slot=7,
            block_ids=[14],
            tokens=p[4],
            start=0,
            sample=False,
            prompt_len=128,
            fresh=True,
            save_snapshot=3,
        )
    )
    outs = [runner.execute(StepPlan(works))]
    last = {i: outs[0][i].token for i in seqs}
    for k in range(1, 6):
        plan = [
            SeqWork(
                seq_id=i,
                slot=s,
                block_ids=b,
                tokens=[last[i]],
                start=len(p[i]) + k - 1,
                sample=True,
                sampling=sp,
                sample_index=k,
                prompt_len=len(p[i]),
            )
            for i, (s, b, sp) in seqs.items()
        ]
        outs.append(runner.execute(StepPlan(plan)))
        last = {i: outs[-1][i].token for i in seqs}
    tail = list(rng.randint(2, vocab, 21))
    outs.append(
        runner.execute(
            StepPlan(
                [
                    SeqWork(
                        seq_id=5,
                        slot=0,
                        block_ids=[0, 1],
                        tokens=tail,
                        start=128,
                        sample=True,
                        sampling=GREEDY,
                        prompt_len=149,
                        fresh=True,
                        restore_snapshot=3,
                        prior_tokens=p[4],
                    )
                ]
            )
        )
    )
    return outs


def test_runner_on_8_devices_matches_one_device(demo_on_mesh):
    cfg, params, mesh = demo_on_mesh
    sharded = make_runner(cfg, params, mesh)
    captured = {}
    step = sharded._step

    def spy(*args, **kw):  # keep the decode step's input types for the HLO check below
        if args[4].shape[1] == 1:
            captured["args"] = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), args
            )
            captured["kw"] = kw
        return step(*args, **kw)

    sharded._step = spy
    got = script(sharded, cfg.vocab_size)
    want = script(make_runner(*demo(), None), cfg.vocab_size)
    assert [{i: o.token for i, o in out.items()} for out in got] == [
        {i: o.token for i, o in out.items()} for out in want
    ]
    for g, w in zip(got, want):  # logprobs of seq 2 agree to float rounding
        if 2 in w:
            assert abs(g[2].logprob - w[2].logprob) < 1e-4
            assert [t for t, _ in g[2].top_logprobs] == [t for t, _ in w[2].top_logprobs]
    penalised = [out[3].token for out in got if 3 in out]
    assert len(set(penalised)) == len(penalised)  # the penalty tables worked on their shard

    hlo = step.lower(*captured["args"], **captured["kw"]).compile().as_text()
    big = forbidden(jax.eval_shape(lambda: sharded.state)) | forbidden(
        [blk["ffn"]["experts"] for blk in sharded.params["layers"].values()]
    )
    big |= forbidden((sharded.counts, sharded.prompt_mask))
    assert not gathered(hlo) & big, sorted(gathered(hlo) & big)
    assert collectives(hlo, "all-to-all")


def test_runner_refuses_blocks_from_another_shard(demo_on_mesh):
    cfg, params, mesh = demo_on_mesh
    runner = make_runner(cfg, params, mesh)
    assert (
        runner.num_seq_shards == 8 and runner.slot_shard(5) == 5 and list(runner.shard_blocks(5)) == [10, 11]
    )
    bad = SeqWork(
        seq_id=0,
        slot=5,
        block_ids=[10, 3],
        tokens=[5, 6, 7],
        start=0,
        sample=True,
        sampling=GREEDY,
        prompt_len=3,
        fresh=True,
    )
    with pytest.raises(ValueError, match=r"slot 5 is on sequence shard 5 .* uses blocks \[3\]"):
        runner.execute(StepPlan([bad]))
    with pytest.raises(ValueError, match="num_slots=4 must be a multiple of the 8 sequence shards"):
        JaxModelRunner(
            cfg,
            params,
            num_slots=4,
            num_blocks=16,
            block_tokens=128,
            max_blocks_per_seq=2,
            num_snapshots=2,
            max_batch=4,
            max_tokens_per_step=256,
            mesh=mesh,
        )
