"""DeepSeek-V4's DSML tool calls, parsed out of the generated text as it streams.

The format (DeepSeek's ``encoding/encoding_dsv4.py`` renders it for assistant turns in
history): after the reasoning (thinking mode, ended by ``</think>``) comes the content,
then optionally one block, then EOS; ``｜DSML｜`` is one token::

    content "\\n\\n<｜DSML｜tool_calls>\\n"
    <｜DSML｜invoke name="NAME">\\n
    <｜DSML｜parameter name="KEY" string="true">raw text</｜DSML｜parameter>\\n
    <｜DSML｜parameter name="KEY" string="false">JSON</｜DSML｜parameter>\\n
    </｜DSML｜invoke>\\n  (more invokes)  </｜DSML｜tool_calls>

An invoke without parameters is ``…">\\n\\n</｜DSML｜invoke>``. DeepSeek-V3.2 named the
block ``function_calls``; both are accepted. Whitespace between tags is not checked; the
tags themselves must be exact. Only functions in ``tools`` are known (None: none).

``ToolCallParser`` turns one choice's text deltas (split anywhere) into events:
``ReasoningDelta`` / ``ContentDelta``, ``ToolCallStart`` (index, ``call_<24 hex>`` id, name)
once an invoke's name is complete and known, ``ToolCallArgs`` fragments whose concatenation
is the call's arguments JSON object (``{"city": "Par`` … ``is", "days": 3}``), and a last
``Outcome``. Values stream as they arrive, typed by the function's schema (``tool_schema``):
a string-typed parameter becomes a JSON string, escaped piece by piece (sent with
``string="false"`` it is decoded at its close instead); any other ``string="false"`` value
passes through as it comes and must be JSON at its close; a non-string-typed value sent as
``string="true"`` (``"5"`` for an integer) is buffered and becomes JSON if ``json.loads``
gives the schema's type, else a string. Parameters the schema does not list follow the flag.

No markup in content or reasoning: ``<｜DSML｜`` starts a block anywhere in the content
(the newlines before it are dropped); in the reasoning a block opener does (the model
forgot ``</think>``, the case of vLLM PR 45862: the reasoning ends there and the block is
parsed). A tail that may still become a tag is held back, and released as soon as it
cannot. ``collect`` folds events into what a client concatenating the stream sees.

Malformed or truncated DSML never raises. The policy:

* Broken before the block's first ``ToolCallStart`` (bad opener, unknown function, bad
  first invoke tag, cut there): the raw block, and all that follows, is content.
* Broken after it (invalid JSON in a ``string="false"`` value, a duplicate or bad
  parameter, an unknown later function, text after the block, cut by max_tokens): nothing
  can be unsent; the rest is swallowed and ``Outcome.error`` says what broke.
* ``Outcome.finish_reason`` is ``"tool_calls"`` for a closed block with a complete call
  and no error, else the engine's (``"length"`` when cut).
* ``parse_output`` (non-streaming) feeds the same parser and equals the stream, except
  that after a post-start failure it returns the raw reply as content, without calls.
* An empty block is dropped: no tool calls, no error.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dsv4_jax.server.encoding import DSML, END_THINK, EOS, THINK
from dsv4_jax.server.tool_schema import fits_non_string, resolve_ref, schema_types, value_kind

TAG = "<" + DSML
OPENERS = tuple(f"{TAG}{n}>" for n in ("tool_calls", "function_calls"))
BLOCK_CLOSES = tuple(f"</{DSML}{n}>" for n in ("tool_calls", "function_calls"))
INVOKE, INVOKE_CLOSE = TAG + "invoke", f"</{DSML}invoke>"
PARAM, PARAM_CLOSE = TAG + "parameter", f"</{DSML}parameter>"

_NAME = re.compile(r'[^"<\n]{0,256}')
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class ReasoningDelta:
    text: str


@dataclass
class ContentDelta:
    text: str


@dataclass
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass
class ToolCallArgs:
    """A fragment of call ``index``'s arguments JSON text."""

    index: int
    text: str


@dataclass
class Outcome:
    """The last event: ``finish_reason`` (``"tool_calls"`` or the engine's), ``error`` (what
    was malformed or truncated, else None), ``tool_calls`` (how many calls completed)."""

    finish_reason: str
    error: str | None = None
    tool_calls: int = 0


Event = ReasoningDelta | ContentDelta | ToolCallStart | ToolCallArgs | Outcome


