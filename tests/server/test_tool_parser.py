"""DSML tool-call parsing (server/tool_parser.py): whole outputs, streams split anywhere, and
malformed or truncated blocks."""

import itertools
import json
import random

import pytest

from dsv4_jax.server.encoding import DSML, EOS, ReasoningSplitter
from dsv4_jax.server.tool_parser import (
    ContentDelta,
    Outcome,
    ReasoningDelta,
    ToolCallArgs,
    ToolCallParser,
    ToolCallStart,
    collect,
    parse_output,
)

D = DSML
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "metric": {"type": "boolean"},
                    "scale": {"type": "number"},
                    "tags": {"type": "array", "items": {"type": "string"}},
                    "note": {"type": ["string", "null"]},
                    "unit": {"$ref": "#/$defs/unit"},
                },
                "required": ["city"],
                "$defs": {"unit": {"type": "string", "enum": ["c", "f"]}},
            },
        },
    },
    {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}},
]


def param(key, value, string=True):
    return f'<{D}parameter name="{key}" string="{"true" if string else "false"}">{value}</{D}parameter>'


def invoke(name, *params):
    return f'<{D}invoke name="{name}">\n' + "\n".join(params) + f"\n</{D}invoke>"


def block(*invokes, name="tool_calls"):
    return f"\n\n<{D}{name}>\n" + "\n".join(invokes) + f"\n</{D}{name}>"


WEATHER = invoke("get_weather", param("city", "Paris"), param("days", "3", False))


def ids():
    n = itertools.count()
    return lambda: f"call_{next(n):024x}"


def stream(text, chunks, tools=TOOLS, thinking=False, reason="stop"):
    """Feed ``text`` cut at the sorted offsets ``chunks``; the events and their fold."""
    p = ToolCallParser(tools, thinking, id_factory=ids())
    cuts = [0, *chunks, len(text)]
    events = [e for a, b in itertools.pairwise(cuts) for e in p.feed(text[a:b])]
    events += p.finish(reason)
    return events, collect(events)


def whole(text, tools=TOOLS, thinking=False, reason="stop"):
    return parse_output(text, tools, thinking, reason, id_factory=ids())


def splits(text, rng_seed=0, n_random=40):
    """Every single cut, every character apart, and random multi-cuts."""
    yield from ([i] for i in range(1, len(text)))
    yield list(range(1, len(text)))
    rng = random.Random(rng_seed)
    for _ in range(n_random):
        yield sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(2, 12))))


def args(out, i=0):
    return json.loads(out.tool_calls[i]["function"]["arguments"])


def assert_no_markup(events):
    for e in events:
        if isinstance(e, (ContentDelta, ReasoningDelta)):
            assert DSML not in e.text and "<｜" not in e.text, e


# ---- well-formed --------------------------------------------------------------------


def test_single_call_with_content():
    out = whole("Let me check." + block(WEATHER))
    assert out.content == "Let me check."
    assert out.reasoning_content is None
    assert out.finish_reason == "tool_calls" and out.error is None
    [call] = out.tool_calls
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert call["function"]["arguments"] == '{"city": "Paris", "days": 3}'
    assert call["id"].startswith("call_") and len(call["id"]) == 5 + 24


def test_default_ids_are_random_hex():
    a = parse_output(block(WEATHER, WEATHER), TOOLS, False)
    i, j = (c["id"] for c in a.tool_calls)
    assert i != j and all(len(x) == 29 and int(x[5:], 16) >= 0 for x in (i, j))


def test_multiple_calls_get_indices():
    text = block(WEATHER, invoke("now", ""), invoke("get_weather", param("city", "Oslo")))
    events, out = stream(text, [])
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    assert [s.index for s in starts] == [0, 1, 2]
    assert [s.name for s in starts] == ["get_weather", "now", "get_weather"]
    assert out.content is None and out.finish_reason == "tool_calls"
    assert [args(out, i) for i in range(3)] == [{"city": "Paris", "days": 3}, {}, {"city": "Oslo"}]
    assert events[-1] == Outcome("tool_calls", None, 3)


