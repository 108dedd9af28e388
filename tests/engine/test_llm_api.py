"""The Python API (``LLM``), streaming against non-streaming, detokenization and stop strings,
endpoint profiles, and the host-only rule for engine modules."""

import argparse
import dataclasses
import pathlib
import sys
import types

import pytest
from fake_runner import (
    FakeRunner,
    fake_logprobs,
    guard_request_writes,
    make_engine,
    make_limits,
    reference_generate,
)
from tokenizers import Tokenizer

import dsv4_jax
from dsv4_jax import LLM, Output, SamplingParams
from dsv4_jax.engine import PROFILES, RequestOutput, RequestRefused, make_config
from dsv4_jax.engine.detokenizer import IncrementalDetokenizer, StopChecker
from dsv4_jax.engine.profiles import add_cli_args, config_from_args, kv_budget, plan_pools

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEMO = ROOT / "checkpoints" / "demo"
V = 1000


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(str(DEMO / "tokenizer.json"))


def flat(deltas):
    return [t for d in deltas for t in d.token_ids]


def fake_llm(tok, **kw):
    engine, runner = make_engine("checkpoint", tokenizer=tok, **kw)
    return LLM.from_engine(engine), runner


def test_generate_mixed_prompts_in_order_with_text_and_metrics(tok):
    llm, _ = fake_llm(tok)
    ids = tok.encode("Hello world, this is a test.").ids
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outs = llm.generate(["Hello world, this is a test.", [5, 6, 7], ids[:4]], sp)
    assert [type(o) for o in outs] == [Output] * 3
    assert outs[0].prompt == "Hello world, this is a test." and outs[0].prompt_token_ids == ids
    for o, p in zip(outs, [ids, [5, 6, 7], ids[:4]]):
        assert o.token_ids == reference_generate(p, 12, V)
        assert o.text == tok.decode(o.token_ids) and o.finish_reason == "length"
        assert o.metrics.ttft > 0 and len(o.metrics.token_times) == 12
        assert len(o.metrics.inter_token_latencies) == 11 and o.metrics.e2e >= o.metrics.ttft
    single = llm.generate([5, 6, 7], sp)  # one token-id prompt, not three prompts
    assert len(single) == 1 and single[0].token_ids == outs[1].token_ids
    per_prompt = llm.generate(["a", "b"], [sp, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)])
    assert [len(o.token_ids) for o in per_prompt] == [12, 2]
    with pytest.raises(ValueError, match="2 prompts but 1 SamplingParams"):
        llm.generate(["a", "b"], [sp])
    assert llm.engine.block_manager.leaks() == [] and not llm.engine._requests  # released


@pytest.mark.parametrize("stop", [(), ("e",), ("the", "an ")])
def test_streaming_yields_the_same_tokens_and_text_as_generate(tok, stop):
    llm, _ = fake_llm(tok)
    prompts = ["The quick brown fox", "jumps over ü 日本", "x"]
    sps = [
        SamplingParams(max_tokens=n, temperature=t, seed=3, stop=stop)
        for n, t in ((30, 0), (25, 0.9), (40, 0))
    ]
    batch = llm.generate(prompts, sps)
    for p, sp, want in zip(prompts, sps, batch):
        deltas = list(llm.stream(p, sp))
        assert deltas[-1].finished and all(not d.finished for d in deltas[:-1])
        assert flat(deltas) == want.token_ids
        assert "".join(d.text for d in deltas) == want.text
        assert deltas[-1].finish_reason == want.finish_reason
        for s in stop:  # the text never shows a stop string, streamed or not
            assert s not in want.text
    assert llm.engine.block_manager.leaks() == []


def test_stream_yields_the_engine_outputs_and_generate_folds_them(tok, monkeypatch):
    guard_request_writes(monkeypatch)  # LLM only reads the engine's outputs
    llm, _ = fake_llm(tok)
    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=3, stop=("zz",))
    deltas = list(llm.stream("Hello there", sp))
    assert dsv4_jax.StreamOutput is RequestOutput and all(type(d) is RequestOutput for d in deltas)
    ids = tok.encode("Hello there").ids
    assert flat(deltas) == reference_generate(ids, 10, V)
    assert [x for d in deltas for x in d.logprobs] == [fake_logprobs(t, 3, V) for t in flat(deltas)]
    assert [d.num_output_tokens for d in deltas] == [len(flat(deltas[: i + 1])) for i in range(len(deltas))]
    assert {d.num_prompt_tokens for d in deltas} == {len(ids)}
    (out,) = llm.generate("Hello there", sp)
    assert (out.token_ids, out.text, out.finish_reason, out.stop_reason) == (
        flat(deltas),
        "".join(d.text for d in deltas),
        "length",
        None,
    )
    assert out.logprobs == [x for d in deltas for x in d.logprobs] and out.prompt_token_ids == ids
    assert out.metrics.e2e is not None and len(out.metrics.token_times) == 10
    plain = llm.generate([5, 6], SamplingParams(max_tokens=3, temperature=0, stop_token_ids=(7,)))[0]
    assert plain.logprobs is None and plain.prompt is None
    assert not llm.engine._requests and not llm._queues


