"""Grammars for response_format and tool_choice (server/tool_grammar.py), checked token by
token with llguidance against the demo tokenizer, and against the DSML parser."""

import json
import random

import jsonschema
import llguidance
import llguidance.numpy
import numpy as np
import pytest

from dsv4_jax.server.encoding import DSML
from dsv4_jax.server.tool_grammar import (
    GrammarError,
    compile_matcher,
    json_grammar,
    llg_tokenizer,
    tool_call_grammar,
)
from dsv4_jax.server.tool_parser import parse_output
from dsv4_jax.server.tool_schema import resolve_ref, schema_types

D = DSML
EOS_ID = 1
N_VOCAB = 1024  # the demo model's vocabulary (the tokenizer has 1006 entries)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"$ref": "#/$defs/unit"},
                "days": {"type": "integer", "minimum": 1},
                "opts": {
                    "type": "object",
                    "properties": {"a": {"type": "array", "items": {"type": "number"}}},
                    "required": ["a"],
                    "additionalProperties": False,
                },
                "note": {"type": ["string", "null"]},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
            "$defs": {"unit": {"type": "string", "enum": ["c", "cc"]}},
        },
    },
}
NOW = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}
FREE = {"type": "function", "function": {"name": "free", "parameters": {"type": "object"}}}
TOOLS = [WEATHER, NOW, FREE]


def param(key, value, string=True):
    return f'<{D}parameter name="{key}" string="{"true" if string else "false"}">{value}</{D}parameter>'


def invoke(name, *params):
    return f'<{D}invoke name="{name}">\n' + "\n".join(params) + f"\n</{D}invoke>"


def block(*invokes):
    return f"\n\n<{D}tool_calls>\n" + "\n".join(invokes) + f"\n</{D}tool_calls>"


GOOD = invoke(
    "get_weather",
    param("city", "Pa<r/is\n"),
    param("unit", "cc"),
    param("days", "3", False),
    param("opts", '{"a": [1, 2.5]}', False),
    param("note", "null", False),
)
MINIMAL = invoke("get_weather", param("city", "x"), param("days", "1", False))