def test_plain_content_keeps_its_finish_reason():
    out = whole("Hello\n\nworld <b>bold</b> a<｜x｜ \n\n", reason="length")
    assert out.content == "Hello\n\nworld <b>bold</b> a<｜x｜ \n\n"
    assert out.tool_calls == [] and out.finish_reason == "length" and out.error is None


def test_thinking_with_end_think():
    out = whole("<think>step 1\nstep 2</think>Calling." + block(WEATHER), thinking=True)
    assert out.reasoning_content == "step 1\nstep 2" and out.content == "Calling."
    assert args(out) == {"city": "Paris", "days": 3}


def test_thinking_without_end_think_ends_reasoning_at_the_block():
    out = whole("I should call the tool." + block(WEATHER), thinking=True)
    assert out.reasoning_content == "I should call the tool."
    assert out.content is None and out.finish_reason == "tool_calls"
    assert args(out) == {"city": "Paris", "days": 3}
    for cut in splits("x" + block(WEATHER), n_random=5):
        events, s = stream("I should call the tool." + block(WEATHER), cut, thinking=True)
        assert_no_markup(events)
        assert s.reasoning_content == "I should call the tool." and s.tool_calls


def test_thinking_without_block_matches_reasoning_splitter():
    for text in ["<think>abc</think>def", "abc</thi", "<thi", "<think>", "a</think>b</think>c", "x\n\n"]:
        sp = ReasoningSplitter()
        r1, c1 = sp.feed(text)
        r2, c2 = sp.flush()
        out = whole(text, thinking=True)
        assert (out.reasoning_content or "", out.content) == (r1 + r2, c1 + c2), text
        for cut in splits(text, n_random=3) if len(text) > 1 else []:
            assert stream(text, cut, thinking=True)[1] == out


def test_typed_conversion():
    text = block(
        invoke(
            "get_weather",
            param("city", "42", False),  # string-typed, JSON number: becomes "42"
            param("days", "5"),  # integer sent as text: converted
            param("metric", "true"),
            param("scale", "2.5"),
            param("tags", '["a", "b"]', False),
            param("note", "null", False),  # string or null: string="false" passes JSON
            param("unit", "c"),  # $ref to a string enum
            param("extra", "7"),  # unknown: follows its flag
            param("extra2", '{"k": [1]}', False),
        )
    )
    assert args(whole(text)) == {
        "city": "42",
        "days": 5,
        "metric": True,
        "scale": 2.5,
        "tags": ["a", "b"],
        "note": None,
        "unit": "c",
        "extra": "7",
        "extra2": {"k": [1]},
    }
    bad = block(invoke("get_weather", param("city", '"quoted"', False), param("days", "five")))
    assert args(whole(bad)) == {"city": "quoted", "days": "five"}
    assert args(whole(block(invoke("get_weather", param("days", '"5"'), param("scale", "NaN"))))) == {
        "days": '"5"',
        "scale": "NaN",
    }
    assert args(whole(block(invoke("get_weather", param("city", "not json", False))))) == {"city": "not json"}


def test_unicode_escapes_quotes_newlines():
    value = 'Zürich "quoted" back\\slash\n\ttab\x01 é 日本 🌦 </b> <｜ a<b'
    out = whole(block(invoke("get_weather", param("city", value))))
    assert args(out) == {"city": value}
    for cut in splits(block(invoke("get_weather", param("city", value))), n_random=10):
        assert stream(block(invoke("get_weather", param("city", value))), cut)[1] == out
    lone = "a\ud83d b"  # a lone surrogate is escaped, so the JSON stays encodable
    raw = whole(block(invoke("get_weather", param("city", lone))))
    raw.tool_calls[0]["function"]["arguments"].encode()
    assert args(raw) == {"city": lone}


def test_arguments_stream_as_values_arrive():
    text = "Hi" + block(invoke("get_weather", param("city", "Paris"), param("tags", '["x", "y"]', False)))
    events, out = stream(text, list(range(1, len(text))))
    frags = [e.text for e in events if isinstance(e, ToolCallArgs)]
    assert (
        "".join(frags)
        == out.tool_calls[0]["function"]["arguments"]
        == '{"city": "Paris", "tags": ["x", "y"]}'
    )
    assert frags[:6] == ['{"city": "', "P", "a", "r", "i", "s"]  # a fragment per character
    assert frags[-11:] == list('["x", "y"]') + ["}"]  # raw JSON streams as it comes too
    assert events[:3] == [
        ContentDelta("H"),
        ContentDelta("i"),
        ToolCallStart(0, "call_" + "0" * 24, "get_weather"),
    ]