def test_two_streams_interleave_and_closing_one_early_aborts_it(tok):
    llm, _ = fake_llm(tok)
    sp = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    a, b = llm.stream([5, 6, 7], sp), llm.stream([8, 9], sp)
    got_a = flat(next(a) for _ in range(3))
    got_b = flat(b)
    a.close()  # abort mid-generation
    assert got_a == reference_generate([5, 6, 7], 20, V)[: len(got_a)]
    assert got_b == reference_generate([8, 9], 20, V)
    assert not llm.engine.has_unfinished() and llm.engine.block_manager.leaks() == []


def test_stop_strings_cut_text_and_end_generation(tok):
    llm, _ = fake_llm(tok)
    full = llm.generate("Once upon", SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    stop = full.text[10:13]
    cut = llm.generate(
        "Once upon", SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=(stop,))
    )[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[: full.text.index(stop)]
    assert full.token_ids[: len(cut.token_ids)] == cut.token_ids and len(cut.token_ids) < 40


def test_detokenizer_handles_split_characters_and_stop_holdback(tok):
    text = "naïve café — 日本語 ok"
    ids = tok.encode(text).ids
    d = IncrementalDetokenizer(tok)
    pieces = [d.push(t) for t in ids] + [d.flush()]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # some token only completed a character with the next one
    sc = StopChecker(("STOP", "xy"))
    assert sc.emit("abcST", 0, finished=False) == ("ab", 2)  # "ST" (and one more) may start "STOP"
    assert sc.find("abcSTOP", 5) == (3, "STOP") and sc.find("abc", 0) is None


def stand_in_runner(monkeypatch) -> dict:
    """Replace ``JaxModelRunner`` by a fake with its constructor signature; returns the dict its
    constructor arguments land in (the LLM under test builds its runner through it)."""
    built = {}

    class StandIn(FakeRunner):  # the JaxModelRunner constructor signature, with fake execution
        def __init__(
            self,
            cfg,
            params,
            *,
            num_slots,
            num_blocks,
            block_tokens,
            max_blocks_per_seq,
            num_snapshots,
            max_batch,
            max_tokens_per_step,
            kv_format,
            eos_token_id,
            mesh,
            lookahead,
            speculative_tokens,
            opts,
        ):
            built.update(locals(), cfg=cfg)
            super().__init__(
                make_limits(
                    num_slots=num_slots,
                    num_blocks=num_blocks,
                    block_tokens=block_tokens,
                    max_blocks_per_seq=max_blocks_per_seq,
                    num_snapshots=num_snapshots,
                    max_batch=max_batch,
                    max_tokens_per_step=max_tokens_per_step,
                    window=cfg.sliding_window,
                    num_layers=cfg.num_hidden_layers,
                    vocab_size=V,
                    eos_token_id=eos_token_id,
                    max_draft_tokens=speculative_tokens,
                )
            )

    monkeypatch.setitem(
        sys.modules, "dsv4_jax.engine.runner.model_runner", types.SimpleNamespace(JaxModelRunner=StandIn)
    )
    return built


def test_llm_init_loads_the_checkpoint_and_builds_the_runner_from_the_profile(monkeypatch, tok):
    built = stand_in_runner(monkeypatch)
    llm = LLM(str(DEMO), profile="chat", swa_strategy="checkpoint", max_batch=8, num_blocks=96)
    cfg = built["cfg"]
    assert (built["block_tokens"], built["max_tokens_per_step"], built["max_batch"]) == (128, 2048, 8)
    # the demo is in the published (QAT-trained) format: QAT rounding on, FP8 rows + FP4 indexer keys
    assert (built["num_blocks"], built["num_slots"], built["kv_format"]) == (96, 8, "fp8-fp4")
    assert built["opts"].sim_quant is True and llm.qat is True
    assert built["max_blocks_per_seq"] == 32768 // 128 and built["eos_token_id"] == cfg.eos_token_id
    assert built["mesh"] is None and built["lookahead"] is True  # EngineConfig.decode_lookahead
    assert llm.engine.config.swa_strategy == "checkpoint" and llm.engine.max_model_len == 32768
    assert llm.pools.bytes_per_block > 0 and llm.pools.num_snapshots == 512
    out = llm.generate("Hello", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == reference_generate(tok.encode("Hello").ids, 5, V)
    with pytest.raises(RequestRefused, match="context limit is 32768"):
        llm.generate([5] * 32768)
    with pytest.raises(ValueError, match="multiple of compress ratio 128"):
        LLM(str(DEMO), profile="chat", block_tokens=64)
    LLM(str(DEMO), profile="chat", num_blocks=96, decode_lookahead=False)
    assert built["lookahead"] is False


def test_numerics_mode_follows_the_checkpoint_and_kv_storage_follows_the_mode(monkeypatch, tmp_path):
    """QAT rounding is on for a checkpoint in the published format and off for one of plain bf16
    weights; the default KV format is what is lossless in the mode; FP8 storage without QAT is
    refused with the reason unless allowed (docs/SERVING.md "Numerics modes")."""
    from dsv4_jax import launch
    from dsv4_jax.bench.checkpoints import build_random, size_config

    built = stand_in_runner(monkeypatch)
    kw = dict(max_batch=2, num_blocks=8, max_model_len=1024)
    mode = lambda llm: (llm.qat, built["opts"].sim_quant, built["kv_format"], llm.engine.config.kv_format)
    assert mode(LLM(str(DEMO), **kw)) == (True, True, "fp8-fp4", "fp8-fp4")
    assert mode(LLM(str(DEMO), kv_format="bf16", **kw)) == (True, True, "bf16", "bf16")
    assert mode(LLM(str(DEMO), kv_format="fp8", **kw))[2] == "fp8"
    assert mode(LLM(str(DEMO), qat=False, **kw)) == (False, False, "bf16", "bf16")
    for fmt in ("fp8", "fp8-fp4"):
        with pytest.raises(
            ValueError, match=rf"kv_format='{fmt}' with qat=False.*changes answers.*allow_lossy_kv"
        ):
            LLM(str(DEMO), qat=False, kv_format=fmt, **kw)
        assert mode(LLM(str(DEMO), qat=False, kv_format=fmt, allow_lossy_kv=True, **kw))[2] == fmt
    with pytest.raises(ValueError, match="kv_format"):
        LLM(str(DEMO), kv_format="fp4", **kw)
    plain = build_random(str(tmp_path / "bf16"), size_config("tiny", weight_dtype="bf16", expert_dtype=None))
    assert mode(LLM(plain, **kw)) == (False, False, "bf16", "bf16")  # not QAT-trained
    assert mode(LLM(plain, qat=True, **kw)) == (True, True, "fp8-fp4", "fp8-fp4")

    parser = argparse.ArgumentParser()
    launch.add_model_args(parser, profiling=False)
    args = parser.parse_args(
        [
            "--no-qat",
            "--kv-format",
            "fp8",
            "--num-blocks",
            "8",
            "--max-model-len",
            "1024",
            "--compile-cache",
            "",
        ]
    )
    with pytest.raises(ValueError, match="--allow-lossy-kv"):
        launch.build_llm(args)
    args.allow_lossy_kv = True
    assert mode(launch.build_llm(args)) == (False, False, "fp8", "fp8")
    args = parser.parse_args(["--num-blocks", "8", "--max-model-len", "1024", "--compile-cache", ""])
    assert mode(launch.build_llm(args)) == (True, True, "fp8-fp4", "fp8-fp4")


def test_profiles_and_overrides():
    assert set(PROFILES) == {"chat", "balanced", "long-context"}
    assert make_config().swa_strategy == "checkpoint"  # balanced is the default
    assert make_config("long-context").swa_strategy == "recompute"
    assert make_config("chat").snapshot_interval == 128 and make_config("balanced").snapshot_interval == 4096
    assert make_config("long-context").snapshot_interval is None
    lc = make_config("long-context", swa_strategy="full")
    assert lc.num_snapshots > 0 and lc.snapshot_interval == 256
    with pytest.raises(ValueError, match="unknown profile 'fast'"):
        make_config("fast")
    with pytest.raises(TypeError, match=r"unknown engine argument\(s\) \['blok_tokens'\]"):
        make_config("chat", blok_tokens=64)
    with pytest.raises(ValueError, match="swa_strategy"):
        make_config("chat", swa_strategy="sometimes")
    with pytest.raises(ValueError, match="checkpoint_interval"):
        make_config("balanced", checkpoint_interval=1000)
    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(
        ["--profile", "chat", "--swa-strategy", "recompute", "--max-batch", "4", "--no-prefix-cache"]
    )
    ec = config_from_args(args)
    assert (ec.block_tokens, ec.swa_strategy, ec.max_batch, ec.enable_prefix_cache) == (
        128,
        "recompute",
        4,
        False,
    )
    doc = (ROOT / "docs" / "PROFILES.md").read_text()
    for name in PROFILES:
        assert f"`{name}`" in doc


def test_pool_sizing_from_bytes():
    ec = make_config("balanced", max_model_len=8192, num_slots=4, num_snapshots=8, kv_cache_bytes=10_000_000)
    plan = plan_pools(ec, bytes_per_token=130.0, bytes_per_slot=100_000, max_position_embeddings=65536)
    assert plan.bytes_per_block == 130 * 256 and plan.max_blocks_per_seq == 32 and plan.max_model_len == 8192
    # the budget holds 264 blocks; 4 slots at 8192 tokens can use 128 of them
    assert (10_000_000 - 12 * 100_000) // (130 * 256) == 264 and plan.num_blocks == 4 * 32
    assert plan.total_bytes <= 10_000_000
    with pytest.raises(ValueError, match="leaves .* blocks .* needs 32 blocks"):
        plan_pools(
            make_config("balanced", max_model_len=8192, kv_cache_bytes=2_000_000), 130.0, 100_000, 65536
        )
    capped = plan_pools(make_config("long-context"), 130.0, 100_000, max_position_embeddings=65536)
    assert capped.max_model_len == 65536 and capped.num_snapshots == 0 and capped.num_blocks == 16 * 256


def test_default_pools_are_sized_from_memory_not_from_slots_times_context():
    ec = make_config("long-context")  # 16 slots, no snapshots, max_model_len = the checkpoint's
    gib = 1 << 30
    # CPU: a stated host budget, min(4 GiB, RAM / 8)
    assert kv_budget(ec, "cpu", host_total=16 * gib)[0] == 2 * gib
    assert kv_budget(ec, "cpu", host_total=512 * gib)[0] == 4 * gib
    # accelerators: 90 % of the device, less what the weights use and the temporaries' reserve
    gpu, why = kv_budget(ec, "gpu", device_limit=100 * gib, device_used=30 * gib)
    assert gpu == 90 * gib - 30 * gib - 2 * gib and "90%" in why
    assert kv_budget(dataclasses.replace(ec, kv_cache_bytes=123), "gpu")[0] == 123
    # a 1M-token checkpoint: 16 slots x 1M tokens x 500 B would be 8 GB; the budget holds 2 GiB
    # (after 16 slots, their penalty tables and the one-entry snapshot store the runner keeps)
    plan = plan_pools(ec, 500.0, 1_000_000, 1 << 20, budget=(2 * gib, "host"), table_bytes_per_slot=5000)
    assert plan.max_model_len == 1 << 20
    assert plan.num_blocks == (2 * gib - 16 * 1_005_000 - 1_000_000) // (500 * 256)
    assert plan.total_bytes <= 2 * gib and "host" in plan.budget
    # never more blocks than every slot at max_model_len
    small = plan_pools(
        make_config("long-context", max_model_len=4096), 500.0, 1000, 1 << 20, budget=(2 * gib, "h")
    )
    assert small.num_blocks == 16 * 16
    with pytest.raises(ValueError, match=r"KV budget of .* \(host\) leaves"):
        plan_pools(ec, 500.0, 1_000_000, 1 << 20, budget=(gib // 4, "host"))


def test_public_names():
    assert "LLM" in dsv4_jax.__all__ and "SamplingParams" in dsv4_jax.__all__


def test_warm_up_compiles_every_shape_when_asked():
    """``--warmup-shapes all`` (the accelerator default) goes through ``LLM.precompile``."""
    from dsv4_jax import launch

    class Planned:
        memory = types.SimpleNamespace(describe=lambda: "plan")
        calls = 0

        def precompile(self):
            Planned.calls += 1
            return {"compiled": 3, "seconds": 0.5, "temp_bytes": 1}

    assert launch.warm_up(Planned(), "all") == 0.5 and Planned.calls == 1