def _escape(text: str) -> str:
    """``text`` inside a JSON string (lone surrogates escaped, so it stays encodable)."""
    s = json.dumps(text, ensure_ascii=False)[1:-1]
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", s)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _loads(text: str) -> Any:
    """``json.loads`` without Python's NaN / Infinity."""
    return json.loads(text, parse_constant=_no_constant)


def _common(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _held(text: str, marks: Sequence[str], newlines: bool = False) -> int:
    """Length of the longest tail of ``text`` that may still begin one of ``marks`` (and
    the newlines right before it, when ``newlines``)."""
    keep = max(
        (k for m in marks for k in range(1, min(len(m), len(text) + 1)) if m.startswith(text[-k:])), default=0
    )
    while newlines and keep < len(text) and text[-keep - 1] == "\n":
        keep += 1
    return keep


class _Malformed(Exception):
    pass


class _More(Exception):
    """The buffer ends before the current item does."""


class ToolCallParser:
    """Incremental DSML parser for one choice (module docstring). ``feed(delta)`` and
    ``finish(reason)`` return lists of events; ``finish`` ends with an ``Outcome``."""

    def __init__(
        self, tools: Sequence[dict] | None, thinking: bool, *, id_factory: Callable[[], str] | None = None
    ):
        self._funcs = {}
        for t in tools or ():
            f = t.get("function") if isinstance(t, dict) else None
            if isinstance(f, dict) and isinstance(f.get("name"), str):
                self._funcs[f["name"]] = f["parameters"] if isinstance(f.get("parameters"), dict) else {}
        self._new_id = id_factory or (lambda: "call_" + secrets.token_hex(12))
        self._state = "reasoning" if thinking else "content"
        self._at_start = thinking  # a leading "<think>" is dropped, as ReasoningSplitter does
        self._buf = ""  # text not consumed yet
        self._raw: list[str] = []  # consumed text after the reasoning
        self._block_from = 0  # where in _raw the block began
        self._events: list[Event] = []
        self._calls = self._done_calls = 0  # started / completed
        self._error: str | None = None
        self._finished = False
        self._fname, self._func, self._params = "", {}, set()  # the current invoke
        self._key, self._kind, self._types, self._value = "", "", None, []  # its parameter

    @property
    def raw_content(self) -> str:
        """All text after the reasoning, as generated (what a fallback returns)."""
        return "".join(self._raw) + ("" if self._state == "reasoning" else self._buf)

    def feed(self, delta: str) -> list[Event]:
        if self._finished:
            raise RuntimeError("feed after finish")
        self._buf += delta
        self._run()
        return self._flush()

    def finish(self, reason: str = "stop") -> list[Event]:
        if self._finished:
            return []
        self._finished = True
        self._run()
        if self._state == "reasoning":
            if TAG in self._buf:  # a cut-off block opener
                self._state = "content"
                self._run()
            else:
                self._emit(ReasoningDelta, self._buf)
                self._buf = ""
        st = self._state
        if st == "content":
            self._emit(ContentDelta, self._take(len(self._buf)))
        elif st == "done" and self._buf:
            self._fail("text after the tool calls block")
        elif st not in ("reasoning", "done", "raw", "broken"):
            where = "the tool calls block" if st in ("open", "block") else f"a call of {self._fname!r}"
            self._fail(f"the output ended ({reason}) inside {where}", "truncated tool call: ")
        ok = self._error is None and self._state == "done" and self._done_calls > 0
        self._events.append(Outcome("tool_calls" if ok else reason, self._error, self._done_calls))
        return self._flush()

    # ---- plumbing ----

    def _emit(self, cls, text: str, index: int | None = None) -> None:
        if not text:
            return
        last = self._events[-1] if self._events else None
        if type(last) is cls and getattr(last, "index", None) == index:
            last.text += text
        else:
            self._events.append(cls(text) if index is None else cls(index, text))

    def _args(self, text: str) -> None:
        self._emit(ToolCallArgs, text, self._calls - 1)

    def _flush(self) -> list[Event]:
        out, self._events = self._events, []
        return out

    def _take(self, n: int) -> str:
        s, self._buf = self._buf[:n], self._buf[n:]
        if self._state != "reasoning":
            self._raw.append(s)
        return s

    def _fail(self, msg: str, prefix: str = "malformed tool call: ") -> None:
        self._error = prefix + msg
        self._take(len(self._buf))
        if self._calls == 0:  # nothing sent yet: the block is content after all
            self._emit(ContentDelta, "".join(self._raw[self._block_from :]))
            self._state = "raw"
        else:
            self._state = "broken"

    def _run(self) -> None:
        while True:
            try:
                if not getattr(self, "_step_" + self._state)():
                    return
            except _More:
                return
            except _Malformed as e:
                self._fail(str(e))

    def _expect(self, options: Sequence[str], skip_space: bool = True) -> str:
        """Consume one of ``options`` (after whitespace)."""
        if skip_space:
            self._take(len(self._buf) - len(self._buf.lstrip()))
        for o in options:
            if self._buf.startswith(o):
                return self._take(len(o))
        if any(o.startswith(self._buf) for o in options):
            raise _More
        got = self._buf[: max(_common(o, self._buf) for o in options) + 1]
        raise _Malformed(f"expected {' or '.join(map(repr, options))}, got {got!r}")

    def _tag(self, parts: Sequence) -> list[str]:
        """Consume a tag's attributes: literals, ``None`` (a name up to its quote) and
        tuples (one of the literals); return the names and choices."""
        s, pos, vals = self._buf, 0, []
        for part in parts:
            if part is None:
                end = _NAME.match(s, pos).end()
                if end == len(s):
                    raise _More
                vals.append(s[pos:end])
                pos = end
                continue
            opts = (part,) if isinstance(part, str) else part
            hit = next((o for o in opts if s.startswith(o, pos)), None)
            if hit is None:
                if any(o.startswith(s[pos:]) for o in opts):
                    raise _More
                raise _Malformed(f"bad tag {s[: pos + max(_common(o, s[pos:]) for o in opts) + 1][-60:]!r}")
            vals.append(hit)
            pos += len(hit)
        self._take(pos)
        return [v for v, p in zip(vals, parts, strict=True) if not isinstance(p, str)]

    # ---- states: each returns True when it made progress ----

    def _step_reasoning(self) -> bool:
        if self._at_start:
            if THINK.startswith(self._buf) and not self._finished:
                raise _More
            self._buf, self._at_start = self._buf.removeprefix(THINK), False
        b = self._buf
        end = b.find(END_THINK)
        cut = min((i for i in map(b.find, OPENERS) if i >= 0), default=-1)
        if cut < 0 and end < 0:
            keep = max(_held(b, (END_THINK,)), _held(b, OPENERS, True))
            self._emit(ReasoningDelta, b[: len(b) - keep])
            self._buf = b[len(b) - keep :]
            return False
        if cut >= 0 and (end < 0 or cut < end):  # no </think>: the block ends the reasoning
            end = len(b[:cut].rstrip("\n"))
            self._buf = b[end:]
        else:
            self._buf = b[end + len(END_THINK) :]
        self._emit(ReasoningDelta, b[:end])
        self._state = "content"
        return True

    def _step_content(self) -> bool:
        b = self._buf
        i = b.find(TAG)
        n = len(b) - _held(b, (TAG,), True) if i < 0 else len(b[:i].rstrip("\n"))
        self._emit(ContentDelta, self._take(n))
        if i < 0:
            return False
        self._block_from, self._state = len(self._raw), "open"
        return True

    def _step_open(self) -> bool:
        self._expect(OPENERS)
        self._state = "block"
        return True

    def _step_block(self) -> bool:
        self._state = "invoke_tag" if self._expect((INVOKE, *BLOCK_CLOSES)) == INVOKE else "done"
        return True

    def _step_invoke_tag(self) -> bool:
        [name] = self._tag((' name="', None, '">'))
        if name not in self._funcs:
            raise _Malformed(f"unknown function {name!r}")
        self._fname, self._func, self._params = name, self._funcs[name], set()
        self._calls += 1
        self._events.append(ToolCallStart(self._calls - 1, self._new_id(), name))
        self._state = "invoke"
        return True

    def _step_invoke(self) -> bool:
        if self._expect((PARAM, INVOKE_CLOSE)) == PARAM:
            self._state = "param_tag"
            return True
        self._args("}" if self._params else "{}")
        self._done_calls += 1
        self._state = "block"
        return True

    def _step_param_tag(self) -> bool:
        key, flag = self._tag((' name="', None, '" string="', ('true"', 'false"'), ">"))
        if key in self._params:
            raise _Malformed(f"duplicate parameter {key!r} in {self._fname!r}")
        props = self._func.get("properties")
        sub = props.get(key) if isinstance(props, dict) else None
        kind = "either" if sub is None else value_kind(sub, self._func)
        self._types = schema_types(resolve_ref(sub, self._func))
        if flag == 'true"':
            self._kind = "buf" if kind == "json" else "str"
        else:
            self._kind = "tostr" if kind == "string" else "raw"
        sep = ", " if self._params else "{"
        self._args(sep + json.dumps(key, ensure_ascii=False) + (': "' if self._kind == "str" else ": "))
        self._params.add(key)
        self._key, self._value = key, []
        self._state = "value"
        return True

    def _release(self, n: int) -> None:
        text = self._take(n)
        if self._kind == "str":
            self._args(_escape(text))
            return
        self._value.append(text)
        if self._kind == "raw":
            self._args(text)

    def _step_value(self) -> bool:
        b = self._buf
        i = b.find(DSML)
        marks = (PARAM_CLOSE, TAG, DSML)  # a DSML anywhere in a value is an error
        if i < 0:
            self._release(len(b) - _held(b, marks))
            return False
        if i >= 2 and b[i - 2 : i] == "</":
            self._release(i - 2)
            if b.startswith(PARAM_CLOSE, i - 2):
                self._take(len(PARAM_CLOSE))
                self._close_value()
                self._state = "invoke"
                return True
            if PARAM_CLOSE.startswith(self._buf):
                return False
        else:
            self._release(i - _held(b[:i], marks))
        raise _Malformed(f"parameter {self._key!r} of {self._fname!r} is not closed by {PARAM_CLOSE!r}")

    def _close_value(self) -> None:
        if self._kind == "str":
            self._args('"')
            return
        text = "".join(self._value)
        try:
            v, ok = _loads(text), True
        except ValueError:
            v, ok = text, False
        if self._kind == "raw" and not ok:
            raise _Malformed(f"invalid JSON in parameter {self._key!r} of {self._fname!r}: {text[:40]!r}")
        elif self._kind == "tostr":
            self._args('"' + _escape(v if isinstance(v, str) else text) + '"')
        elif self._kind == "buf":  # a non-string type written as text: JSON if it has that type
            ok = ok and fits_non_string(v, self._types)
            self._args(text.strip() if ok else '"' + _escape(text) + '"')

    def _step_done(self) -> bool:
        try:
            self._expect((EOS,))
        except _Malformed:
            raise _Malformed("text after the tool calls block") from None
        return True

    def _step_raw(self) -> bool:
        self._emit(ContentDelta, self._take(len(self._buf)))
        return False

    def _step_broken(self) -> bool:
        self._take(len(self._buf))
        return False


@dataclass
class ParsedOutput:
    """A whole choice. ``reasoning_content`` is None when there was none; ``content`` is
    None when there are tool calls and no text; ``tool_calls`` in OpenAI's shape."""

    reasoning_content: str | None
    content: str | None
    tool_calls: list[dict] = field(default_factory=list)
    finish_reason: str = "stop"
    error: str | None = None


def collect(events: Sequence[Event]) -> ParsedOutput:
    """Fold a choice's events into one ``ParsedOutput``: what a client that concatenates
    the stream sees."""
    reasoning, content, calls = [], [], []
    out = ParsedOutput(None, None)
    for e in events:
        if isinstance(e, ReasoningDelta):
            reasoning.append(e.text)
        elif isinstance(e, ContentDelta):
            content.append(e.text)
        elif isinstance(e, ToolCallStart):
            calls.append({"id": e.id, "type": "function", "function": {"name": e.name, "arguments": ""}})
        elif isinstance(e, ToolCallArgs):
            calls[e.index]["function"]["arguments"] += e.text
        elif isinstance(e, Outcome):
            out.finish_reason, out.error = e.finish_reason, e.error
    text = "".join(content)
    out.reasoning_content, out.content, out.tool_calls = (
        "".join(reasoning) or None,
        text or None if calls else text,
        calls,
    )
    return out


def parse_output(
    text: str,
    tools: Sequence[dict] | None,
    thinking: bool,
    finish_reason: str = "stop",
    *,
    id_factory: Callable[[], str] | None = None,
) -> ParsedOutput:
    """Parse a whole output with ``ToolCallParser`` (one feed). After a failure past the
    first tool call the raw reply is returned as content, without tool calls."""
    p = ToolCallParser(tools, thinking, id_factory=id_factory)
    out = collect(p.feed(text) + p.finish(finish_reason))
    if out.error is not None and out.tool_calls:
        out.content, out.tool_calls = p.raw_content, []
    return out
