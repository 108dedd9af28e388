"""DeepSeek-V4's chat encoding and the split of thinking output (ARCHITECTURE.md §9).

V4 ships no Jinja template; its ``encoding_dsv4.py`` concatenates markers::

    BOS + system + "<｜User｜>" + user + "<｜Assistant｜>" + "</think>" + answer + EOS
                 + "<｜User｜>" + user + "<｜Assistant｜>" + ("</think>" | "<think>")

The final marker picks the mode: ``</think>`` (chat: the thinking block is closed before
it starts, so the model answers directly) or ``<think>`` (thinking: the model reasons,
closes with ``</think>``, then answers). Earlier assistant turns are rendered as chat
turns: their reasoning is dropped (the model was trained that way, and it keeps long
agent histories short); this server supports no tools, the one case where V4 keeps it.

The markers are single tokens in the tokenizer (``load_tokenizer`` checks that), and the
tokenizer matches them inside the rendered string, so ``render`` returns text and the
caller tokenizes it once. ``ReasoningSplitter`` turns the generated text of a thinking
request into ``reasoning_content`` and ``content``, for a whole text or a stream of
deltas; in a stream a ``</think>`` may arrive split over several deltas, so a suffix that
could begin it is held back until the next delta decides.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"


class EncodingError(ValueError):
    """A conversation this encoding cannot express; the message says which message and why."""


def message_text(content: str | Sequence[dict[str, Any]] | None, where: str) -> str:
    """OpenAI content: a string or a list of parts; only text parts can be encoded."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    out = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise EncodingError(
                f"{where}: only text content parts are supported, got type {part.get('type')!r}"
            )
        out.append(part["text"])
    return "".join(out)


def render(messages: Sequence[dict[str, Any]], thinking: bool = False) -> str:
    """The prompt string for ``messages`` (dicts with ``role`` / ``content``), ending in the
    assistant marker and the mode marker. System and developer messages form the system
    prompt (in order, joined by blank lines); the conversation must end with a user turn."""
    system: list[str] = []
    turns: list[str] = []
    last_role = None
    for i, m in enumerate(messages):
        role, where = m["role"], f"messages[{i}]"
        if m.get("tool_calls") or m.get("tool_call_id") or role == "tool":
            raise EncodingError(f"{where}: tool messages and tool calls are not supported by this server")
        text = message_text(m.get("content"), where)
        if role in ("system", "developer"):
            system.append(text)
            continue
        if role == "user":
            turns.append(USER + text)
        elif role == "assistant":
            if last_role != "user":
                raise EncodingError(f"{where}: an assistant message must follow a user message")
            turns.append(ASSISTANT + END_THINK + text + EOS)  # earlier reasoning dropped
        else:
            raise EncodingError(f"{where}: unknown role {role!r}")
        last_role = role
    if last_role != "user":
        raise EncodingError("the last message must come from the user (or a system message before it)")
    return BOS + "\n\n".join(system) + "".join(turns) + ASSISTANT + (THINK if thinking else END_THINK)


def thinking_requested(chat_template_kwargs: dict[str, Any] | None, reasoning_effort: str | None) -> bool:
    """``chat_template_kwargs={"thinking": true}`` (or ``enable_thinking``), or an OpenAI
    ``reasoning_effort`` other than ``"none"``."""
    kw = chat_template_kwargs or {}
    for key in ("thinking", "enable_thinking"):
        if key in kw:
            if not isinstance(kw[key], bool):
                raise EncodingError(f"chat_template_kwargs.{key} must be a boolean")
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
