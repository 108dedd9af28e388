"""scripts/generate.py and scripts/benchmark.py (``dsv4_jax.generate``, ``dsv4_jax.bench.serving``)
in-process on FakeRunner engines: outputs, resuming, refusals, datasets and their metrics, profile
comparison, the decode sweep, the plot; ``--help`` of every script in a subprocess, and every
script being only the wiring of a ``main`` that lives in ``dsv4_jax``."""

import ast
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
from fake_runner import reference_generate
from server_fakes import VOCAB, FakeRunner, fake_engine, limits

from dsv4_jax import generate as gen
from dsv4_jax.bench import data as bd
from dsv4_jax.bench import serving as bench
from dsv4_jax.engine.llm_engine import LLMEngine
from dsv4_jax.engine.profiles import make_config
from dsv4_jax.server import cli

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))


# ----------------------------------------------------------------------------- every script
def _is_main_guard(node) -> bool:
    """``if __name__ == "__main__": sys.exit(main())`` and nothing else."""
    if not isinstance(node, ast.If) or node.orelse or len(node.body) != 1:
        return False
    test, call = ast.unparse(node.test), ast.unparse(node.body[0])
    return test == "__name__ == '__main__'" and call == "sys.exit(main())"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_script_is_only_wiring(path):
    """A script parses no flags and holds no logic: it imports ``main`` from ``dsv4_jax`` and calls
    it, so tests import the library module, never a file by path, and nothing edits ``sys.path``."""
    text = path.read_text()
    assert "sys.path" not in text, f"{path.name} edits sys.path"
    body = ast.parse(text).body
    has_doc = body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
    assert has_doc, f"{path.name}: no docstring (usage examples)"
    mains = []
    for node in body[1:]:
        if isinstance(node, ast.Import):
            assert [a.name for a in node.names] == ["sys"], ast.unparse(node)
        elif isinstance(node, ast.ImportFrom) and node.module == "__future__":
            continue
        elif isinstance(node, ast.ImportFrom):
            names = [(a.name, a.asname) for a in node.names]
            assert node.module.startswith("dsv4_jax.") and names == [("main", None)], ast.unparse(node)
            mains.append(node.module)
        else:
            assert _is_main_guard(node), f"{path.name}: more than main wiring: {ast.unparse(node)[:80]}"
    assert len(mains) == 1, f"{path.name} must import its main from one dsv4_jax module, got {mains}"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_every_script_answers_help(path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, str(path), "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, env=env, cwd=ROOT)
    assert out.returncode == 0 and "usage:" in out.stdout and path.name in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize(
    "name,flag", [("serve", "--api-key"), ("generate", "--output"), ("benchmark", "--decode-sweep")]
)
def test_help(name, flag):
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / f"{name}.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (
        out.returncode == 0
        and flag in out.stdout
        and "--profile-dir" in out.stdout
        and "--mesh" in out.stdout
    )


# ----------------------------------------------------------------------------- generate.py
RECORDS = [
    {"prompt": "Hello there", "id": "a"},
    {"prompt": [5, 6, 7], "max_tokens": 3},
    {"messages": [{"role": "user", "content": "Hi"}], "thinking": True},
    {"prompt": list(range(2, 700))},  # over the context limit: refused, recorded, the run goes on
    {"prompt": "x", "temperature": -1},  # bad parameter: same
    {"prompt": "Goodbye", "id": "b", "stop": "e"},
]
DEFAULTS = {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True}


class Interrupting(FakeRunner):
    def __init__(self, after, **kw):
        super().__init__(**kw)
        self.after = after

    def execute(self, plan):
        if len(self.plans) >= self.after:
            raise KeyboardInterrupt
        return super().execute(plan)


def read(path):
    return [json.loads(x) for x in pathlib.Path(path).read_text().splitlines()]