@pytest.mark.parametrize(
    "text,thinking",
    [
        ("Sure, calling now." + block(WEATHER), False),
        ("a\n" + block(WEATHER, invoke("now", ""), invoke("get_weather", param("city", "<é\n>"))), False),
        ("think <b></think>x\n\n" + block(WEATHER), True),
        ("no end think" + block(WEATHER) + EOS, True),
        (block(invoke("get_weather", param("city", "a</b>"), param("days", "7"))) + "\n" + EOS, False),
    ],
)
def test_every_split_gives_the_whole_result(text, thinking):
    expected = whole(text, thinking=thinking)
    assert expected.error is None and expected.tool_calls
    for cut in splits(text):
        events, out = stream(text, cut, thinking=thinking)
        assert out == expected, cut
        assert_no_markup(events)


def test_round_trip_of_reference_rendering():
    # What encoding_dsv4.py renders for an assistant message with these two tool calls
    # (string values raw with string="true", others json.dumps'd), thinking mode, + EOS.
    calls = [
        ("get_weather", {"city": "New York", "days": 2, "tags": ["rain", "wind"], "note": None}),
        ("search", {"query": 'say "hi"\nnow', "filters": {"lang": "en", "n": 1.5}, "exact": False}),
    ]
    text = (
        "The user wants weather.</think>Let me look."
        "\n\n<｜DSML｜tool_calls>\n"
        '<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="city" string="true">New York</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="tags" string="false">["rain", "wind"]</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="note" string="false">null</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n"
        '<｜DSML｜invoke name="search">\n'
        '<｜DSML｜parameter name="query" string="true">say "hi"\nnow</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="filters" string="false">{"lang": "en", "n": 1.5}</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="exact" string="false">false</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n"
        "</｜DSML｜tool_calls><｜end▁of▁sentence｜>"
    )
    tools = TOOLS + [{"type": "function", "function": {"name": "search", "parameters": {}}}]
    out = whole(text, tools=tools, thinking=True)
    assert out.reasoning_content == "The user wants weather." and out.content == "Let me look."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in out.tool_calls] == calls
    assert out.finish_reason == "tool_calls"


def test_deepseek_v32_block_name_and_lenient_whitespace():
    text = f"\n<{D}function_calls>\n\n  " + WEATHER.replace("\n", "\n ") + f"\n\n</{D}function_calls>\n"
    out = whole(text)
    assert out.error is None and args(out) == {"city": "Paris", "days": 3}


def test_empty_block_and_no_params():
    out = whole("x" + f"\n\n<{D}tool_calls>\n</{D}tool_calls>")
    assert out.content == "x" and out.tool_calls == [] and out.finish_reason == "stop" and out.error is None
    out = whole(block(f'<{D}invoke name="now">\n\n</{D}invoke>'))
    assert out.tool_calls[0]["function"]["arguments"] == "{}"


def test_finish_length_after_a_closed_block_is_tool_calls():
    assert whole(block(WEATHER), reason="length").finish_reason == "tool_calls"


# ---- malformed and truncated ----------------------------------------------------------

BEFORE_START = {  # broken before any tool call was announced: the block is content
    "unknown function": block(invoke("nope", param("a", "b"))),
    "bad opener": f"\n\n<{D}tool_call>\n" + WEATHER,
    "no opener": "\n\n" + WEATHER,
    "bad invoke tag": block(f'<{D}invoke  name="get_weather">\n</{D}invoke>'),
    "trailing after empty block": f"\n\n<{D}tool_calls>\n</{D}tool_calls>oops",
}
AFTER_START = {  # broken after a ToolCallStart: error outcome; non-streaming falls back
    "invalid JSON": block(invoke("get_weather", param("city", "x"), param("days", "3,", False))),
    "duplicate parameter": block(invoke("get_weather", param("city", "x"), param("city", "y"))),
    "bad parameter line": block(invoke("get_weather", f'<{D}parameter name="city">x</{D}parameter>')),
    "parameter not closed": block(
        invoke("get_weather", f'<{D}parameter name="city" string="true">x\n{WEATHER}')
    ),
    "unknown second function": block(WEATHER, invoke("nope")),
    "trailing text": block(WEATHER) + "\nAnd more text.",
    "stray think": block(WEATHER) + "</think>",
    "unterminated": block(WEATHER)[: -len(f"\n</{D}tool_calls>")],
}


