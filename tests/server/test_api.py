"""The OpenAI API in-process (FastAPI TestClient over the real app, FakeRunner engine): response
shapes, streaming, chat encoding, thinking output, logprobs, usage, auth, metrics."""

import json

import pytest
from fake_runner import fake_logprobs, guard_request_writes, reference_generate
from server_fakes import VOCAB, ScriptedRunner, fake_engine, limits, make_client

from dsv4_jax.server import encoding


@pytest.fixture(scope="module")
def api(tok):
    client, state = make_client(fake_engine(tok))
    with client:
        yield client, state


def sse_events(resp):
    """Parsed ``data:`` payloads of an SSE response; the last must be ``[DONE]``."""
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    datas = [line[6:] for line in resp.text.split("\n") if line.startswith("data: ")]
    assert datas[-1] == "[DONE]" and "[DONE]" not in datas[:-1]
    return [json.loads(d) for d in datas[:-1]]


def post(client, path, **body):
    return client.post(path, json={"model": "demo", **body})


def test_models_health_and_unknown_route(api):
    client, _ = api
    assert client.get("/health").json() == {"status": "ok"}
    data = client.get("/v1/models").json()["data"]
    assert (
        [m["id"] for m in data] == ["demo"]
        and data[0]["object"] == "model"
        and data[0]["max_model_len"] == 512
    )
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_completion_text_and_token_prompts_reach_the_engine_exactly(api, tok):
    client, _ = api
    ids = tok.encode("The quick brown fox").ids
    want = reference_generate(ids, 12, VOCAB)
    for prompt in ("The quick brown fox", ids):
        r = post(client, "/v1/completions", prompt=prompt, max_tokens=12, temperature=0, ignore_eos=True)
        body = r.json()
        assert r.status_code == 200 and body["object"] == "text_completion" and body["id"].startswith("cmpl-")
        (c,) = body["choices"]
        assert c["text"] == tok.decode(want) and c["finish_reason"] == "length" and c["index"] == 0
        assert body["usage"] == {
            "prompt_tokens": len(ids),
            "completion_tokens": 12,
            "total_tokens": len(ids) + 12,
        }


def test_batched_prompts_and_n_choices(api, tok):
    client, _ = api
    body = post(
        client, "/v1/completions", prompt=[[5, 6, 7], [8, 9]], max_tokens=4, n=2, seed=3, ignore_eos=True
    ).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    texts = [c["text"] for c in body["choices"]]
    assert texts[0] != texts[1]  # seeds 3 and 4
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 16, "total_tokens": 21}
    again = post(
        client, "/v1/completions", prompt=[[5, 6, 7], [8, 9]], max_tokens=4, n=2, seed=3, ignore_eos=True
    ).json()
    assert [c["text"] for c in again["choices"]] == texts  # seeded: reproducible
    strs = post(client, "/v1/completions", prompt=["a b", "c"], max_tokens=2, temperature=0).json()
    assert len(strs["choices"]) == 2


def test_completion_stream_matches_non_stream(api):
    client, _ = api
    args = {
        "prompt": "Once upon a time",
        "max_tokens": 20,
        "temperature": 0,
        "ignore_eos": True,
        "stop": ["e"],
    }
    whole = post(client, "/v1/completions", **args).json()
    events = sse_events(post(client, "/v1/completions", stream=True, **args))
    assert "".join(e["choices"][0]["text"] for e in events) == whole["choices"][0]["text"]
    assert [e["choices"][0]["finish_reason"] for e in events][-1] == whole["choices"][0]["finish_reason"]
    assert all(e["usage"] is None for e in events[:-1]) and events[-1]["usage"] == whole["usage"]
    with_usage = sse_events(
        post(client, "/v1/completions", stream=True, stream_options={"include_usage": True}, **args)
    )
    assert with_usage[-1]["choices"] == [] and with_usage[-1]["usage"] == whole["usage"]


def test_chat_uses_the_dsv4_encoding_and_streams_the_same(api, tok):
    client, _ = api
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello.", "reasoning_content": "dropped"},
        {"role": "user", "content": [{"type": "text", "text": "Again"}]},
    ]
    ids = tok.encode(encoding.render(msgs)).ids
    assert (
        ids[0] == 0 and ids[-2:] == [1001, 1003] and 1 in ids
    )  # BOS ... <｜Assistant｜></think>, EOS of turn 1
    want = reference_generate(ids, 10, VOCAB)
    r = post(client, "/v1/chat/completions", messages=msgs, max_tokens=10, temperature=0, ignore_eos=True)
    body = r.json()
    assert r.status_code == 200 and body["object"] == "chat.completion"
    msg = body["choices"][0]["message"]
    assert (
        msg["role"] == "assistant" and msg["content"] == tok.decode(want) and msg["reasoning_content"] is None
    )
    assert body["usage"]["prompt_tokens"] == len(ids) and body["usage"]["completion_tokens"] == 10
    events = sse_events(
        post(
            client,
            "/v1/chat/completions",
            messages=msgs,
            max_tokens=10,
            temperature=0,
            ignore_eos=True,
            stream=True,
        )
    )
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == msg["content"]
    assert events[-1]["choices"][0]["finish_reason"] == "length" and events[-1]["usage"] == body["usage"]


