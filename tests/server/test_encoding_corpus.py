"""``render`` against a corpus of conversations with their exact prompts (ARCHITECTURE.md §9).

The expected strings were derived by hand from the rules of DeepSeek's reference encoder
(``encoding/encoding_dsv4.py`` of the DeepSeek-V4-Flash model repo) and checked against it
outside this repository; nothing here imports it. The markers and the tools block are
written out below independently of ``dsv4_jax.server.encoding``.

``fixtures/encoding/test_input_N.json`` / ``test_output_N.txt`` are the reference's four
published cases, copied unchanged from that repo's ``encoding/tests/`` (MIT licence). They
are training-format conversations that end with the assistant's reply, so the test renders
all but that reply and checks the prompt is the published text up to it.
"""

import json
import pathlib

import pytest

from dsv4_jax.server import encoding as E

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "encoding"

B, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
U, A, LR = "<｜User｜>", "<｜Assistant｜>", "<｜latest_reminder｜>"
T, ET = "<think>", "</think>"

TOOLS_INTRO = (
    "## Tools\n\nYou have access to a set of tools to help answer the user's question. You can invoke "
    'tools by writing a "<｜DSML｜tool_calls>" block like the following:\n\n'
    "<｜DSML｜tool_calls>\n"
    '<｜DSML｜invoke name="$TOOL_NAME">\n'
    '<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>\n'
    "...\n</｜DSML｜invoke>\n"
    '<｜DSML｜invoke name="$TOOL_NAME2">\n'
    "...\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>\n\n"
    'String parameters should be specified as is and set `string="true"`. For all other types '
    '(numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.\n\n'
    "If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning "
    "inside <think>...</think> BEFORE any tool calls or final response.\n\n"
    "Otherwise, output directly after </think> with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
)
TOOLS_OUTRO = (
    "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
)
MAX_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\nYou MUST be very thorough in "
    "your thinking and comprehensively decompose the problem to resolve the root cause, rigorously "
    "stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n"
)
RF_INTRO = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLOCK = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, CLOCK]
WEATHER_JSON = (
    '{"name": "get_weather", "description": "Weather for a city", "parameters": {"type": "object", '
    '"properties": {"city": {"type": "string"}}, "required": ["city"]}}'
)
CLOCK_JSON = '{"name": "now", "parameters": {"type": "object", "properties": {}}}'
TOOLS_BLOCK = "\n\n" + TOOLS_INTRO + WEATHER_JSON + "\n" + CLOCK_JSON + TOOLS_OUTRO


def call(cid, name, arguments):
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": arguments}}


def result(cid, content):
    return {"role": "tool", "tool_call_id": cid, "content": content}


def sys_(text):
    return {"role": "system", "content": text}


def user(text):
    return {"role": "user", "content": text}


def dev(text):
    return {"role": "developer", "content": text}


def asst(content=None, reasoning=None, calls=None):
    m = {"role": "assistant", "content": content, "reasoning_content": reasoning}
    return m | ({"tool_calls": calls} if calls else {})


def dsml(*invokes):
    return "\n\n<｜DSML｜tool_calls>\n" + "\n".join(invokes) + "\n</｜DSML｜tool_calls>"


WEATHER_PARIS = (
    '<｜DSML｜invoke name="get_weather">\n'
    '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>"
)
WEATHER_ROME = WEATHER_PARIS.replace("Paris", "Rome")
NOW = '<｜DSML｜invoke name="now">\n\n</｜DSML｜invoke>'  # no arguments: an empty line

BOOK_ARGS = (  # as a client sends it: JSON escapes, every JSON type
    '{"city": "\\u5317\\u4eac", "note": "café \\"L\\u00e0\\"\\n2", "n": 3, "price": 2.50, "ok": true, '
    '"no": false, "none": null, "days": [1, "二"], "opts": {"seat": "窓", "x": []}, "empty": ""}'
)
BOOK = (  # strings raw, everything else compact JSON (non-ASCII kept)
    '<｜DSML｜invoke name="book">\n'
    '<｜DSML｜parameter name="city" string="true">北京</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="note" string="true">café "Là"\n2</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="n" string="false">3</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="price" string="false">2.5</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="ok" string="false">true</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="no" string="false">false</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="none" string="false">null</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="days" string="false">[1, "二"]</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="opts" string="false">{"seat": "窓", "x": []}</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="empty" string="true"></｜DSML｜parameter>\n'
    "</｜DSML｜invoke>"
)

