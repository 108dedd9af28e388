"""The agent-facing API against `make serve`'s default configuration: `scripts/serve.py` with no
flags but the address, driven by the official ``openai`` client and the ``openai-agents`` SDK.

Tool calls with ``tool_choice="required"`` and a named function (streaming and not) validate
against their schemas, and their arguments stream in pieces; ``response_format`` json_schema
output validates; ``logit_bias`` forces and bans tokens; ``echo`` + ``logprobs`` return the
prompt tokens' logprobs equal to ``LLM``'s teacher-forced ones (the same defaults in this
process); an agent loop with two tools runs to a final answer. The demo model never learned
DSML: every call here comes from the grammar, which is the point (docs/SERVING.md "Tools").
"""

import json
import sys
from typing import Literal

import jsonschema
import numpy as np
import openai
import pytest
from test_live_server import ROOT, free_port, running

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Today's weather in a city.",
            "strict": True,
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    "days": {"type": "integer", "enum": [1, 2, 3]},
                },
                "required": ["city", "days"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "set_alarm",
            "strict": True,
            "parameters": {
                "type": "object",
                "properties": {
                    "on": {"type": "boolean"},
                    "label": {"type": "string", "enum": ["wake", "tea"]},
                },
                "required": ["on", "label"],
                "additionalProperties": False,
            },
        },
    },
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MSGS = [{"role": "system", "content": "Use the tools."}, {"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("live-tools")
    port = free_port()
    cmd = [sys.executable, str(ROOT / "scripts" / "serve.py"), "--host", "127.0.0.1", "--port", str(port)]
    with running(cmd, port, tmp, 400):
        yield f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=300)


def check_calls(calls, names=None):
    assert calls
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_")
        assert names is None or c.function.name in names
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "set_alarm"}}])
def test_tool_calls_follow_their_schemas(client, choice):
    kw = dict(model="demo", messages=MSGS, tools=TOOLS, tool_choice=choice, max_tokens=300, temperature=0)
    names = None if choice == "required" else ["set_alarm"]
    r = client.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    check_calls(msg.tool_calls, names)
    assert not msg.content or "DSML" not in msg.content
    # streaming: calls whose arguments arrive in several fragments, no markup anywhere (not
    # compared with the call above: in bf16 a prefix hit may tip the demo's near-tied choices)
    frags: dict[int, list[str]] = {}
    starts, finish, text = {}, None, ""
    for ch in client.chat.completions.create(**kw, stream=True):
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        text += (d.content or "") + (getattr(d, "reasoning_content", None) or "")
        for tc in d.tool_calls or []:
            if tc.id:
                starts[tc.index] = (tc.id, tc.function.name)
            frags.setdefault(tc.index, []).append(tc.function.arguments or "")
        finish = ch.choices[0].finish_reason or finish
    assert finish == "tool_calls" and "DSML" not in text and "<" not in text
    assert sorted(starts) == sorted(frags) and starts
    for i, (cid, name) in starts.items():
        assert cid.startswith("call_") and (names is None or name in names)
        jsonschema.validate(json.loads("".join(frags[i])), SCHEMAS[name])
        assert sum(1 for f in frags[i] if f) >= 3  # streamed as generated, not one lump


def test_json_schema_response_validates(client):
    schema = {
        "type": "object",
        "properties": {
            "colour": {"type": "string", "enum": ["red", "blue"]},
            "n": {"type": "integer", "enum": [1, 2]},
        },
        "required": ["colour", "n"],
        "additionalProperties": False,
    }
    rf = {"type": "json_schema", "json_schema": {"name": "pick", "strict": True, "schema": schema}}
    for seed in (1, 2):
        r = client.chat.completions.create(
            model="demo", messages=MSGS, response_format=rf, max_tokens=200, temperature=1.0, seed=seed
        )
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
        assert r.choices[0].finish_reason == "stop"


def test_logit_bias_forces_and_bans_a_token(client):
    kw = dict(model="demo", prompt="def main():", max_tokens=4, temperature=0)
    free = client.completions.create(**kw, logprobs=0)
    forced = client.completions.create(**kw, logit_bias={"500": 100}, logprobs=0)
    assert forced.choices[0].logprobs.tokens and len(set(forced.choices[0].logprobs.tokens)) == 1
    first = free.choices[0].logprobs.tokens[0]
    assert first != forced.choices[0].logprobs.tokens[0]
    # banning the free run's first token changes the first token, and nothing else is needed
    banned = client.completions.create(**kw, logprobs=0, logit_bias={str(_token_id(first)): -100})
    assert banned.choices[0].logprobs.tokens[0] != first


def _token_id(text: str) -> int:
    """The demo tokenizer's id of a one-token text."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ROOT / "checkpoints" / "demo" / "tokenizer.json"))
    (tid,) = tok.encode(text).ids
    return tid


def test_echo_logprobs_equal_teacher_forced_logprobs_of_LLM(client):
    from dsv4_jax import LLM, SamplingParams

    prompt = "import os\n\ndef walk(root):\n    for name in os.listdir(root):"
    r = client.completions.create(model="demo", prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    c = r.choices[0]
    assert c.text == prompt and c.logprobs.token_logprobs[0] is None
    llm = LLM(str(ROOT / "checkpoints" / "demo"))  # the server's defaults
    want = llm.generate(prompt, SamplingParams(max_tokens=0, prompt_logprobs=2))[0].prompt_logprobs
    assert len(c.logprobs.token_logprobs) == len(want)
    np.testing.assert_allclose(c.logprobs.token_logprobs[1:], [w[0] for w in want[1:]], atol=1e-5)
    # generation after the echoed prompt: its tokens follow the prompt's in the same lists
    g = client.completions.create(
        model="demo", prompt=prompt, max_tokens=3, echo=True, logprobs=0, temperature=0
    )
    assert g.choices[0].text.startswith(prompt) and len(g.choices[0].logprobs.tokens) == len(want) + 3


def test_an_agent_loop_with_two_tools_runs_to_a_final_answer(url):
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)
    calls = []

    @function_tool
    def get_weather(city: Literal["Paris", "Tokyo"]) -> str:
        """Today's weather in a city."""
        calls.append(("get_weather", city))
        return f"Sunny in {city}"

    @function_tool
    def get_time(zone: Literal["UTC", "CET"]) -> str:
        """The time now in a zone."""
        calls.append(("get_time", zone))
        return "12:00"

    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=300)
    agent = Agent(
        name="demo",
        instructions="Answer with the tools.",
        tools=[get_weather, get_time],
        model=OpenAIChatCompletionsModel(model="demo", openai_client=client),
        # the SDK resets tool_choice to auto after a call (reset_tool_choice), so the loop ends
        model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=200),
    )
    res = Runner.run_sync(agent, "What is the weather in Paris?", max_turns=4)
    assert calls and calls[0][0] in ("get_weather", "get_time")  # a tool ran with schema-valid arguments
    assert isinstance(res.final_output, str) and res.final_output and "DSML" not in res.final_output
    kinds = [type(i).__name__ for i in res.new_items]
    assert "ToolCallItem" in kinds and "ToolCallOutputItem" in kinds and kinds[-1] == "MessageOutputItem"