def test_thinking_output_is_split_into_reasoning_and_content(tok):
    script = tok.encode("Let me think. 2+2 is 4.</think>The answer is 4.").ids + [1]
    assert 1003 in script  # "</think>" is one token
    client, _ = make_client(fake_engine(tok, ScriptedRunner(script, limits=limits())))
    with client:
        msgs = [{"role": "user", "content": "2+2?"}]
        for kw in ({"chat_template_kwargs": {"thinking": True}}, {"reasoning_effort": "high"}):
            body = post(client, "/v1/chat/completions", messages=msgs, max_tokens=50, **kw).json()
            msg = body["choices"][0]["message"]
            assert (
                msg["reasoning_content"] == "Let me think. 2+2 is 4." and msg["content"] == "The answer is 4."
            )
            assert body["choices"][0]["finish_reason"] == "stop"
        events = sse_events(
            post(
                client,
                "/v1/chat/completions",
                messages=msgs,
                max_tokens=50,
                stream=True,
                chat_template_kwargs={"thinking": True},
            )
        )
        deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
        assert "".join(d.get("reasoning_content", "") for d in deltas) == "Let me think. 2+2 is 4."
        assert "".join(d.get("content", "") for d in deltas) == "The answer is 4."
        chat = post(
            client, "/v1/chat/completions", messages=msgs, max_tokens=50
        ).json()  # chat mode: no split
        assert chat["choices"][0]["message"]["content"] == "Let me think. 2+2 is 4.</think>The answer is 4."


