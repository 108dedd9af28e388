"""Step temporaries must not grow with ``max_model_len`` (issue 19; docs/PERF.md "Step memory").

Before the paged reads were chunked (``pallas_kernels.paging``), the tiny model's decode step
needed 14x more temporaries at max_model_len 64K than at 4K, and a 256-token prefill chunk
15x more; a 1M-token request could not run at Flash widths.
"""

import json

from dsv4_jax.bench import step_memory


def test_step_temporaries_are_flat_in_max_model_len(capsys):
    argv = [
        "--preset",
        "tiny",
        "--lengths",
        "4096,65536",
        "--batch",
        "8",
        "--prefill-tokens",
        "128",
        "--json",
    ]
    assert step_memory.main(argv) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    by = {(r["kind"], r["max_model_len"]): r for r in rows}
    assert set(by) == {(k, n) for k in ("decode", "prefill") for n in (4096, 65536)}
    for kind in ("decode", "prefill"):
        short, long = by[kind, 4096], by[kind, 65536]
        assert long["argument_bytes"] > short["argument_bytes"] + (1 << 20)  # the pools did grow 16x
        assert long["temp_bytes"] <= 1.1 * short["temp_bytes"], (kind, short, long)
