"""DeepSeek-V4 chat encoding (ARCHITECTURE.md §9) and the reasoning split, exactly."""

import pytest

from dsv4_jax.server import encoding as E
from dsv4_jax.server.encoding import ASSISTANT, BOS, END_THINK, EOS, THINK, USER


def test_single_turn_chat_and_thinking_modes():
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]
    assert E.render(msgs) == BOS + "You are terse." + USER + "Hi" + ASSISTANT + END_THINK
    assert E.render(msgs, thinking=True) == BOS + "You are terse." + USER + "Hi" + ASSISTANT + THINK
    assert E.render([{"role": "user", "content": "Hi"}]) == BOS + USER + "Hi" + ASSISTANT + END_THINK


def test_multi_turn_drops_earlier_reasoning_and_closes_turns_with_eos():
    msgs = [
        {"role": "system", "content": "S1"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1", "reasoning_content": "secret thoughts"},
        {"role": "developer", "content": "S2"},
        {"role": "user", "content": [{"type": "text", "text": "Q"}, {"type": "text", "text": "2"}]},
    ]
    head = BOS + "S1" + USER + "Q1" + ASSISTANT + END_THINK + "A1" + EOS
    # thinking (no tools): the developer message before the last user message is dropped
    assert E.render(msgs, thinking=True) == head + USER + "Q2" + ASSISTANT + THINK
    # chat: a developer message is a user turn of its own
    assert E.render(msgs) == head + USER + "S2" + USER + "Q2" + ASSISTANT + END_THINK
    assert "secret" not in E.render(msgs) + E.render(msgs, thinking=True)


def test_markers_tokenize_to_single_special_ids(tok):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": 1, "b": "x"}'}}
    text = E.render(
        [
            {"role": "latest_reminder", "content": "2026-01-01"},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Yo", "reasoning_content": "r", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c", "content": "ok"},
        ],
        thinking=True,
        tools=[tool],
    )
    ids = tok.encode(text).ids
    assert ids[0] == 0 and ids[-2:] == [1001, 1002]
    markers = {BOS: 0, EOS: 1, USER: 1000, ASSISTANT: 1001, THINK: 1002, END_THINK: 1003}
    markers |= {E.DSML: 1004, E.LATEST_REMINDER: 1005}
    for marker, tid in markers.items():  # every occurrence is one token
        assert text.count(marker) == ids.count(tid) > 0, marker
    assert text.count(E.DSML) == 17  # 12 in the tools block, 5 in the call


def _call(cid, arguments='{"q": "x"}'):
    return {"id": cid, "type": "function", "function": {"name": "f", "arguments": arguments}}


_Q = {"role": "user", "content": "q"}
_CALLS = {"role": "assistant", "content": None, "tool_calls": [_call("a")]}
_TOOL = {"role": "tool", "tool_call_id": "a", "content": "r"}
_TOOLS = [{"type": "function", "function": {"name": "f"}}]


