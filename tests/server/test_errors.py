"""Bad input gets an OpenAI-style error with a 4xx status and the server keeps serving; engine
faults fail only the requests in flight; client aborts and shutdown free the engine's state."""

import asyncio
import json

import pytest
from server_fakes import PoisonRunner, SlowRunner, fake_engine, limits, make_client

from dsv4_jax.engine.output import RequestOutput
from dsv4_jax.engine.sampling_params import SamplingParams
from dsv4_jax.server.engine_thread import AsyncEngine

MSGS = [{"role": "user", "content": "hi"}]


def _deep(n: int) -> dict:
    d: dict = {"type": "object"}
    for _ in range(n):
        d = {"type": "object", "properties": {"x": d}}
    return d


C, CHAT = "/v1/completions", "/v1/chat/completions"

BAD = [
    # (path, body or raw bytes, status, param, code)
    (C, b"{not json", 400, None, "invalid_json"),
    (C, b"[1, 2]", 400, None, "invalid_json"),
    (C, b'{"model": "demo", "prompt": "x", "temperature": NaN}', 400, None, "invalid_json"),
    (C, {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "invalid_type"),
    (C, {"prompt": "x", "stream": 1}, 400, "stream", "invalid_type"),
    (C, {"prompt": 5}, 400, "prompt", "invalid_type"),
    (C, {"prompt": [1, "a"]}, 400, "prompt", "invalid_type"),
    (CHAT, {"messages": "hi"}, 400, "messages", "invalid_type"),
    (CHAT, {"messages": []}, 400, "messages", "invalid_value"),
    (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages", "invalid_value"),
    (C, {"model": None, "prompt": "x"}, 400, "model", "invalid_type"),
    (C, {"model": "gpt-4", "prompt": "x"}, 404, "model", "model_not_found"),
    (CHAT, {"model": "gpt-4", "messages": MSGS}, 404, "model", "model_not_found"),
    (C, {"prompt": "x", "max_tokens": -1}, 400, "max_tokens", "invalid_value"),
    (C, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    (C, {"prompt": "x", "max_tokens": 10**12}, 400, "max_tokens", "context_length_exceeded"),
    (CHAT, {"messages": MSGS, "max_completion_tokens": 10**6}, 400, "max_tokens", "context_length_exceeded"),
    (C, {"prompt": list(range(2, 600))}, 400, "prompt", "context_length_exceeded"),
    (
        CHAT,
        {"messages": [{"role": "user", "content": "word " * 600}]},
        400,
        "messages",
        "context_length_exceeded",
    ),
    (C, {"prompt": [5, 99999]}, 400, "prompt", None),  # outside the vocabulary: the engine refuses
    (C, {"prompt": ""}, 400, "prompt", None),  # empty: the engine refuses
    (C, {"prompt": "x", "temperature": -1}, 400, "temperature", "invalid_value"),
    (C, {"prompt": "x", "top_p": 0}, 400, "top_p", "invalid_value"),
    (C, {"prompt": "x", "seed": -3}, 400, "seed", "invalid_value"),
    (C, {"prompt": "x", "logprobs": 99}, 400, "logprobs", "invalid_value"),
    (C, {"prompt": "x", "n": 0}, 400, "n", "invalid_value"),
    (C, {"prompt": "x", "n": 1000}, 400, "n", "invalid_value"),
    (C, {"prompt": "x", "frobnicate": True}, 400, "frobnicate", "unrecognized_argument"),
    (C, {"prompt": "x", "suffix": "y"}, 400, "suffix", "unsupported_parameter"),
    (C, {"prompt": "x", "best_of": 3}, 400, "best_of", "unsupported_parameter"),
    # issue 21's validation table (docs/SERVING.md "Validation")
    (C, {"prompt": "x", "temperature": 2.5}, 400, "temperature", "invalid_value"),
    (C, {"prompt": "x", "top_p": 1.5}, 400, "top_p", "invalid_value"),
    (C, {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty", "invalid_value"),
    (C, {"prompt": "x", "frequency_penalty": -2.5}, 400, "frequency_penalty", "invalid_value"),
    (C, {"prompt": "x", "min_p": 1.5}, 400, "min_p", "invalid_value"),
    (C, {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty", "invalid_value"),
    (C, {"prompt": "x", "top_k": -2}, 400, "top_k", "invalid_value"),
    (C, {"prompt": "x", "prompt_logprobs": 21}, 400, "prompt_logprobs", "invalid_value"),
    (CHAT, {"messages": MSGS, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "invalid_value"),
    (C, {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
    (C, {"prompt": "x", "stop": [""]}, 400, "stop", "invalid_value"),
    (C, {"prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias", "invalid_value"),
    (C, {"prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias", "invalid_value"),
    (C, {"prompt": "x", "logit_bias": {"99999": 1}}, 400, "logit_bias", "invalid_value"),
    (C, {"prompt": "x", "logit_bias": {str(i): 1 for i in range(301)}}, 400, "logit_bias", "invalid_value"),
    (
        C,
        b'{"model": "demo", "prompt": "x", "user": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        400,
        None,
        "invalid_json",
    ),
    (C, {"prompt": "x", "logit_bias": {"5": 1}, "user": "u", "stop": [[[[1]]]]}, 400, "stop", "invalid_type"),
    (
        CHAT,
        {
            "messages": MSGS,
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": _deep(80)}},
        },
        400,
        "response_format",
        "invalid_value",
    ),
    (CHAT, {"messages": [{"role": "user"}]}, 400, "messages", "invalid_value"),
    (CHAT, {"messages": [{"role": "system", "content": None}, *MSGS]}, 400, "messages", "invalid_value"),
    # a tool message without a matching call
    (
        CHAT,
        {
            "messages": [
                *MSGS,
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                    ],
                },
                {"role": "tool", "tool_call_id": "b", "content": "r"},
            ],
            "tools": [{"type": "function", "function": {"name": "f"}}],
        },
        400,
        "messages",
        "invalid_value",
    ),
    # a schema llguidance cannot compile, a named function that does not exist
    (
        CHAT,
        {
            "messages": MSGS,
            "tool_choice": "required",
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "strict": True,
                        "parameters": {
                            "type": "object",
                            "properties": {"x": {"type": "integer", "minimum": "high"}},
                        },
                    },
                }
            ],
        },
        400,
        "tools",
        "invalid_value",
    ),
    (
        CHAT,
        {
            "messages": MSGS,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "n", "schema": {"type": "nonsense"}},
            },
        },
        400,
        "response_format",
        "invalid_value",
    ),
    (
        CHAT,
        {
            "messages": MSGS,
            "tool_choice": {"type": "function", "function": {"name": "g"}},
            "tools": [{"type": "function", "function": {"name": "f"}}],
        },
        400,
        "tool_choice",
        "invalid_value",
    ),
    (C, {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", None),
    (CHAT, {"messages": MSGS, "tool_choice": "required"}, 400, "tool_choice", "invalid_value"),  # no tools
    (CHAT, {"messages": MSGS, "response_format": {"type": "xml"}}, 400, "response_format", "invalid_value"),
    (CHAT, {"messages": MSGS, "top_logprobs": 3}, 400, "top_logprobs", None),
    (
        CHAT,
        {"messages": MSGS, "chat_template_kwargs": {"thinking": "yes"}},
        400,
        "chat_template_kwargs",
        "invalid_value",
    ),
    (
        CHAT,
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        400,
        "messages",
        "invalid_value",
    ),
    (
        CHAT,
        {"messages": [{"role": "tool", "content": "r", "tool_call_id": "1"}]},
        400,
        "messages",
        "invalid_value",
    ),
    (
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "messages",
        "invalid_value",
    ),
]


@pytest.fixture(scope="module")
def api(tok):
    client, state = make_client(fake_engine(tok))
    with client:
        yield client, state


@pytest.mark.parametrize("path,body,status,param,code", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_input_is_an_openai_error_and_the_server_keeps_serving(api, path, body, status, param, code):
    client, state = api
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json={"model": "demo", **body})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["code"] == code
    ok = client.post(C, json={"model": "demo", "prompt": "still here", "max_tokens": 2})
    assert ok.status_code == 200 and state.engine.alive
    assert state.engine.engine.block_manager.leaks() == [] and not state.engine.engine.has_unfinished()


def test_engine_fault_fails_only_the_requests_in_flight(tok):
    client, _ = make_client(fake_engine(tok, PoisonRunner(limits=limits())))
    with client:
        r = client.post(C, json={"model": "demo", "prompt": [5, 999, 6], "max_tokens": 4})
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
        assert "simulated device failure" in r.json()["error"]["message"]
        r = client.post(C, json={"model": "demo", "prompt": [5, 999], "max_tokens": 4, "stream": True})
        datas = [x[6:] for x in r.text.split("\n") if x.startswith("data: ")]
        assert json.loads(datas[0])["error"]["code"] == "engine_error" and datas[-1] == "[DONE]"
        assert client.post(C, json={"model": "demo", "prompt": [5, 6], "max_tokens": 4}).status_code == 200
        assert client.get("/health").status_code == 200
        assert "dsv4_engine_errors_total 2.0" in client.get("/metrics").text


def run(coro):
    return asyncio.run(coro)


def test_cancelled_stream_aborts_and_frees_its_blocks(tok):
    engine = fake_engine(tok, SlowRunner(limits=limits()))
    aeng = AsyncEngine(engine).start()

    async def go():
        s = await aeng.add(list(range(5, 45)), SamplingParams(max_tokens=400, ignore_eos=True))
        async for d in s:
            if d.token_ids:
                break
        aeng.abort(s.request_id)  # what the handler's finally does when the client disconnects
        for _ in range(200):
            await asyncio.sleep(0.01)
            if aeng.stats["requests_running"] == 0 and not engine.has_unfinished():
                return s
        raise AssertionError("request still running")

    try:
        run(go())
        assert (
            engine.block_manager.leaks() == []
            and engine.block_manager.num_free_slots == engine.limits.num_slots
        )
        assert engine.stats()["blocks_free"] + engine.stats()["blocks_cached"] == engine.limits.num_blocks
        assert not aeng._streams and not engine._requests  # released
    finally:
        aeng.stop()


def test_drain_finishes_short_requests_and_tells_long_ones_why(tok):
    engine = fake_engine(tok, SlowRunner(limits=limits()))
    aeng = AsyncEngine(engine).start()

    async def collect(s):
        return [d async for d in s]

    async def go():
        long = await aeng.add([5, 6, 7], SamplingParams(max_tokens=400, ignore_eos=True))
        short = await aeng.add([8, 9], SamplingParams(max_tokens=5, ignore_eos=True))
        aeng.begin_drain(0.3)
        with pytest.raises(Exception) as exc:
            await aeng.add([1, 2], SamplingParams())
        assert exc.value.status == 503 and exc.value.code == "server_shutting_down"
        return await collect(long), await collect(short)

    try:
        long, short = run(go())
        assert short[-1].finish_reason == "length" and short[-1].error is None
        assert sum(len(d.token_ids) for d in short) == 5
        assert long[-1].finish_reason == "abort" and long[-1].error.status == 503
        assert "shutting down" in long[-1].error.message and 0 < long[-1].num_output_tokens < 400
        assert engine.block_manager.leaks() == [] and not engine.has_unfinished()
    finally:
        aeng.stop()


def test_a_failed_step_ends_each_stream_with_an_engine_output_carrying_the_error(tok):
    engine = fake_engine(tok, PoisonRunner(limits=limits()))
    aeng = AsyncEngine(engine).start()

    async def go():
        bad = await aeng.add([5, 999, 6], SamplingParams(max_tokens=4, logprobs=1))
        return [o async for o in bad]

    try:
        outs = run(go())
        assert [type(o) for o in outs] == [RequestOutput]
        (last,) = outs
        assert (last.finished, last.finish_reason, last.error.code) == (True, "abort", "engine_error")
        assert last.logprobs == [] and last.num_output_tokens == 0 and last.num_prompt_tokens == 3
        assert not engine._requests and not engine.has_unfinished() and engine.block_manager.leaks() == []
    finally:
        aeng.stop()