def test_generate_writes_every_line_and_resumes_after_an_interruption(tok, tmp_path):
    clean = tmp_path / "clean.jsonl"
    counts = gen.generate_jsonl(
        fake_engine(tok, max_batch=2), RECORDS, str(clean), DEFAULTS, max_in_flight=2, progress=False
    )
    assert counts == {"skipped": 0, "ok": 4, "errors": 2}
    res = {r["index"]: r for r in read(clean)}
    assert sorted(res) == list(range(6))
    ids = tok.encode("Hello there").ids
    assert res[0]["id"] == "a" and res[0]["token_ids"] == reference_generate(ids, 6, VOCAB)
    assert (
        res[0]["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 6}
        and res[0]["metrics"]["ttft_s"] >= 0
    )
    assert res[1]["token_ids"] == reference_generate([5, 6, 7], 3, VOCAB)  # per-line max_tokens
    assert "reasoning_content" in res[2] and res[2]["finish_reason"] == "length"
    assert "context limit" in res[3]["error"] and "temperature" in res[4]["error"]
    assert "e" not in res[5]["text"]

    out = tmp_path / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        gen.generate_jsonl(
            fake_engine(tok, Interrupting(5, limits=limits(max_batch=2))),
            RECORDS,
            str(out),
            DEFAULTS,
            max_in_flight=2,
            progress=False,
        )
    partial = read(out)
    assert 0 < len(partial) < 6
    with open(out, "a") as f:
        f.write('{"id": null, "index": 9, "te')  # a torn last line, as if killed mid-write
    counts = gen.generate_jsonl(fake_engine(tok), RECORDS, str(out), DEFAULTS, progress=False)
    assert counts["skipped"] == len(partial) and counts["ok"] + counts["errors"] == 6 - len(partial)
    resumed = {r["index"]: r for r in read(out)}
    assert len(read(out)) == 6 and sorted(resumed) == list(range(6))
    for i in range(6):
        assert {k: v for k, v in resumed[i].items() if k != "metrics"} == {
            k: v for k, v in res[i].items() if k != "metrics"
        }
    again = gen.generate_jsonl(fake_engine(tok), RECORDS, str(out), DEFAULTS, progress=False)
    assert again == {"skipped": 6, "ok": 0, "errors": 0}


def test_generate_reports_mtp_acceptance(tok, tmp_path, capsys, monkeypatch):
    """With drafts (the FakeRunner's drafter, 2 a step), each line's metrics and the run's last
    printed line carry the acceptance figures, equal to the engine's own counts."""
    from dsv4_jax import launch

    engine = fake_engine(tok, speculative_tokens=2)
    monkeypatch.setattr(launch, "build_llm", lambda args: type("FakeLLM", (), {"engine": engine}))
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"prompt": [5, 6, 7]}\n{"prompt": "Hello there"}\n')
    args = gen.parse_args(
        ["generate.py", "--input", str(src), "--output", str(out), "--max-tokens", "10", "--temperature", "0"]
        + ["--ignore-eos", "--no-progress", "--speculative-tokens", "2"]
    )
    assert args.speculative_tokens == 2 and gen.run(args) == 0
    lines = read(out)
    assert all(len(r["token_ids"]) == 10 for r in lines)
    for r in lines:
        m = r["metrics"]
        assert 0 < m["accepted_tokens"] < m["draft_tokens"]
        assert m["acceptance_rate"] == m["accepted_tokens"] / m["draft_tokens"]
        assert 1 < m["mean_acceptance_length"] <= 3
    sc = engine.spec_counters
    assert sc["draft_tokens"] == sum(r["metrics"]["draft_tokens"] for r in lines)
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    rates = " ".join(
        f"{100 * a / n:.1f}%" for n, a in zip(sc["drafts_per_position"], sc["accepted_per_position"])
    )
    assert printed == (
        f"speculative decoding: {sc['accepted_tokens']} of {sc['draft_tokens']} drafts accepted "
        f"({100 * sc['accepted_tokens'] / sc['draft_tokens']:.1f}%), mean acceptance length "
        f"{1 + sc['accepted_tokens'] / sc['verify_steps']:.2f} tokens per verify step; "
        f"per draft position: {rates}"
    )
    assert len(sc["drafts_per_position"]) == 2


