"""DeepSeek-V4's chat encoding and the split of thinking output (ARCHITECTURE.md §9).

V4 ships no Jinja template: DeepSeek's ``encoding/encoding_dsv4.py`` builds the prompt by
concatenating markers, and ``render`` reproduces its output byte for byte (the corpus test
holds its published cases). For an OpenAI conversation::

    BOS [max-effort prefix] system [tools block] [response-format block] [<｜latest_reminder｜>…]
        "<｜User｜>" user "<｜Assistant｜>" "</think>" answer EOS
        "<｜User｜>" <tool_result>…</tool_result> … "<｜Assistant｜>" ("</think>" | "<think>")

* Mode. The marker after the last ``<｜Assistant｜>`` picks it: ``</think>`` (chat: the
  thinking block is closed before it starts) or ``<think>`` (thinking: the model reasons,
  closes with ``</think>``, then answers). The think marker belongs to the user turn that
  opens the assistant's turn.
* Roles. A system message's text is written where it stands, with no separator; a
  ``developer`` message (DeepSeek's agent role, not OpenAI's alias for system) is a user
  turn of its own, ``<｜User｜>`` + text.
* History. Without tools, earlier turns are rendered as chat turns: their reasoning is
  dropped (the model was trained that way, and it keeps long histories short), and in
  thinking mode developer messages before the last user message are dropped too. With
  tools, nothing is dropped: every user turn opens with ``<think>`` and every assistant
  turn keeps ``reasoning_content + "</think>"``, so a multi-step agent sees its reasoning.
* Tools. The reference takes them on a system or developer message (``"tools"``, also
  accepted here) and appends the "## Tools" block to that message's text. An OpenAI request
  has them at top level: they go on ``messages[0]`` when it is a system message, else on a
  new empty system message at the front (so the prompt starts ``BOS + "\\n\\n## Tools"``,
  which is what the reference renders for an empty system message).
* Tool calls in history are DSML blocks after the assistant's content: one
  ``parameter`` line per argument, ``string="true"`` with the raw text for a string,
  ``string="false"`` with compact JSON otherwise.
* Tool results. V4 has no tool role: consecutive tool and user messages form one user turn
  of blocks joined by blank lines, a result as ``<tool_result>…</tool_result>``; results
  are sorted by the order of the calls in the preceding assistant message.
* ``latest_reminder`` (date, locale, …) renders as ``<｜latest_reminder｜>`` + text where it
  stands. A user turn right before a reminder opens the assistant's turn, as in the
  reference, so such a reminder must be followed by the assistant's reply.
* ``reasoning_effort="max"`` in thinking mode puts DeepSeek's "Think Max" prefix right
  after BOS; the other OpenAI levels only turn thinking on (``thinking_requested``).
* ``response_format`` renders as "## Response Format" with a JSON schema after the tools
  block. OpenAI's ``json_schema`` passes ``json_schema.schema`` (the schema the reply must
  match; its ``name`` / ``strict`` are no part of it); a ``json_schema`` without a schema
  and ``json_object`` pass ``{"type": "object"}``; ``text`` adds nothing. On a message
  (the reference's form) ``response_format`` is the schema itself.

The reference crashes or renders junk (``None``, a dangling ``<｜Assistant｜>``) on some
inputs; ``render`` raises ``EncodingError`` instead, naming the message (``messages[3]``)
and the problem.

The markers are single tokens in the tokenizer (``load_tokenizer`` checks that), and the
tokenizer matches them inside the rendered string, so ``render`` returns text and the
caller tokenizes it once. ``ReasoningSplitter`` turns the generated text of a thinking
request into ``reasoning_content`` and ``content``, for a whole text or a stream of
deltas; in a stream a ``</think>`` may arrive split over several deltas, so a suffix that
could begin it is held back until the next delta decides.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"
DSML = "｜DSML｜"
LATEST_REMINDER = "<｜latest_reminder｜>"

REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "max")

# Prompt text the model was trained on: byte-identical to DeepSeek's encoding_dsv4.py.
REASONING_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
    "edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate "
    "step, considered alternative, and rejected hypothesis to ensure absolutely no assumption "
    "is left unchecked.\n\n"
)
TOOLS_HEAD = (
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke "
    f'tools by writing a "<{DSML}tool_calls>" block like the following:\n\n'
    f"<{DSML}tool_calls>\n"
    f'<{DSML}invoke name="$TOOL_NAME">\n'
    f'<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>\n'
    "...\n"
    f"</{DSML}invoke>\n"
    f'<{DSML}invoke name="$TOOL_NAME2">\n'
    "...\n"
    f"</{DSML}invoke>\n"
    f"</{DSML}tool_calls>\n\n"
    'String parameters should be specified as is and set `string="true"`. For all other types '
    "(numbers, booleans, arrays, objects), pass the value in JSON format and set "
    '`string="false"`.\n\n'
    f"If thinking_mode is enabled (triggered by {THINK}), you MUST output your complete "
    f"reasoning inside {THINK}...{END_THINK} BEFORE any tool calls or final response.\n\n"
    f"Otherwise, output directly after {END_THINK} with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
)  # + one JSON line per function + TOOLS_TAIL
TOOLS_TAIL = (
    "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
)
RESPONSE_FORMAT_HEAD = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"

_OPENS_ASSISTANT = ("user", "developer")  # turns after which the assistant may speak


class EncodingError(ValueError):
    """A conversation this encoding cannot express; the message says which message and why.
    ``param`` is the request field at fault (for the API's error body)."""

    def __init__(self, message: str, param: str = "messages"):
        super().__init__(message)
        self.param = param


def message_text(content: str | Sequence[dict[str, Any]] | None, where: str, sep: str = "") -> str:
    """OpenAI content: a string or a list of parts; only text parts can be encoded."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)):
        raise EncodingError(f"{where}: content must be a string or a list of text parts")
    out = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise EncodingError(f"{where}: only text content parts are supported, got type {kind!r}")
        out.append(part["text"])
    return sep.join(out)


def check_reasoning_effort(effort: str | None) -> None:
    if effort is not None and effort not in REASONING_EFFORTS:
        raise EncodingError(
            f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, got {effort!r}",
            param="reasoning_effort",
        )


@dataclass
class _Turn:
    role: str  # system | developer | user | assistant | latest_reminder
    where: str  # "messages[i]" of its first message
    text: str = ""
    blocks: list[tuple[int | None, str]] = field(default_factory=list)  # user: (call order | None, text)
    reasoning: str = ""
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # assistant: (name, arguments)
    call_order: dict[str, int] = field(default_factory=dict)  # assistant: call id -> position
    tools: list[dict[str, Any]] | None = None  # system / developer: function schemas
    schema: Any = None  # system / developer: response-format schema


def render(
    messages: Sequence[dict[str, Any]],
    thinking: bool = False,
    *,
    tools: Sequence[dict[str, Any]] | None = None,
    reasoning_effort: str | None = None,
    response_format: dict[str, Any] | None = None,
) -> str:
    """The prompt for an OpenAI conversation, ending in ``<｜Assistant｜>`` and the mode
    marker. ``tools`` / ``response_format`` are the request's top-level fields (OpenAI
    shapes); placement and validation as in the module docstring."""
    check_reasoning_effort(reasoning_effort)
    if not messages:
        raise EncodingError("messages: the conversation is empty")
    turns = _turns(messages)
    _attach(turns, _functions(tools, "tools", "tools"), _response_schema(response_format))
    keep = any(t.tools for t in turns)  # tools anywhere: no turn loses its reasoning
    if thinking and not keep:
        last = _last_user(turns)
        turns = [t for k, t in enumerate(turns) if t.role != "developer" or k >= last]
    out = _emit(turns, thinking, keep, thinking and reasoning_effort == "max")
    last_role = messages[-1].get("role")
    if last_role not in ("user", "tool", "developer"):
        raise EncodingError(
            f"the last message (messages[{len(messages) - 1}]) must be a user, tool or developer "
            f"message, after which the assistant's turn opens; got {last_role!r}"
        )
    return out


def _turns(messages: Sequence[dict[str, Any]]) -> list[_Turn]:
    """Validated turns; tool results and user text merged into user turns, results sorted."""
    turns: list[_Turn] = []
    assistant: _Turn | None = None  # the nearest assistant message so far
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise EncodingError(f"{where}: a message must be an object")
        role = m.get("role")
        if role in ("user", "tool"):
            if role == "user":
                block = (None, _content(m, where, role))
            else:
                cid = m.get("tool_call_id")
                if assistant is None:
                    raise EncodingError(
                        f"{where}: a tool message must follow an assistant message with tool_calls"
                    )
                if not assistant.calls:
                    raise EncodingError(
                        f"{where}: a tool message answers a tool call, but the preceding assistant message "
                        f"({assistant.where}) has no tool_calls"
                    )
                if not isinstance(cid, str) or not cid:
                    raise EncodingError(f"{where}: a tool message needs a tool_call_id")
                if cid not in assistant.call_order:
                    raise EncodingError(
                        f"{where}: tool_call_id {cid!r} matches no tool call of the preceding "
                        f"assistant message ({assistant.where})"
                    )
                block = (assistant.call_order[cid], _content(m, where, role, sep="\n\n"))
            if turns and turns[-1].role == "user":
                turns[-1].blocks.append(block)
            else:
                turns.append(_Turn("user", where, blocks=[block]))
        elif role in ("system", "developer"):
            text = _content(m, where, role)
            if role == "developer" and not text:
                raise EncodingError(f"{where}: a developer message needs non-empty content")
            fns = _functions(m.get("tools"), f"{where}.tools", "messages")
            turns.append(_Turn(role, where, text=text, tools=fns, schema=m.get("response_format") or None))
        elif role == "latest_reminder":
            turns.append(_Turn(role, where, text=_content(m, where, role)))
        elif role == "assistant":
            assistant = _assistant(m, where)
            turns.append(assistant)
        else:
            raise EncodingError(f"{where}: unknown role {role!r}")
    for t in turns:  # results in call order; text blocks keep their places (stable sort)
        slots = [k for k, (order, _) in enumerate(t.blocks) if order is not None]
        ranked = sorted((t.blocks[k] for k in slots), key=lambda b: b[0])
        for k, b in zip(slots, ranked):
            t.blocks[k] = b
    return turns


def _content(m: dict[str, Any], where: str, role: str, sep: str = "") -> str:
    content = m.get("content")
    if content is None or (isinstance(content, (list, tuple)) and not content):
        raise EncodingError(f"{where}: a {role} message needs content (a string or a list of text parts)")
    return message_text(content, where, sep)


def _assistant(m: dict[str, Any], where: str) -> _Turn:
    reasoning = m.get("reasoning_content")
    if reasoning is not None and not isinstance(reasoning, str):
        raise EncodingError(f"{where}: reasoning_content must be a string")
    tool_calls = m.get("tool_calls") or []
    if not isinstance(tool_calls, (list, tuple)):
        raise EncodingError(f"{where}: tool_calls must be a list")
    t = _Turn("assistant", where, text=message_text(m.get("content"), where), reasoning=reasoning or "")
    for k, tc in enumerate(tool_calls):
        w = f"{where}: tool_calls[{k}]"
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict) or tc.get("type", "function") != "function":
            raise EncodingError(f"{w} must be {{'type': 'function', 'function': {{name, arguments}}}}")
        name, args = fn.get("name"), fn.get("arguments")
        if not isinstance(name, str) or not name:
            raise EncodingError(f"{w}.function.name must be a non-empty string")
        try:
            parsed = json.loads(args) if isinstance(args, str) else None
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise EncodingError(f"{w}.function.arguments must be a JSON object string, got {_short(args)}")
        cid = tc.get("id") or fn.get("id")
        if isinstance(cid, str) and cid:
            t.call_order[cid] = k
        t.calls.append((name, parsed))
    return t


def _functions(tools: Any, where: str, param: str) -> list[dict[str, Any]] | None:
    """OpenAI ``tools`` -> the function schemas rendered in the tools block (None if none)."""
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)):
        raise EncodingError(f"{where} must be a list of tools", param=param)
    fns = []
    for k, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or tool.get("type") != "function" or not isinstance(fn.get("name"), str):
            raise EncodingError(
                f"{where}[{k}] must be {{'type': 'function', 'function': {{name, description, parameters}}}}",
                param=param,
            )
        fns.append(fn)
    return fns or None


def _response_schema(response_format: Any) -> Any:
    """OpenAI ``response_format`` -> the schema for the Response Format block (None: none)."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema" and isinstance(response_format.get("json_schema"), dict):
        schema = response_format["json_schema"].get("schema")
        return {"type": "object"} if schema is None else schema
    raise EncodingError(
        "response_format must be {'type': 'text' | 'json_object'} or "
        "{'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}",
        param="response_format",
    )