CORPUS = [  # (messages, render keywords, prompt): one line of the prompt per turn
    pytest.param(
        [sys_("Be brief."), user("Hi")],
        {},
        f"{B}Be brief.{U}Hi{A}{ET}",
        id="chat-single-turn",
    ),
    pytest.param(
        [sys_("S"), user("Q1"), asst("A1", "r1"), user("Q2")],
        {"thinking": True},
        f"{B}S{U}Q1{A}{ET}A1{EOS}{U}Q2{A}{T}",
        id="thinking-multi-turn-drops-reasoning",
    ),
    pytest.param(
        [user("Q1"), asst("A1", "r1"), user("Q2"), asst("A2"), user("Q3")],
        {},
        f"{B}{U}Q1{A}{ET}A1{EOS}{U}Q2{A}{ET}A2{EOS}{U}Q3{A}{ET}",
        id="chat-multi-turn",
    ),
    pytest.param(
        [user("Weather in Paris?")],
        {"tools": TOOLS},
        f"{B}{TOOLS_BLOCK}{U}Weather in Paris?{A}{ET}",
        id="tools-without-system-message",
    ),
    pytest.param(
        [
            sys_("S"),
            user("Paris?"),
            asst(reasoning="Use the tool.", calls=[call("c1", "get_weather", '{"city": "Paris"}')]),
            result("c1", '{"temp": 21}'),
        ],
        {"thinking": True, "tools": TOOLS},
        f"{B}S{TOOLS_BLOCK}"
        f"{U}Paris?{A}{T}Use the tool.{ET}{dsml(WEATHER_PARIS)}{EOS}"
        f'{U}<tool_result>{{"temp": 21}}</tool_result>{A}{T}',
        id="thinking-tools-one-call",
    ),
    pytest.param(
        [
            user("Paris, Rome, and the time?"),
            asst(
                "Checking.",
                "ignored in chat mode",
                [
                    call("a", "get_weather", '{"city": "Paris"}'),
                    call("b", "get_weather", '{"city": "Rome"}'),
                    call("c", "now", "{}"),
                ],
            ),
            result("c", "12:00"),
            result("a", "sunny"),
            result("b", "rain"),
        ],
        {"tools": TOOLS},
        f"{B}{TOOLS_BLOCK}"
        f"{U}Paris, Rome, and the time?{A}{ET}Checking.{dsml(WEATHER_PARIS, WEATHER_ROME, NOW)}{EOS}"
        f"{U}<tool_result>sunny</tool_result>\n\n<tool_result>rain</tool_result>\n\n"
        f"<tool_result>12:00</tool_result>{A}{ET}",
        id="chat-tools-several-calls-results-out-of-order",
    ),
    pytest.param(
        [
            user("Q1"),
            asst(reasoning="r1", calls=[call("x", "now", "{}")]),
            result("x", "09:00"),
            asst("It is 9.", "r2"),
            user("And Paris?"),
            asst(reasoning="r3", calls=[call("y", "get_weather", '{"city": "Paris"}')]),
            result("y", "sunny"),
        ],
        {"thinking": True, "tools": [WEATHER, CLOCK]},
        f"{B}{TOOLS_BLOCK}"
        f"{U}Q1{A}{T}r1{ET}{dsml(NOW)}{EOS}"
        f"{U}<tool_result>09:00</tool_result>{A}{T}r2{ET}It is 9.{EOS}"
        f"{U}And Paris?{A}{T}r3{ET}{dsml(WEATHER_PARIS)}{EOS}"
        f"{U}<tool_result>sunny</tool_result>{A}{T}",
        id="thinking-tools-keeps-every-turns-reasoning",
    ),
    pytest.param(
        [
            user("Paris?"),
            asst(calls=[call("c1", "get_weather", '{"city": "Paris"}')]),
            result("c1", [{"type": "text", "text": "part 1"}, {"type": "text", "text": "part 2"}]),
            user("Thanks; and tomorrow?"),
        ],
        {"tools": [WEATHER]},
        f"{B}\n\n{TOOLS_INTRO}{WEATHER_JSON}{TOOLS_OUTRO}"
        f"{U}Paris?{A}{ET}{dsml(WEATHER_PARIS)}{EOS}"
        f"{U}<tool_result>part 1\n\npart 2</tool_result>\n\nThanks; and tomorrow?{A}{ET}",
        id="tool-result-and-user-text-share-a-turn",
    ),
    pytest.param(
        [sys_("S1"), dev("D"), user("Q"), user([{"type": "text", "text": "Q2"}])],
        {},
        f"{B}S1{U}D{U}Q\n\nQ2{A}{ET}",
        id="system-developer-and-consecutive-users",
    ),
    pytest.param(
        [sys_("S"), dev("D1"), user("Q1"), asst("A1", "r"), dev("D2")],
        {"thinking": True},
        f"{B}S{U}Q1{A}{ET}A1{EOS}{U}D2{A}{T}",
        id="thinking-drops-developer-before-last-user",
    ),
    pytest.param(
        [sys_("S"), dev("D1"), user("Q1"), asst("A1", "r"), dev("D2")],
        {},
        f"{B}S{U}D1{U}Q1{A}{ET}A1{EOS}{U}D2{A}{ET}",
        id="chat-keeps-developers",
    ),
    pytest.param(
        [sys_("S"), {"role": "latest_reminder", "content": "2026-02-21,Sat,Paris"}, user("Q")],
        {"thinking": True},
        f"{B}S{LR}2026-02-21,Sat,Paris{U}Q{A}{T}",
        id="latest-reminder",
    ),
    pytest.param(
        [user("Q1"), {"role": "latest_reminder", "content": "R"}, asst("A1"), user("Q2")],
        {},
        f"{B}{U}Q1{A}{ET}{LR}RA1{EOS}{U}Q2{A}{ET}",
        id="latest-reminder-inside-assistant-turn",
    ),
    pytest.param(
        [sys_("S"), user("Prove it.")],
        {"thinking": True, "reasoning_effort": "max"},
        f"{B}{MAX_PREFIX}S{U}Prove it.{A}{T}",
        id="reasoning-effort-max",
    ),
    pytest.param(
        [user("Prove it.")],
        {"thinking": False, "reasoning_effort": "max"},
        f"{B}{U}Prove it.{A}{ET}",
        id="reasoning-effort-max-in-chat-mode-adds-nothing",
    ),
    pytest.param(
        [sys_("S"), user("Q")],
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "a", "strict": True, "schema": {"type": "object", "required": ["n"]}},
            }
        },
        f'{B}S\n\n{RF_INTRO}{{"type": "object", "required": ["n"]}}{U}Q{A}{ET}',
        id="response-format-json-schema",
    ),
    pytest.param(
        [user("Q")],
        {
            "tools": [CLOCK],
            "response_format": {"type": "json_object"},
            "thinking": True,
            "reasoning_effort": "max",
        },
        f"{B}{MAX_PREFIX}\n\n{TOOLS_INTRO}{CLOCK_JSON}{TOOLS_OUTRO}"
        f'\n\n{RF_INTRO}{{"type": "object"}}{U}Q{A}{T}',
        id="json-object-with-tools-and-max-effort-without-system",
    ),
    pytest.param(
        [user("Q"), sys_("late"), user("Q2")],
        {"response_format": {"type": "text"}},
        f"{B}{U}Qlate{U}Q2{A}{ET}",
        id="text-response-format-adds-nothing-and-system-renders-in-place",
    ),
    pytest.param(
        [user("Book it"), asst(calls=[call("k", "book", BOOK_ARGS)]), result("k", "予約済み ✓")],
        {},
        f"{B}{U}Book it{A}{ET}{dsml(BOOK)}{EOS}{U}<tool_result>予約済み ✓</tool_result>{A}{ET}",
        id="unicode-and-non-string-arguments",
    ),
]


