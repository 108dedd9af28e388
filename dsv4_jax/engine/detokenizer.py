"""Incremental detokenization and stop strings, per request.

Byte-level BPE splits multi-byte characters across tokens (the demo tokenizer spells "ü" as
two tokens that each decode to U+FFFD), so text cannot be produced token by token. Each
``push`` decodes a short window: the tokens since the last point where the text was known to
be stable (``_stable``) up to the newest, and compares it with the decode of the same window
without the unread tokens. The difference is new text, unless it ends in U+FFFD, in which
case the character is incomplete and the tokens stay unread until the next push. Decoding
a window keeps the cost per token constant instead of re-decoding the whole output.

Stop strings (``SamplingParams.stop``): the text is cut before the first occurrence, which
may span several tokens. While a request runs, its last ``len(longest stop) − 1`` characters
are held back from the stream, because they could still turn out to begin a stop string;
``StopChecker.emit`` hands out only what can no longer change.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self._stable = 0  # ids[:_stable] are fully turned into text; the window starts here
        self._read = 0  # ids[:_read] have produced their text

    def _decode(self, ids: Seq[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=self.skip) if ids else ""

    def push(self, token_id: int) -> str:
        """Add one token; returns the text it (and any held tokens) completed."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self._stable : self._read])
        after = self._decode(self.ids[self._stable :])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""  # nothing new yet, or an incomplete character
        self._stable, self._read = self._read, len(self.ids)
        return after[len(before) :]

    def flush(self) -> str:
        """Text of tokens still held (an incomplete character at the very end)."""
        before = self._decode(self.ids[self._stable : self._read])
        after = self._decode(self.ids[self._stable :])
        self._stable = self._read = len(self.ids)
        return after[len(before) :] if len(after) > len(before) else ""


class StopChecker:
    """Finds stop strings in growing text and decides how much of it may be streamed."""

    def __init__(self, stops: Seq[str]):
        self.stops = tuple(s for s in stops if s)
        self.holdback = max((len(s) for s in self.stops), default=1) - 1

    def find(self, text: str, new_from: int) -> tuple[int, str] | None:
        """First stop string overlapping ``text[new_from:]``: (index, stop) or None."""
        best = None
        lo = max(0, new_from - self.holdback)
        for s in self.stops:
            i = text.find(s, lo)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        return best

    def emit(self, text: str, emitted: int, finished: bool) -> tuple[str, int]:
        """The part of ``text`` past ``emitted`` that is final; returns (delta, new emitted)."""
        end = len(text) if finished else max(emitted, len(text) - self.holdback)
        return text[emitted:end], end