def _attach(turns: list[_Turn], fns: list[dict[str, Any]] | None, schema: Any) -> None:
    """Top-level tools / schema onto messages[0] if it is a system message, else a new one."""
    if fns is None and not schema:
        return
    if turns[0].role != "system":
        turns.insert(0, _Turn("system", "tools"))
    head = turns[0]
    for name, value, have in (("tools", fns, head.tools), ("response_format", schema, head.schema)):
        if value and have:
            raise EncodingError(f"{name} is given both in the request and on {head.where}", param=name)
    head.tools = fns or head.tools
    head.schema = schema or head.schema


def _last_user(turns: list[_Turn]) -> int:
    return max((k for k, t in enumerate(turns) if t.role in _OPENS_ASSISTANT), default=-1)


def _emit(turns: list[_Turn], thinking: bool, keep: bool, max_effort: bool) -> str:
    out = [BOS, REASONING_EFFORT_MAX if max_effort else ""]
    last = _last_user(turns)
    opened = False  # "<｜Assistant｜>" written, the assistant's message not yet
    for k, t in enumerate(turns):
        if t.role == "assistant":
            if not opened:
                why = " (in thinking mode without tools, developer messages before the last user message are dropped)"
                raise EncodingError(
                    f"{t.where}: an assistant message must follow a user, tool or developer message"
                    + (why if thinking and not keep else "")
                )
            opened = False
            if thinking and keep:
                out += [t.reasoning, END_THINK]
            out += [t.text, _dsml(t.calls), EOS]
            continue
        if opened and t.role != "latest_reminder":
            raise EncodingError(
                f"{turns[k - 1].where}: a latest_reminder right after a user turn must be followed by "
                "an assistant message (the assistant's turn opens before the reminder)"
            )
        if t.role == "user":
            out += [USER, "\n\n".join(_result(order, text) for order, text in t.blocks)]
        elif t.role == "latest_reminder":
            out += [LATEST_REMINDER, t.text]
        else:  # system, developer: text, then tools and response-format blocks
            out += [USER if t.role == "developer" else "", t.text]
            if t.tools:
                out += ["\n\n", TOOLS_HEAD, "\n".join(map(_json, t.tools)), TOOLS_TAIL]
            if t.schema:
                out += ["\n\n", RESPONSE_FORMAT_HEAD, _json(t.schema)]
        after = turns[k + 1].role if k + 1 < len(turns) else None
        if t.role in _OPENS_ASSISTANT and after in (None, "assistant", "latest_reminder"):
            out += [ASSISTANT, THINK if thinking and (keep or k == last) else END_THINK]
            opened = True
    return "".join(out)