@pytest.mark.parametrize("script", ["serve", "generate", "benchmark"])
def test_speculative_tokens_flag_reaches_the_llm(script, monkeypatch):
    """``--speculative-tokens`` of every script that builds an ``LLM`` through ``launch.build_llm``
    is passed on; without it the profile's depth applies (``LLM`` turns that off for a checkpoint
    without an MTP block). (The demo's engine and runner drafting at the flag's depth: below.)"""
    from dsv4_jax import launch, llm

    parse = {"serve": cli.parse_args, "generate": gen.parse_args, "benchmark": bench.parse_args}[script]
    extra = ["--input", "x", "--output", "y"] if script == "generate" else []
    seen = []

    class Built(Exception):
        pass

    def fake_llm(*a, **kw):
        seen.append(kw)
        raise Built

    monkeypatch.setattr(llm, "LLM", fake_llm)
    for flags, want in ((["--speculative-tokens", "1"], 1), (["--speculative-tokens", "0"], 0), ([], None)):
        with pytest.raises(Built):
            launch.build_llm(parse([f"{script}.py", "--compile-cache", "", *flags, *extra]))
        assert seen[-1].get("speculative_tokens") == want, (flags, seen[-1])
        assert seen[-1]["spec_full_batch"] == 4 and seen[-1]["spec_off_batch"] == 32  # balanced's


def test_demo_engine_drafts_at_the_flags_depth():
    from dsv4_jax import launch

    args = bench.parse_args(["benchmark.py", "--compile-cache", "", "--speculative-tokens", "1"])
    engine = launch.build_llm(args).engine
    assert engine.config.speculative_tokens == 1 and engine.limits.max_draft_tokens == 1


# ----------------------------------------------------------------------------- benchmark.py
def test_datasets(tok, tmp_path):
    ids = bd.ordinary_token_ids(tok)
    assert 0 not in ids and 1 not in ids and 1000 not in ids and 999 in ids
    r = bd.random_requests(50, 100, 20, 0.5, seed=1, ids=ids)
    assert all(
        50 <= x.prompt_len <= 150 and len(x.prompt) == x.prompt_len and 10 <= x.output_len <= 30 for x in r
    )
    assert (
        len({x.prompt_len for x in r}) > 5
        and r[0].prompt == bd.random_requests(1, 100, 20, 0.5, 1, ids)[0].prompt
    )
    sp = bd.shared_prefix_requests(3, 4, 40, 8, 5, seed=2, ids=ids)
    assert (
        len(sp) == 12 and len({tuple(x.prompt[:40]) for x in sp}) == 3 and all(x.prompt_len == 48 for x in sp)
    )
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        '{"prompt": "hi there", "output_len": 3, "timestamp": 0.5}\n{"input_len": 7}\n'
        '{"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}\n'
    )
    t = bd.trace_requests(str(trace), ids=ids, tokenizer=tok, default_output_len=9)
    assert [(x.prompt_len, x.output_len, x.timestamp) for x in t] == [
        (len(tok.encode("hi there").ids), 3, 0.5),
        (7, 9, None),
        (0, 2, None),
    ]


def profile_engine(tok, drafts=False):
    """Fake engines configured like each endpoint profile (block size, budget, SWA strategy;
    with ``drafts``, the profile's MTP depth from the FakeRunner's drafter)."""

    def make(profile):
        cfg = make_config(
            profile, max_batch=4, max_tokens_per_step=256, num_snapshots=16, enable_prefix_cache=True
        )
        runner = FakeRunner(
            limits(
                block_tokens=cfg.block_tokens,
                max_batch=4,
                max_tokens_per_step=256,
                num_blocks=64,
                max_blocks_per_seq=8,
                num_slots=4,
                num_snapshots=cfg.num_snapshots if cfg.snapshot_interval else 0,
                max_draft_tokens=cfg.speculative_tokens if drafts else 0,
            )
        )
        engine = LLMEngine(runner, cfg, tok)
        runner.bind(engine)
        runner.snapshot_interval = cfg.snapshot_interval
        return engine

    return make


def bench_args(*extra):
    return bench.parse_args(["benchmark.py", "--no-progress", "--warmup-requests", "1", *extra])