def test_logprobs_shapes(api, tok):
    client, _ = api
    c = post(
        client, "/v1/completions", prompt=[5, 6], max_tokens=3, logprobs=2, temperature=0, ignore_eos=True
    ).json()
    lp = c["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == 3
    want = [fake_logprobs(t, 2, VOCAB) for t in reference_generate([5, 6], 3, VOCAB)]
    assert lp["token_logprobs"] == [w[0] for w in want]  # the fake runner's logprobs
    assert lp["top_logprobs"] == [{tok.decode([t]): p for t, p in w[1]} for w in want]  # keyed by text
    ch = post(
        client,
        "/v1/chat/completions",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=3,
        logprobs=True,
        top_logprobs=2,
        ignore_eos=True,
    ).json()
    content = ch["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and {"token", "logprob", "bytes", "top_logprobs"} <= set(content[0])


def test_responses_report_what_the_engine_outputs_say(tok, monkeypatch):
    """Text, usage and logprobs of every response shape come from the engine's ``RequestOutput``s;
    the server never reaches into (let alone writes) a ``Request``."""
    guard_request_writes(monkeypatch)
    engine = fake_engine(tok)
    seen, engine_step = [], engine.step

    def step():  # what the engine thread publishes, as it publishes it
        outs = engine_step()
        seen.extend(outs)
        return outs

    def no_peeking(rid):
        raise AssertionError(f"the server read request {rid} from the engine")

    engine.step, engine.get_request = step, no_peeking
    client, _ = make_client(engine)
    with client:
        for stream in (False, True):
            seen.clear()
            args = {"prompt": "Tell me", "max_tokens": 7, "logprobs": 2, "ignore_eos": True, "stream": stream}
            r = post(client, "/v1/completions", **args)
            if stream:
                events = sse_events(r)
                choices, usage = [c for e in events for c in e["choices"]], events[-1]["usage"]
            else:
                choices, usage = r.json()["choices"], r.json()["usage"]
            lps = [c["logprobs"] for c in choices if c["logprobs"]]
            last = seen[-1]
            assert last.finished and "".join(c["text"] for c in choices) == "".join(o.text for o in seen)
            assert [x for lp in lps for x in lp["token_logprobs"]] == [
                lp for o in seen for lp, _ in o.logprobs
            ]
            assert [x for lp in lps for x in lp["top_logprobs"]] == [
                {tok.decode([t]): p for t, p in top} for o in seen for _, top in o.logprobs
            ]
            assert usage["prompt_tokens"] == last.num_prompt_tokens == len(tok.encode("Tell me").ids)
            assert usage["completion_tokens"] == last.num_output_tokens == 7
        seen.clear()
        msgs = [{"role": "user", "content": "Hi"}]
        args = {"max_tokens": 5, "logprobs": True, "top_logprobs": 1, "ignore_eos": True}
        body = post(client, "/v1/chat/completions", messages=msgs, **args).json()
        content = body["choices"][0]["logprobs"]["content"]
        assert [e["logprob"] for e in content] == [lp for o in seen for lp, _ in o.logprobs]
        assert [[(e["token"], e["logprob"]) for e in c["top_logprobs"]] for c in content] == [
            [(tok.decode([t]), p) for t, p in top] for o in seen for _, top in o.logprobs
        ]
        assert body["usage"]["completion_tokens"] == seen[-1].num_output_tokens == 5
        assert body["usage"]["prompt_tokens"] == seen[-1].num_prompt_tokens


def test_api_key(tok):
    client, _ = make_client(fake_engine(tok), api_key="sekret")
    with client:
        body = {"model": "demo", "prompt": "hi", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            r = client.post("/v1/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/v1/models").status_code == 401
        ok = client.post("/v1/completions", json=body, headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200
        assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200


def metric(text, name):
    return next(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith((name + " ", name + "{"))
    )


def test_metrics_count_requests_tokens_latency_and_prefix_hits(tok):
    client, _ = make_client(fake_engine(tok))
    with client:
        prompt = list(range(10, 60))  # 50 tokens: three full 16-token blocks to reuse
        for _ in range(3):
            assert (
                post(client, "/v1/completions", prompt=prompt, max_tokens=5, ignore_eos=True).status_code
                == 200
            )
        post(client, "/v1/completions", prompt="x", max_tokens=-1)  # a 400
        import time

        time.sleep(0.1)  # the stats snapshot is taken after the last step
        text = client.get("/metrics").text
    assert metric(text, 'dsv4_requests_total{finish_reason="length"}') == 3
    assert (
        metric(text, "dsv4_generation_tokens_total") == 15 and metric(text, "dsv4_prompt_tokens_total") == 150
    )
    assert metric(text, "dsv4_time_to_first_token_seconds_count") == 3
    assert metric(text, "dsv4_inter_token_latency_seconds_count") == 12
    assert metric(text, 'dsv4_requests_refused_total{status="400"}') == 1
    assert metric(text, "dsv4_num_requests_running") == 0 and metric(text, "dsv4_num_requests_waiting") == 0
    assert metric(text, 'dsv4_kv_usage_ratio{pool="slots"}') == 0
    assert metric(text, "dsv4_prefix_cache_query_tokens_total") == 150
    assert metric(text, "dsv4_prefix_cache_hit_tokens_total") == 2 * 48  # 2nd and 3rd reuse 3 blocks each
    assert abs(metric(text, "dsv4_prefix_cache_hit_rate") - 96 / 150) < 1e-9
    # No MTP drafting: the counters are there and zero, no per-position series.
    assert metric(text, "dsv4_spec_decode_num_draft_tokens_total") == 0
    assert metric(text, "dsv4_spec_decode_mean_acceptance_length") == 0
    assert "_per_pos" not in text


def test_metrics_export_speculative_decoding(tok):
    """MTP drafting (the FakeRunner's drafter, 2 drafts a step): drafts verified and accepted and
    verify steps, in all and per draft position, equal the engine's own counts over the served
    requests, less a warm-up request run before the server opened; the rates follow from them."""
    import copy
    import time

    from dsv4_jax.engine.sampling_params import SamplingParams

    engine = fake_engine(tok, speculative_tokens=2)
    engine.add_request(list(range(100, 120)), SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    outs = [o for _ in range(50) if engine.has_unfinished() for o in engine.step()]
    engine.release(outs[-1].request_id)
    warm = copy.deepcopy(engine.spec_counters)
    assert warm["verify_steps"] > 0
    client, _ = make_client(engine)
    with client:
        for prompt in ([5, 6, 7], list(range(10, 40))):
            r = post(client, "/v1/completions", prompt=prompt, max_tokens=12, ignore_eos=True, temperature=0)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 12
        time.sleep(0.1)
        text = client.get("/metrics").text
    sc = engine.spec_counters
    drafted, accepted, steps = (sc[k] - warm[k] for k in ("draft_tokens", "accepted_tokens", "verify_steps"))
    assert 0 < accepted < drafted and 0 < steps <= drafted <= 2 * steps
    assert metric(text, "dsv4_spec_decode_num_draft_tokens_total") == drafted
    assert metric(text, "dsv4_spec_decode_num_accepted_tokens_total") == accepted
    assert metric(text, "dsv4_spec_decode_num_drafts_total") == steps
    assert abs(metric(text, "dsv4_spec_decode_acceptance_rate") - accepted / drafted) < 1e-9
    assert abs(metric(text, "dsv4_spec_decode_mean_acceptance_length") - (1 + accepted / steps)) < 1e-9
    at = lambda key, j: [*sc[key], 0, 0][j - 1] - [*warm[key], 0, 0][j - 1]
    for j in (1, 2):
        n, a = at("drafts_per_position", j), at("accepted_per_position", j)
        lab = f'{{position="{j}"}}'
        assert metric(text, f"dsv4_spec_decode_num_draft_tokens_per_pos_total{lab}") == n > 0
        assert metric(text, f"dsv4_spec_decode_num_accepted_tokens_per_pos_total{lab}") == a <= n
        assert abs(metric(text, f"dsv4_spec_decode_acceptance_rate_per_pos{lab}") - a / n) < 1e-9
    assert metric(text, 'dsv4_spec_decode_num_draft_tokens_per_pos_total{position="1"}') == steps
    assert 'position="3"' not in text
    # What scripts/benchmark.py --base-url reads of it.
    from dsv4_jax.bench.client import parse_counters, spec_summary

    s = spec_summary(parse_counters(text))
    assert (s["spec_draft_tokens"], s["spec_accepted_tokens"], s["spec_verify_steps"]) == (
        drafted,
        accepted,
        steps,
    )
    assert s["spec_acceptance_rate_per_position"] == [
        metric(text, f'dsv4_spec_decode_acceptance_rate_per_pos{{position="{j}"}}') for j in (1, 2)
    ]


WEATHER = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]
CALL = (
    '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="{name}">\n'
    '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n</｜DSML｜tool_calls>"
)


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_call_after_reasoning_without_end_think_is_parsed_and_streamed(tok, stream):
    script = tok.encode("I should check." + CALL.format(name="get_weather")).ids + [1]
    client, _ = make_client(
        fake_engine(tok, ScriptedRunner(script, limits=limits(max_blocks_per_seq=64, num_blocks=160)))
    )
    msgs = [{"role": "user", "content": "Weather?"}]
    kw = dict(messages=msgs, tools=WEATHER, max_tokens=200, chat_template_kwargs={"thinking": True})
    with client:
        if not stream:
            c = post(client, "/v1/chat/completions", **kw).json()["choices"][0]
            assert (
                c["finish_reason"] == "tool_calls" and c["message"]["reasoning_content"] == "I should check."
            )
            (call,) = c["message"]["tool_calls"]
            assert call["function"]["name"] == "get_weather" and call["id"].startswith("call_")
            assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "days": 3}
            assert not c["message"]["content"]
            return
        events = sse_events(post(client, "/v1/chat/completions", stream=True, **kw))
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    text = "".join(d.get("content") or "" for d in deltas) + "".join(
        d.get("reasoning_content") or "" for d in deltas
    )
    assert "DSML" not in text and "<" not in text
    frags = [tc["function"].get("arguments", "") for d in deltas for tc in d.get("tool_calls") or []]
    assert json.loads("".join(frags)) == {"city": "Paris", "days": 3} and sum(map(bool, frags)) >= 3
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_truncated_and_unknown_tool_calls_fall_back_with_a_reason(tok):
    cut = tok.encode(CALL.format(name="get_weather")).ids
    client, _ = make_client(
        fake_engine(tok, ScriptedRunner(cut[:-12], limits=limits(max_blocks_per_seq=64, num_blocks=160)))
    )
    msgs = [{"role": "user", "content": "Weather?"}]
    with client:
        c = post(
            client, "/v1/chat/completions", messages=msgs, tools=WEATHER, max_tokens=len(cut) - 12
        ).json()
        c = c["choices"][0]
        assert c["finish_reason"] == "length" and "truncated" in c["stop_reason"]
        assert c["message"].get("tool_calls") is None and "get_weather" in c["message"]["content"]
    unknown = tok.encode(CALL.format(name="launch")).ids + [1]
    client, _ = make_client(
        fake_engine(tok, ScriptedRunner(unknown, limits=limits(max_blocks_per_seq=64, num_blocks=160)))
    )
    with client:
        c = post(client, "/v1/chat/completions", messages=msgs, tools=WEATHER, max_tokens=300).json()[
            "choices"
        ][0]
        assert c["finish_reason"] == "stop" and c["message"].get("tool_calls") is None
        assert 'invoke name="launch"' in c["message"]["content"] and "unknown function" in c["stop_reason"]


def test_echo_returns_the_prompt_and_max_tokens_0_only_scores_it(api, tok):
    client, _ = api
    body = post(client, "/v1/completions", prompt="abc def", max_tokens=0, echo=True).json()
    c = body["choices"][0]
    assert (
        c["text"] == "abc def" and c["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 0
    )
    body = post(client, "/v1/completions", prompt="abc def", max_tokens=2, echo=True, temperature=0).json()
    assert body["choices"][0]["text"].startswith("abc def") and body["usage"]["completion_tokens"] == 2
