"""Grammar-constrained decoding, host side: one llguidance matcher per constrained request.

Why llguidance (docs/SERVING.md "Grammar engine"): its mask time per token on our
vocabularies and its install weight (one ~3 MB wheel, no dependencies) against xgrammar's
(whose wheel requires torch). ``make serve`` must not pull torch.

The division of labour:

* ``SamplingParams.grammar`` holds an llguidance grammar (a serialized top-level grammar:
  ``server/tool_grammar.py`` builds them from JSON schemas and tool definitions). The engine
  compiles it into a ``Constraint`` when the request arrives (``GrammarCompiler``); a grammar
  that does not compile refuses the request with llguidance's message.
* Each step the runner asks every constrained row for its bitmask (``fill_masks``: bit
  ``t % 32`` of word ``t // 32`` set = token t allowed), after dispatching the step's forward,
  so the host fills masks while the device computes (runner/steps.py). The sampler applies
  the mask on device; the program is the same for any grammar.
* The engine feeds every emitted token back (``Constraint.accept``). The matcher lives on
  the ``Request``, not in any device state, so preemption (recompute or restore) and prefix
  hits leave it untouched: a resumed request continues its grammar where its last emitted
  token left it.
* When the grammar is complete the matcher allows only EOS, so the request ends with
  ``finish_reason="stop"`` on its own.

Constrained requests run without MTP drafts and without decode lookahead: a draft's or a
lookahead step's mask would need the grammar advanced by tokens not yet verified.
"""

from __future__ import annotations

from collections.abc import Sequence

import llguidance
import numpy as np


class GrammarError(ValueError):
    """A grammar that llguidance cannot compile; the message is llguidance's."""


class Constraint:
    """One request's grammar state: which tokens may come next; advanced by each emitted token."""

    def __init__(self, matcher: llguidance.LLMatcher):
        self.matcher = matcher

    def fill_mask(self, out: np.ndarray) -> None:
        """Write the allowed-token bitmask into ``out`` (i32[W], C-contiguous)."""
        self.matcher.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)

    def accept(self, token: int) -> bool:
        """Advance by an emitted token; False if the grammar forbids it (the mask was not applied)."""
        return self.matcher.consume_token(token)

    @property
    def error(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None


POOL_ROWS = 16  # from this many constrained rows, llguidance's thread pool fills them


def fill_masks(rows: Sequence[tuple[int, Constraint]], out: np.ndarray) -> None:
    """Fill ``out[i]`` (i32[B,W]) for each ``(i, constraint)``; other rows are left as they are.
    Many rows are filled in parallel by llguidance's thread pool; below ``POOL_ROWS`` one by
    one (on 2 cores the pool never beat that at batch 8: docs/SERVING.md "Grammar engine")."""
    if len(rows) < POOL_ROWS:
        for i, c in rows:
            c.fill_mask(out[i])
        return
    if rows:
        _executor().unsafe_compute_mask_ptr(
            [(c.matcher, i) for i, c in rows], out.ctypes.data, out.shape[1] * 4, out.shape[0]
        )


_EXECUTOR: list[llguidance.LLExecutor] = []


def _executor() -> llguidance.LLExecutor:
    if not _EXECUTOR:
        _EXECUTOR.append(llguidance.LLExecutor())
    return _EXECUTOR[0]


class GrammarCompiler:
    """Compiles grammars against one tokenizer (a ``tokenizers.Tokenizer``) and vocabulary."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_id: int):
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(
            tokenizer.to_str(), n_vocab=vocab_size, eos_token=eos_token_id
        )

    def compile(self, grammar: str) -> Constraint:
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise GrammarError("; ".join(messages) or "the grammar does not compile")
        m = llguidance.LLMatcher(self.tokenizer, grammar)
        if m.is_error():
            raise GrammarError(m.get_error())
        return Constraint(m)