def allowed(m, t):
    mask = llguidance.numpy.allocate_token_bitmask(1, N_VOCAB)
    llguidance.numpy.fill_next_token_bitmask(m, mask, 0)
    return bool((mask[0, t // 32] >> (t % 32)) & 1)


def accepts(tok, grammar, text):
    """Every token of ``text`` is in the mask and consumed, and then EOS is allowed."""
    m = compile_matcher(grammar, tok, n_vocab=N_VOCAB)
    for t in tok.encode(text, add_special_tokens=False).ids:
        if not allowed(m, t) or not m.consume_token(t):
            return False
    return allowed(m, EOS_ID) and m.is_accepting()


def validate(value, schema):
    """``value`` satisfies ``schema`` (jsonschema), and every value the schema types as
    integer only is written as one: jsonschema takes ``3.0`` for an integer, a strict
    client would not."""
    jsonschema.validate(value, schema)
    exact_integers(value, schema, schema)


def exact_integers(value, schema, root):
    schema = resolve_ref(schema, root)
    types = schema_types(schema) or []
    if "integer" in types and "number" not in types and type(value) is float:
        raise AssertionError(f"{value!r} for an integer in {schema}")
    if isinstance(value, dict):
        for k, v in value.items():
            if k in schema.get("properties", {}):
                exact_integers(v, schema["properties"][k], root)
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for v in value:
            exact_integers(v, schema["items"], root)


def check_parsed(text, thinking, tools=TOOLS):
    out = parse_output(text, tools, thinking)
    assert out.error is None, out.error
    funcs = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for call in out.tool_calls:
        validate(json.loads(call["function"]["arguments"]), funcs[call["function"]["name"]])
    return out


def test_validate_checks_arguments():
    params = WEATHER["function"]["parameters"]
    validate({"city": "x", "unit": "cc", "days": 3, "opts": {"a": [1, 2.5]}, "note": None}, params)
    for bad in ({"city": "x"}, {"city": "x", "days": 0}, {"city": "x", "days": 3, "unit": "f"}):
        with pytest.raises(jsonschema.ValidationError):
            validate(bad, params)
    with pytest.raises(AssertionError, match="for an integer"):
        validate({"city": "x", "days": 3.0}, params)


# ---- response_format ----------------------------------------------------------------


def test_json_object(tok):
    g = json_grammar(None)
    assert accepts(tok, g, '{"a": [1, "x"]}')
    assert not accepts(tok, g, "[1]")
    assert not accepts(tok, g, 'Sure: {"a": 1}')


def test_json_schema_and_thinking(tok):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    g = json_grammar(schema)
    assert accepts(tok, g, '{"n": 3}')
    assert not accepts(tok, g, '{"m": 3}') and not accepts(tok, g, '{"n": "3"}')
    g = json_grammar(schema, thinking=True)
    assert accepts(tok, g, 'hmm, a "number"</think>{"n": 3}')
    assert not accepts(tok, g, '{"n": 3}')


def test_schema_errors_name_their_place():
    with pytest.raises(GrammarError, match=r"^response_format\.json_schema\.schema: .*strin"):
        json_grammar({"type": "strin"})
    json_grammar({"type": "object", "if": {}}, lenient=True)  # unimplemented keyword, ignored
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    bad["function"]["parameters"]["properties"]["days"] = {"type": "integer", "minimum": "x"}
    with pytest.raises(GrammarError, match=r"^tools\[1\]\.function\.parameters\.properties\.days: "):
        tool_call_grammar([WEATHER, bad], "required", False)
    with pytest.raises(GrammarError, match=r"^tools\[0\]\.function\.parameters: "):
        tool_call_grammar(
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
            "required",
            False,
        )
    with pytest.raises(GrammarError, match=r"^tools\[1\]\.function\.name"):
        tool_call_grammar([WEATHER, {"type": "function", "function": {"name": 'a"b'}}], "required", False)
    with pytest.raises(GrammarError, match="no tool named 'nope'"):
        tool_call_grammar(TOOLS, "nope", False)
    with pytest.raises(GrammarError, match="at least one tool"):
        tool_call_grammar([], "required", False)
    assert issubclass(GrammarError, ValueError)


# ---- tool_choice --------------------------------------------------------------------

VALID = {
    "one": block(GOOD),
    "several": block(
        GOOD, invoke("now", ""), MINIMAL, invoke("free", param("x", "y"), param("z", "[1]", False))
    ),
    "no parameters": block(invoke("now", "")),
    "enum prefix": block(
        invoke("get_weather", param("city", "x"), param("unit", "c"), param("days", "2", False))
    ),
}
INVALID = {
    "wrong name": block(invoke("nope", param("city", "x"))),
    "missing required": block(invoke("get_weather", param("city", "x"))),
    "wrong type": block(invoke("get_weather", param("city", "x"), param("days", '"3"', False))),
    "below minimum": block(invoke("get_weather", param("city", "x"), param("days", "0", False))),
    "out of order": block(invoke("get_weather", param("days", "3", False), param("city", "x"))),
    "extra property": block(
        invoke("get_weather", param("city", "x"), param("days", "3", False), param("zz", "1"))
    ),
    "not in enum": block(
        invoke("get_weather", param("city", "x"), param("unit", "f"), param("days", "3", False))
    ),
    "string as json": block(invoke("get_weather", param("city", '"x"', False), param("days", "3", False))),
    "spaced json": block(invoke("get_weather", param("city", "x"), param("days", " 3", False))),
    "markup in value": block(invoke("get_weather", param("city", f"a{D}b"), param("days", "3", False))),
    "text after the block": block(GOOD) + "\nDone.",
    "no blank line": block(GOOD)[1:],
    "content first": "Calling." + block(GOOD),
}


@pytest.mark.parametrize("thinking", [False, True])
def test_required(tok, thinking):
    g = tool_call_grammar(TOOLS, "required", thinking)
    pre = 'I need "weather" <data>.</think>' if thinking else ""
    for name, text in VALID.items():
        assert accepts(tok, g, pre + text), name
        out = check_parsed(pre + text, thinking)
        assert out.finish_reason == "tool_calls" and out.content is None
    for name, text in INVALID.items():
        assert not accepts(tok, g, pre + text), name
    if thinking:
        assert not accepts(tok, g, VALID["one"])  # the reasoning must be closed
        assert not accepts(tok, g, f"a{D}b</think>" + VALID["one"])
    else:
        assert not accepts(tok, g, "")


def test_named_and_single(tok):
    g = tool_call_grammar(TOOLS, "get_weather", False)
    assert accepts(tok, g, block(GOOD)) and accepts(tok, g, block(GOOD, MINIMAL))
    assert not accepts(tok, g, block(invoke("now", "")))
    assert not accepts(tok, g, block(GOOD, invoke("now", "")))
    g = tool_call_grammar(TOOLS, "required", False, parallel=False)
    assert accepts(tok, g, block(GOOD)) and not accepts(tok, g, block(GOOD, MINIMAL))


@pytest.mark.parametrize("thinking", [False, True])
def test_auto(tok, thinking):
    g = tool_call_grammar(TOOLS, "auto", thinking)
    pre = "thinking...</think>" if thinking else ""
    for text in ["", "Just an answer.", "a\n\n<b>x</b>\n\n", "Calling." + block(GOOD), VALID["several"]]:
        assert accepts(tok, g, pre + text), text
        check_parsed(pre + text, thinking)
    for name in ("missing required", "wrong type", "wrong name", "text after the block"):
        assert not accepts(tok, g, pre + INVALID[name]), name
    # non-strict functions: any well-formed invoke
    loose = block(invoke("now", param("anything", "goes"), param("n", "[1, {}]", False)))
    assert accepts(tok, g, pre + loose)
    assert not accepts(tok, g, pre + block(invoke("now", param("n", "[1,", False))))
    assert not accepts(tok, g, pre + f"text {D} stray")
    assert tool_call_grammar([NOW, FREE], "auto", thinking) is None  # nothing strict
    assert tool_call_grammar(TOOLS, "none", thinking) is None


@pytest.mark.parametrize("choice,thinking", [("required", False), ("auto", True)])
def test_grammar_walks_parse_to_valid_arguments(tok, choice, thinking):
    """Random walks through a grammar (a random allowed token, or now and then a block
    opener or closing sequence it allows, so that walks end): whatever it lets the model write, the parser
    turns into schema-valid calls."""
    tools = [WEATHER, NOW, {**FREE, "function": {**FREE["function"], "strict": True}}]
    g = tool_call_grammar(tools, choice, thinking)
    closers = [
        f"\n\n<{D}tool_calls>",
        f"</{D}parameter>",
        f"\n</{D}invoke>",
        f"\n</{D}tool_calls>",
        "</think>",
        "]",
        "}",
        '"',
        "1",
    ]
    closers = [tok.encode(s, add_special_tokens=False).ids for s in closers] + [[EOS_ID]]
    rng, finished, calls = random.Random(0), 0, 0
    for _ in range(16):
        m, ids = compile_matcher(g, tok, n_vocab=N_VOCAB), []
        for _ in range(300):
            mask = llguidance.numpy.allocate_token_bitmask(1, N_VOCAB)
            llguidance.numpy.fill_next_token_bitmask(m, mask, 0)
            bits = np.unpackbits(mask[0].view(np.uint8), bitorder="little")[: tok.get_vocab_size()]
            ok = [int(i) for i in np.flatnonzero(bits)]
            seq = None
            if rng.random() < 0.3:
                seq = next(
                    (c for c in rng.sample(closers, len(closers)) if m.validate_tokens(c) == len(c)), None
                )
            seq = seq or [rng.choice([i for i in ok if i != EOS_ID] or ok)]
            if seq == [EOS_ID]:
                break
            assert m.consume_tokens(seq)
            ids += seq
        else:
            continue
        finished += 1
        out = check_parsed(tok.decode(ids), thinking, tools)
        calls += len(out.tool_calls)
        if choice == "required":
            assert out.tool_calls and out.finish_reason == "tool_calls"
    assert finished >= 8 and calls >= 4


def test_matcher_cache_and_errors(tok):
    assert llg_tokenizer(tok, N_VOCAB) is llg_tokenizer(tok, N_VOCAB)
    assert llg_tokenizer(tok).vocab_size == tok.get_vocab_size()
    assert llg_tokenizer(tok, N_VOCAB).eos_token == EOS_ID
    with pytest.raises(GrammarError):
        compile_matcher(llguidance.LLMatcher.grammar_from_lark("start: <nope_token>"), tok)