def test_benchmark_in_process_random_and_shared_prefix(tok, tmp_path):
    out = tmp_path / "r.json"
    args = bench_args(
        "--num-prompts",
        "6",
        "--input-len",
        "40",
        "--output-len",
        "5",
        "--max-concurrency",
        "2",
        "--input-len-sweep",
        "20,40",
        "--result-file",
        str(out),
        "--plot",
        str(tmp_path / "p.png"),
    )
    assert bench.run(args, engine_factory=profile_engine(tok)) == 0
    res = json.loads(out.read_text())
    assert [r["input_len"] for r in res["runs"]] == [20, 40]
    for r in res["runs"]:
        assert r["completed"] == 6 and r["failed"] == 0 and r["total_output_tokens"] == 30
        assert r["total_input_tokens"] == 6 * r["input_len"] and r["prefix_hit_rate"] == 0.0
        assert r["request_throughput"] > 0 and r["tpot_ms"]["p50"] > 0 and r["itl_ms"]["p99"] > 0
        assert r["ttft_ms"]["p50"] <= r["ttft_ms"]["p90"] <= r["ttft_ms"]["p99"] <= r["e2el_ms"]["p99"]
        # The runner does not draft: counts are 0 and the rates undefined.
        assert r["spec_draft_tokens"] == r["spec_verify_steps"] == 0 and r["spec_acceptance_rate"] is None
        assert r["spec_mean_acceptance_length"] is None and r["spec_acceptance_rate_per_position"] == []
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"

    args = bench_args(
        "--dataset-name",
        "shared-prefix",
        "--prefix-groups",
        "2",
        "--prompts-per-group",
        "4",
        "--prefix-len",
        "300",
        "--suffix-len",
        "8",
        "--output-len",
        "3",
        "--max-concurrency",
        "1",
        "--profile",
        "chat",
        "--result-file",
        str(out),
    )
    bench.run(args, engine_factory=profile_engine(tok))
    (r,) = json.loads(out.read_text())["runs"]
    # block 128: each group's first request caches 2 blocks (256 of 308 tokens); the other 3 reuse them
    assert r["completed"] == 8 and math.isclose(r["prefix_hit_rate"], 6 * 256 / (8 * 308))


def test_benchmark_reports_mtp_acceptance(tok, tmp_path, capsys):
    """In-process with drafts (balanced: 2 a step): the JSON's acceptance figures equal the
    engine's counts over the measured requests (no warm-up here, so over all of them), and the
    table prints them; the decode sweep's rows carry the sweep request's figures."""
    out, engines = tmp_path / "s.json", []

    def make(profile):
        engines.append(profile_engine(tok, drafts=True)(profile))
        return engines[-1]

    args = bench_args(
        *("--num-prompts", "4", "--input-len", "20", "--output-len", "9", "--max-concurrency", "2"),
        *("--warmup-requests", "0", "--result-file", str(out)),
    )
    assert bench.run(args, engine_factory=make) == 0
    (r,) = json.loads(out.read_text())["runs"]
    sc = engines[0].spec_counters
    assert r["completed"] == 4 and r["total_output_tokens"] == 36
    assert (
        r["spec_draft_tokens"] == sc["draft_tokens"] > r["spec_accepted_tokens"] == sc["accepted_tokens"] > 0
    )
    assert r["spec_verify_steps"] == sc["verify_steps"]
    assert math.isclose(r["spec_acceptance_rate"], sc["accepted_tokens"] / sc["draft_tokens"])
    assert math.isclose(r["spec_mean_acceptance_length"], 1 + sc["accepted_tokens"] / sc["verify_steps"])
    per_pos = [a / n for n, a in zip(sc["drafts_per_position"], sc["accepted_per_position"])]
    assert len(per_pos) == 2 and r["spec_acceptance_rate_per_position"] == pytest.approx(per_pos)
    printed = capsys.readouterr().out
    assert "Speculative Decoding (MTP)" in printed
    assert f"{100 * r['spec_acceptance_rate']:.1f}%" in printed.split("Acceptance rate:")[1].splitlines()[0]
    assert (
        f"{r['spec_mean_acceptance_length']:.2f}"
        in printed.split("Mean acceptance length")[1].splitlines()[0]
    )
    for j, v in enumerate(per_pos, 1):
        assert f"{100 * v:.1f}%" in printed.split(f"Acceptance rate, draft {j}:")[1].splitlines()[0]

    args = bench_args(
        *("--num-prompts", "1", "--input-len", "20", "--output-len", "4", "--result-file", str(out)),
        *(
            "--decode-sweep",
            "--decode-sweep-min",
            "64",
            "--decode-sweep-max",
            "64",
            "--decode-sweep-tokens",
            "9",
        ),
    )
    bench.run(args, engine_factory=make)
    (row,) = json.loads(out.read_text())["decode_sweep"]["default"]
    assert (
        row["ok"] and 0 <= row["spec_acceptance_rate"] <= 1 and 1 <= row["spec_mean_acceptance_length"] <= 3
    )


