"""One process of the two-process multi-host test (started by ``test_multihost.py``).

``python multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR``, with the environment
giving each process 4 fake CPU devices. The processes join JAX's distributed runtime on a
loopback coordinator, build the global ``data=2,expert=4`` mesh over all 8 devices, run the
forward with params and tokens laid out by the rules table (each process supplies only
its own devices' pieces), gather the logits and compare them with a forward on this
process's first device alone. The verdict goes to ``OUT_DIR/result_<id>.json``.
"""

import json
import os
import sys


def serve(runner_cls, params, mesh) -> dict:
    """Greedy tokens from the model runner: two sequences on two shards (one per process),
    prefilled together, then four decode steps (every process runs the same plans)."""
    import numpy as np
    from sharding_cases import CFG, prompts

    from dsv4_jax.engine.runner_api import SeqWork, StepPlan
    from dsv4_jax.engine.sampling_params import SamplingParams

    runner = runner_cls(
        CFG,
        params,
        num_slots=8,
        num_blocks=16,
        block_tokens=32,
        max_blocks_per_seq=2,
        num_snapshots=8,
        max_batch=8,
        max_tokens_per_step=256,
        dtype=np.float32,
        mesh=mesh,
    )
    greedy = SamplingParams(temperature=0.0)
    seqs = {0: (1, [2, 3], list(prompts()[0, :30])), 1: (6, [12, 13], list(prompts()[1, :19]))}
    out = runner.execute(
        StepPlan(
            [
                SeqWork(
                    seq_id=i,
                    slot=s,
                    block_ids=b,
                    tokens=t,
                    start=0,
                    sample=True,
                    sampling=greedy,
                    prompt_len=len(t),
                    fresh=True,
                )
                for i, (s, b, t) in seqs.items()
            ]
        )
    )
    toks = {i: [out[i].token] for i in seqs}
    for k in range(1, 5):
        out = runner.execute(
            StepPlan(
                [
                    SeqWork(
                        seq_id=i,
                        slot=s,
                        block_ids=b,
                        tokens=[toks[i][-1]],
                        start=len(t) + k - 1,
                        sample=True,
                        sampling=greedy,
                        sample_index=k,
                        prompt_len=len(t),
                    )
                    for i, (s, b, t) in seqs.items()
                ]
            )
        )
        for i in seqs:
            toks[i].append(out[i].token)
    return {str(i): [int(x) for x in v] for i, v in toks.items()}


def main() -> int:
    pid, nproc, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from dsv4_jax.parallel.mesh import initialize_distributed, parse_mesh

    initialize_distributed(f"127.0.0.1:{port}", nproc, pid, timeout_s=60)
    jax.config.update("jax_default_matmul_precision", "highest")
    from sharding_cases import CFG, params, prompts

    from dsv4_jax.engine.runner.model_runner import JaxModelRunner
    from dsv4_jax.model.transformer import ModelOptions, forward
    from dsv4_jax.parallel.rules import Layout

    lay = Layout.create(parse_mesh("data=2,expert=4,tensor=1"))
    toks = prompts()[:, :24]  # 8 rows: one per sequence shard
    pos = np.broadcast_to(np.arange(24, dtype=np.int32), toks.shape).copy()
    host = jax.tree.map(np.asarray, params())
    shardings = lay.param_shardings(host, CFG)
    placed = jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i]), host, shardings
    )
    t, q = lay.put_batch((toks, pos))
    logits = jax.jit(lambda p, t, q: forward(p, t, q, cfg=CFG, opts=ModelOptions(layout=lay))[0])(
        placed, t, q
    )
    got = np.asarray(multihost_utils.process_allgather(logits, tiled=True))

    tokens = {"mesh": serve(JaxModelRunner, placed, lay.mesh), "one": serve(JaxModelRunner, host, None)}
    local = jax.local_devices()[0]
    one = jax.jit(lambda p, t, q: forward(p, t, q, cfg=CFG)[0])(jax.device_put(host, local), toks, pos)
    want = np.asarray(one)
    result = {
        "process_count": jax.process_count(),
        "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "local_shards": len(placed["layers"][1]["ffn"]["experts"]["w1"]["weight"].addressable_shards),
        "max_err": float(np.abs(got - want).max()),
        "tol": 2e-4 * max(1.0, float(np.abs(want).max())),
        "argmax_equal": bool((got.argmax(-1) == want.argmax(-1)).all()),
        "tokens": tokens,
    }
    with open(os.path.join(out_dir, f"result_{pid}.json"), "w") as f:
        json.dump(result, f)
    multihost_utils.sync_global_devices("done")
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