@pytest.mark.parametrize(
    "msgs,kwargs,where,problem",
    [
        (
            [{"role": "assistant", "content": "x"}],
            {},
            "messages[0]: ",
            "must follow a user, tool or developer",
        ),
        (
            [_Q, {"role": "assistant", "content": "y"}],
            {},
            "the last message (messages[1])",
            "got 'assistant'",
        ),
        ([{"role": "system", "content": "x"}], {}, "the last message (messages[0])", "got 'system'"),
        ([_Q, {"role": "latest_reminder", "content": "r"}], {}, "the last message (messages[1])", "reminder"),
        (
            [_Q, {"role": "latest_reminder", "content": "r"}, _Q],
            {},
            "messages[1]: ",
            "followed by an assistant",
        ),
        (
            [{"role": "tool", "content": "x", "tool_call_id": "a"}],
            {},
            "messages[0]: ",
            "must follow an assistant",
        ),
        (
            [_Q, _CALLS, _TOOL, {"role": "assistant", "content": "ok"}, _TOOL],
            {},
            "messages[4]: ",
            "tool_calls",
        ),
        (
            [_Q, _CALLS, _TOOL | {"tool_call_id": "zz"}],
            {},
            "messages[2]: ",
            "'zz' matches no tool call of the",
        ),
        ([_Q, _CALLS, _TOOL | {"tool_call_id": None}], {}, "messages[2]: ", "needs a tool_call_id"),
        ([_Q, _CALLS, _TOOL | {"content": None}], {}, "messages[2]: ", "a tool message needs content"),
        (
            [_Q, _CALLS | {"tool_calls": [_call("a", "{oops")]}, _TOOL],
            {},
            "messages[1]: ",
            "arguments must be a JSON",
        ),
        (
            [_Q, _CALLS | {"tool_calls": [_call("a", "[1, 2]")]}, _TOOL],
            {},
            "messages[1]: ",
            "tool_calls[0].function",
        ),
        (
            [_Q, _CALLS | {"tool_calls": [_call("a", {"q": 1})]}, _TOOL],
            {},
            "messages[1]: ",
            "JSON object string",
        ),
        ([_Q, _CALLS | {"tool_calls": [{"id": "a"}]}, _TOOL], {}, "messages[1]: ", "tool_calls[0] must be"),
        ([{"role": "user", "content": None}], {}, "messages[0]: ", "a user message needs content"),
        ([{"role": "user", "content": []}], {}, "messages[0]: ", "a user message needs content"),
        ([{"role": "system"}, _Q], {}, "messages[0]: ", "a system message needs content"),
        ([{"role": "developer", "content": ""}], {}, "messages[0]: ", "non-empty content"),
        (
            [_Q, {"role": "user", "content": [{"type": "image_url"}]}],
            {},
            "messages[1]: ",
            "only text content",
        ),
        ([{"role": "function", "content": "x"}, _Q], {}, "messages[0]: ", "unknown role 'function'"),
        ([], {}, "messages: ", "empty"),
        (
            [{"role": "system", "content": "s"}, {"role": "developer", "content": "d"}, _CALLS, _TOOL],
            {"thinking": True},
            "messages[2]: ",
            "developer messages before the last user message are dropped",
        ),
        ([_Q], {"reasoning_effort": "extreme"}, "reasoning_effort ", "one of none, minimal"),
        ([_Q], {"tools": [{"type": "web_search"}]}, "tools[0] ", "must be {'type': 'function'"),
        ([_Q], {"response_format": {"type": "xml"}}, "response_format ", "json_schema"),
        (
            [{"role": "system", "content": "s", "tools": _TOOLS}, _Q],
            {"tools": _TOOLS},
            "tools ",
            "messages[0]",
        ),
    ],
)
def test_unencodable_conversations(msgs, kwargs, where, problem):
    with pytest.raises(E.EncodingError) as e:
        E.render(msgs, **kwargs)
    assert str(e.value).startswith(where) and problem in str(e.value), str(e.value)
    param = next(
        (p for p in ("reasoning_effort", "tools", "response_format") if where.startswith(p)), "messages"
    )
    assert e.value.param == param


def test_empty_user_text_and_assistant_without_content_are_fine():
    msgs = [{"role": "user", "content": ""}, _CALLS, _TOOL]
    assert E.render(msgs).startswith(BOS + USER + ASSISTANT + END_THINK + "\n\n<" + E.DSML + "tool_calls>")


def test_thinking_flags():
    assert E.thinking_requested({"thinking": True}, None) and E.thinking_requested(
        {"enable_thinking": True}, None
    )
    assert not E.thinking_requested(None, None) and not E.thinking_requested({"thinking": False}, "high")
    assert E.thinking_requested(None, "low") and not E.thinking_requested(None, "none")
    assert all(E.thinking_requested(None, x) for x in ("minimal", "medium", "max"))
    with pytest.raises(E.EncodingError) as e:
        E.thinking_requested({"thinking": 1}, None)
    assert e.value.param == "chat_template_kwargs"
    with pytest.raises(E.EncodingError, match="reasoning_effort") as e:
        E.thinking_requested(None, "turbo")
    assert e.value.param == "reasoning_effort"


def test_split_whole_text():
    assert E.split_reasoning("abc</think>def") == ("abc", "def")
    assert E.split_reasoning("<think>abc</think>") == ("abc", "")
    assert E.split_reasoning("still thinking") == ("still thinking", "")
    assert E.split_reasoning("</think>direct") == (None, "direct")


@pytest.mark.parametrize(
    "text",
    [
        "Reason here.</think>Answer.",
        "<think>r</think>a</think>b",
        "no end <",
        "x</thi",
        "</think>",
        "<thi",
        "a</",
        "<think>",
    ],
)
def test_streaming_split_equals_whole_split_for_every_chunking(text):
    want = E.split_reasoning(text)
    for cut in range(len(text) + 1):
        for cut2 in range(cut, len(text) + 1):
            s = E.ReasoningSplitter()
            parts = [s.feed(p) for p in (text[:cut], text[cut:cut2], text[cut2:])] + [s.flush()]
            r, c = "".join(p[0] for p in parts), "".join(p[1] for p in parts)
            assert ((r or None), c) == want, (text, cut, cut2)