@pytest.mark.parametrize("name", BEFORE_START)
def test_malformed_before_start_falls_back_to_content(name):
    text = "Answer:" + BEFORE_START[name]
    out = whole(text)
    assert out.content == text and out.tool_calls == [] and out.finish_reason == "stop"
    assert out.error.startswith("malformed tool call: ")
    for cut in splits(text, n_random=10):
        events, s = stream(text, cut)
        assert s == out
        assert not any(isinstance(e, (ToolCallStart, ToolCallArgs)) for e in events)
    if name == "unknown function":
        assert out.error == "malformed tool call: unknown function 'nope'"


@pytest.mark.parametrize("name", AFTER_START)
def test_malformed_after_start_reports_an_error(name):
    text = "Answer:" + AFTER_START[name]
    out = whole(text)
    assert out.content == text and out.tool_calls == [] and out.finish_reason == "stop" and out.error
    events, first = stream(text, [])
    assert first.tool_calls and first.finish_reason == "stop" and first.error == out.error
    assert first.content == "Answer:"
    for cut in splits(text, n_random=10):
        events, s = stream(text, cut)
        assert s == first, cut  # the same partial stream whatever the split
        assert_no_markup(events)


def test_truncated_at_every_offset_never_raises():
    text = "Hi" + block(WEATHER, invoke("get_weather", param("city", "Rome"), param("tags", "[1]", False)))
    for n in range(len(text) + 1):
        for reason in ("length", "abort"):
            out = whole(text[:n], reason=reason)
            if n == len(text):
                assert out.error is None and out.finish_reason == "tool_calls"
            if out.error is None:
                assert out.tool_calls or DSML not in (out.content or "")
                continue
            assert out.finish_reason == reason and out.tool_calls == []
            assert out.content == text[:n]  # the raw reply comes back as content
            assert "truncated" in out.error
            _, s = stream(text[:n], [n // 2] if 0 < n // 2 < n else [], reason=reason)
            assert s.finish_reason == reason and s.error == out.error


def test_unknown_name_never_emits_a_tool_call_delta():
    text = block(invoke("get_weatherX", param("city", "x")))
    for cut in splits(text, n_random=5):
        events, _ = stream(text, cut)
        assert not any(isinstance(e, (ToolCallStart, ToolCallArgs)) for e in events)


def test_no_tools_means_no_known_function():
    out = parse_output("x" + block(WEATHER), None, False)
    assert out.content == "x" + block(WEATHER) and out.tool_calls == []
    assert out.error == "malformed tool call: unknown function 'get_weather'"


def test_held_text_is_released_as_soon_as_it_cannot_be_a_tag():
    p = ToolCallParser(TOOLS, False)
    assert p.feed("Hello\n\n") == [ContentDelta("Hello")]
    assert p.feed("<") == []
    assert p.feed("b>") == [ContentDelta("\n\n<b>")]
    assert p.feed("\n<｜DS") == []
    assert p.feed("x") == [ContentDelta("\n<｜DSx")]
    p = ToolCallParser(TOOLS, True)
    assert p.feed("<think>abc</th") == [ReasoningDelta("abc")]
    assert p.feed("ink>\n") == []
    assert p.finish("stop") == [ContentDelta("\n"), Outcome("stop")]


def test_errors_do_not_raise_on_garbage():
    rng = random.Random(1)
    alphabet = ["<", "/", ">", "\n", '"', D, "tool_calls", "invoke", "parameter", " name=", "get_weather",
                "string=", "true", "false", "x", "{", "}", EOS, "</think>"]  # fmt: skip
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        for thinking in (False, True):
            out = whole(text, thinking=thinking)
            assert isinstance(out.finish_reason, str)
            _, s = stream(
                text, sorted(rng.sample(range(1, len(text)), min(3, len(text) - 1))), thinking=thinking
            )
            if not (out.error and s.tool_calls):
                assert s == out, text