@pytest.mark.parametrize("messages,kwargs,want", CORPUS)
def test_corpus(messages, kwargs, want):
    kwargs = dict(kwargs)
    assert E.render(messages, kwargs.pop("thinking", False), **kwargs) == want


def test_tools_on_an_existing_first_system_message_and_on_a_developer_message():
    got = E.render([sys_("S"), user("Q")], tools=[CLOCK])
    assert got == B + "S\n\n" + TOOLS_INTRO + CLOCK_JSON + TOOLS_OUTRO + U + "Q" + A + ET
    dev = {"role": "developer", "content": "D", "tools": [CLOCK]}  # the reference's own form
    got = E.render([sys_("S"), dev], thinking=True)
    assert got == B + "S" + U + "D\n\n" + TOOLS_INTRO + CLOCK_JSON + TOOLS_OUTRO + A + T


def _published(n):
    data = json.loads((FIXTURES / f"test_input_{n}.json").read_text(encoding="utf-8"))
    gold = (FIXTURES / f"test_output_{n}.txt").read_text(encoding="utf-8")
    return (data, None) if isinstance(data, list) else (data["messages"], data["tools"]), gold


@pytest.mark.parametrize("n,thinking", [(1, True), (2, True), (3, True), (4, False)])
def test_published_cases(n, thinking):
    (messages, tools), gold = _published(n)
    *history, reply = messages
    for m in history:  # case 3 has no call ids, which OpenAI requires; ids are not rendered
        for k, tc in enumerate(m.get("tool_calls") or []):
            tc.setdefault("id", f"call_{k}")
        if m["role"] == "tool":
            m.setdefault("tool_call_id", "call_0")
    prompt = E.render(history, thinking, tools=tools)
    if n == 4:  # the reply answers the "action" quick-instruction task (internal, not rendered here)
        tail = "<｜action｜>" + reply["content"] + EOS
    else:
        tail = reply["reasoning_content"] + ET + reply["content"] + EOS
    assert prompt + tail == gold