def _result(order: int | None, text: str) -> str:
    return text if order is None else f"<tool_result>{text}</tool_result>"


def _dsml(calls: list[tuple[str, dict[str, Any]]]) -> str:
    if not calls:
        return ""
    invokes = []
    for name, args in calls:
        params = [
            f'<{DSML}parameter name="{key}" string="{"true" if isinstance(v, str) else "false"}">'
            f"{v if isinstance(v, str) else _json(v)}</{DSML}parameter>"
            for key, v in args.items()
        ]
        invokes.append(f'<{DSML}invoke name="{name}">\n' + "\n".join(params) + f"\n</{DSML}invoke>")
    return f"\n\n<{DSML}tool_calls>\n" + "\n".join(invokes) + f"\n</{DSML}tool_calls>"


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _short(value: Any) -> str:
    s = repr(value)
    return s if len(s) <= 60 else s[:57] + "..."


def thinking_requested(chat_template_kwargs: dict[str, Any] | None, reasoning_effort: str | None) -> bool:
    """``chat_template_kwargs={"thinking": true}`` (or ``enable_thinking``), or an OpenAI
    ``reasoning_effort`` other than ``"none"``; an unknown effort is an ``EncodingError``."""
    check_reasoning_effort(reasoning_effort)
    kw = chat_template_kwargs or {}
    for key in ("thinking", "enable_thinking"):
        if key in kw:
            if not isinstance(kw[key], bool):
                raise EncodingError(
                    f"chat_template_kwargs.{key} must be a boolean", param="chat_template_kwargs"
                )
            return kw[key]
    return reasoning_effort is not None and reasoning_effort != "none"


