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
    want = (
        BOS + "S1\n\nS2" + USER + "Q1" + ASSISTANT + END_THINK + "A1" + EOS + USER + "Q2" + ASSISTANT + THINK
    )
    assert E.render(msgs, thinking=True) == want
    assert "secret" not in E.render(msgs)


def test_markers_tokenize_to_single_special_ids(tok):
    ids = tok.encode(
        E.render(
            [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Yo"},
                {"role": "user", "content": "?"},
            ],
            thinking=True,
        )
    ).ids
    assert ids[0] == 0 and ids.count(1000) == 2 and ids.count(1001) == 2 and ids[-1] == 1002
    assert ids.count(1) == 1 and ids.count(1003) == 1  # EOS ends turn 1, whose thinking block is closed


@pytest.mark.parametrize(
    "msgs,match",
    [
        ([{"role": "assistant", "content": "x"}], "must follow a user"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "last message"),
        ([{"role": "system", "content": "x"}], "last message"),
        ([{"role": "tool", "content": "x"}], "tool"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "only text"),
    ],
)
def test_unencodable_conversations(msgs, match):
    with pytest.raises(E.EncodingError, match=match):
        E.render(msgs)


def test_thinking_flags():
    assert E.thinking_requested({"thinking": True}, None) and E.thinking_requested(
        {"enable_thinking": True}, None
    )
    assert not E.thinking_requested(None, None) and not E.thinking_requested({"thinking": False}, "high")
    assert E.thinking_requested(None, "low") and not E.thinking_requested(None, "none")
    with pytest.raises(E.EncodingError):
        E.thinking_requested({"thinking": 1}, None)


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