def test_compare_profiles_and_decode_sweep(tok, tmp_path, capsys):
    out = tmp_path / "c.json"
    args = bench_args(
        "--dataset-name",
        "shared-prefix",
        "--prefix-groups",
        "2",
        "--prompts-per-group",
        "3",
        "--prefix-len",
        "200",
        "--suffix-len",
        "8",
        "--output-len",
        "3",
        "--max-concurrency",
        "1",
        "--compare-profiles",
        "chat,balanced,long-context",
        "--decode-sweep",
        "--decode-sweep-min",
        "128",
        "--decode-sweep-tokens",
        "4",
        "--result-file",
        str(out),
    )
    bench.run(args, engine_factory=profile_engine(tok))
    res = json.loads(out.read_text())
    assert [r["profile"] for r in res["runs"]] == ["chat", "balanced", "long-context"]
    hit = {r["profile"]: r["prefix_hit_rate"] for r in res["runs"]}
    # A 200-token prefix holds one 128-token block (chat) but no 256-token block (the others).
    assert math.isclose(hit["chat"], 4 * 128 / (6 * 208)) and hit["balanced"] == hit["long-context"] == 0
    assert res["winners"]["prefix_hit_rate"]["winner"] == "chat"
    assert set(res["winners"]) >= {"ttft_ms.p50", "tpot_ms.p50", "output_throughput", "prefix_hit_rate"}
    assert res["overall_winner"] in hit
    printed = capsys.readouterr().out
    assert "profile comparison" in printed and "prefix_hit_rate" in printed and "winner: chat" in printed
    for prof in ("chat", "balanced", "long-context"):
        rows = res["decode_sweep"][prof]
        top = 8 * (128 if prof == "chat" else 256) - 4 - 1  # the largest context that fits 4 more tokens
        assert [x["context"] for x in rows] == [c for c in (128, 256, 512, 1024) if c <= top] + [top]
        assert all(x["ok"] and x["decode_ms_per_token"] > 0 for x in rows)
    assert "ms/token" in printed


def test_a_mesh_that_does_not_fit_the_devices_is_refused_by_name():
    """(Serving on a mesh that fits: tests/sharding/test_serving_on_mesh.py.)"""
    from dsv4_jax import launch

    args = cli.parse_args(["serve.py", "--mesh", "data=2,expert=8,tensor=1", "--compile-cache", ""])
    assert args.mesh == "data=2,expert=8,tensor=1"
    with pytest.raises(ValueError, match="covers 16 devices but 8 are available"):
        launch.build_llm(args)


def test_generate_profile_dir_traces_named_engine_steps(tok, tmp_path):
    import gzip

    from dsv4_jax.engine.runner.profiler import StepProfiler, instrument

    engine = fake_engine(tok)
    instrument(engine)
    prof = StepProfiler(str(tmp_path / "trace"), num_steps=2, skip_steps=1)
    gen.generate_jsonl(
        engine, RECORDS[:2], str(tmp_path / "o.jsonl"), DEFAULTS, progress=False, profiler=prof
    )
    assert prof.done and len(prof.trace_dirs) == 1
    with gzip.open(next(pathlib.Path(prof.trace_dirs[0]).glob("perfetto_trace.json.gz"))) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    steps = [e for e in events if e["name"] == "engine_step"]
    assert [e["args"]["step_num"] for e in steps] == ["1", "2"]  # skipped step 0, traced two
    names = {e["name"] for e in events}
    assert {"scheduler.schedule", "model_runner.execute", "scheduler.commit"} <= names