def split_reasoning(text: str) -> tuple[str | None, str]:
    """Whole output of a thinking request → (reasoning_content, content). Without a
    ``</think>`` the model never left its thinking (e.g. it ran out of tokens): all of it is
    reasoning."""
    s = ReasoningSplitter()
    r1, c1 = s.feed(text)
    r2, c2 = s.flush()
    return (r1 + r2) or None, c1 + c2


class ReasoningSplitter:
    """Incremental: ``feed(delta) -> (reasoning_delta, content_delta)``; ``flush()`` at the end."""

    def __init__(self):
        self.in_reasoning = True
        self._held = ""  # tail of reasoning text that may be the start of "</think>"
        self._start = True  # a leading "<think>" (some models repeat it) is dropped

    def feed(self, delta: str) -> tuple[str, str]:
        if not self.in_reasoning:
            return "", delta
        text = self._held + delta
        self._held = ""
        if self._start:
            if THINK.startswith(text):  # could still become "<think>": wait
                self._held = text
                return "", ""
            text = text.removeprefix(THINK)
            self._start = False
        i = text.find(END_THINK)
        if i >= 0:
            self.in_reasoning = False
            return text[:i], text[i + len(END_THINK) :]
        keep = next(
            (k for k in range(min(len(END_THINK) - 1, len(text)), 0, -1) if END_THINK.startswith(text[-k:])),
            0,
        )
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], ""

    def flush(self) -> tuple[str, str]:
        held, self._held = self._held, ""
        if self._start and held == THINK:
            held = ""
        return (held, "") if self.in_reasoning else ("", held)
