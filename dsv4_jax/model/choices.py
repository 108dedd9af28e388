"""The forward pass's discrete choices, recorded or imposed: the numerics report's way to tell
a precision loss from a flipped choice (issue 17).

Two places in the model pick by ranking: the router's top-k experts (ARCHITECTURE.md §6) and
the lightning indexer's top-k compressed entries (§5.3). Two bf16 roundings of a near-tie can
pick differently, and after one flipped pick the hidden state, and so the logits, move by far
more than any rounding of the arithmetic would. To attribute a divergence, the report records
every pick of the float32 reference and replays the bf16 path with those picks imposed: what
still diverges then is the arithmetic's doing.

Off (no ``Choices`` active, the serving path) ``pick`` returns its argument and adds nothing to
the trace. The context is read while tracing, so a jitted function records or imposes only
if it is traced inside ``active(...)``; the picks are traced arrays the function returns.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

_ACTIVE: contextvars.ContextVar[Choices | None] = contextvars.ContextVar("dsv4_choices", default=None)


@dataclasses.dataclass
class Choices:
    """Picks in the order the forward makes them (layer by layer). ``imposed``: the picks to
    return instead, same order and shapes (a previous recording); ``None`` records only."""

    imposed: list | None = None
    seen: list = dataclasses.field(default_factory=list)
    kinds: list = dataclasses.field(default_factory=list)


def pick(kind: str, idx):
    """``idx`` (i32[..., k], a top-k's indices), recorded under ``kind`` and, when picks are
    imposed, replaced by the imposed one at this position in the order."""
    c = _ACTIVE.get()
    if c is None:
        return idx
    n = len(c.seen)
    c.seen.append(idx)
    c.kinds.append(kind)
    if c.imposed is None:
        return idx
    if n >= len(c.imposed):
        raise ValueError(
            f"imposed choices: {len(c.imposed)} picks given, the forward makes more ({kind} #{n})"
        )
    forced = c.imposed[n]
    if tuple(forced.shape) != tuple(idx.shape):
        raise ValueError(
            f"imposed choice #{n} ({kind}): shape {tuple(forced.shape)}, the forward picks {tuple(idx.shape)}"
        )
    return forced.astype(idx.dtype)


@contextlib.contextmanager
def active(imposed: list | None = None):
    """Record (and, with ``imposed``, impose) the picks of whatever is traced inside."""
    c = Choices(imposed)
    token = _ACTIVE.set(c)
    try:
        yield c
    finally:
        _ACTIVE.reset(token)
