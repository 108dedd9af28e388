"""The demo served on 8 fake CPU devices, by flag, through the server's own code path.

``scripts/serve.py --mesh data=2,expert=4,tensor=1`` builds its ``LLM`` with
``launch.build_llm``: the checkpoint is restored onto the mesh, the pools split over the
8 sequence shards (data × expert), and the engine's block manager gives every sequence blocks
of its slot's shard. The same requests (two prompts together, then a third that reuses the
first one's cached block) run on one device and on the mesh; the greedy tokens must agree,
the prefix hit must be taken on the mesh too, and the OpenAI app over the mesh engine must
answer a completion with the same text.
"""

import pathlib

import pytest

from dsv4_jax import SamplingParams
from dsv4_jax.server import cli

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "checkpoints" / "demo")
FLAGS = [
    "--profile",
    "chat",
    "--dtype",
    "float32",
    "--max-model-len",
    "1024",
    "--max-batch",
    "4",
    "--max-tokens-per-step",
    "64",
    "--num-snapshots",
    "8",
    "--compile-cache",
    "",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def serve_args(*extra):
    return cli.parse_args(["serve.py", *FLAGS, *extra])


def prompts():
    a = [(37 * i + 11) % 900 + 20 for i in range(200)]
    b = [(53 * i + 7) % 900 + 20 for i in range(50)]
    c = a[:160] + [(71 * i + 3) % 900 + 20 for i in range(30)]  # shares a's first 128-token block
    return a, b, c


def run(llm):
    a, b, c = prompts()
    first = llm.generate([a, b], GREEDY)
    third = llm.generate(c, GREEDY)
    return [o.token_ids for o in first + third], llm.stats()


@pytest.fixture(scope="module")
def on_mesh():
    from dsv4_jax import launch

    llm = launch.build_llm(serve_args("--mesh", "data=2,expert=4,tensor=1"))
    return llm, run(llm)


@pytest.mark.slow  # CI time: make test-slow
def test_demo_on_eight_devices_equals_one_device(on_mesh):
    from dsv4_jax import launch

    llm, (got, stats) = on_mesh
    assert llm.engine.limits.num_seq_shards == 8
    assert llm.engine.limits.num_blocks % 8 == 0 and llm.engine.limits.num_slots == 8
    leaf = llm.engine.runner.params["layers"][1]["ffn"]["experts"]["w1"]["weight"]
    assert len(leaf.sharding.device_set) == 8  # restored onto the mesh, not onto one device
    assert stats["prefix_cache_hit_blocks"] == 1  # the hit is usable on the first prompt's shard
    want, ref_stats = run(launch.build_llm(serve_args()))
    assert got == want
    assert ref_stats["prefix_cache_hit_blocks"] == 1
    assert llm.engine.block_manager.leaks() == []


def test_openai_completion_over_the_mesh_engine(on_mesh):
    from fastapi.testclient import TestClient

    from dsv4_jax.server.api_server import ServerState, build_app
    from dsv4_jax.server.engine_thread import AsyncEngine
    from dsv4_jax.server.metrics import ServerMetrics

    llm, (got, _) = on_mesh
    metrics = ServerMetrics("demo")
    state = ServerState(AsyncEngine(llm.engine, metrics), "demo", metrics)
    _, b, _ = prompts()
    with TestClient(build_app(state)) as client:
        r = client.post(
            "/v1/completions",
            json={"model": "demo", "prompt": b, "max_tokens": 8, "temperature": 0, "ignore_eos": True},
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"] == {"prompt_tokens": 50, "completion_tokens": 8, "total_tokens": 58}
    assert body["choices"][0]["text"] == llm.tokenizer.decode(got[1])


def test_pools_round_to_the_shards_and_refuse_what_one_shard_cannot_hold():
    from dsv4_jax.engine.profiles import EngineConfig, plan_pools

    ec = EngineConfig(block_tokens=128, max_batch=5, max_model_len=1024)
    p = plan_pools(ec, 10.0, 100, 4096, shards=4)
    assert (p.num_slots, p.num_blocks) == (8, 64)  # slots rounded up; 8 blocks per sequence each
    with pytest.raises(ValueError, match="on each of 4 sequence shards"):
        plan_pools(
            EngineConfig(block_tokens=128, max_batch=4, max_model_len=1024, kv_cache_bytes=40 * 1280 + 400),
            10.0,
            100,
            4096,
            shards=4,
        )
