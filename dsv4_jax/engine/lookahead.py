"""Decode lookahead: which decode step the runner may dispatch before the engine asks for it.

Batch-1 decode on a fast device is short, and a step's host work (reading back the tokens,
detokenizing, stop checks, scheduling, building the next step's metadata, dispatch) would
otherwise sit between two device steps. So ``JaxModelRunner.execute`` dispatches, right
after a step and before reading its tokens back, the step that continues each of its
decode works by one position, fed by the tokens the step sampled, still on device. The
device runs it while the host does the rest; the next ``execute`` takes its rows for every
work that is exactly that continuation (``match``) and runs the others as usual.

Why a lookahead that is not used is harmless: it writes, for each sequence, the KV of the
token that sequence really sampled, at the position it really has (``start + 1``), into
the slot and the pool block that sequence owns (``continuation`` requires the block to be
allocated already); ring, tail and pool rows are addressed by position, so running that
position again (a work that did not match) writes the same rows, and a sequence that
finished or was preempted leaves rows that the next owner of the slot or block overwrites
before it reads them, as it does after any sequence. Device order is program order, so
the lookahead's writes always land before those of any later step. What a lookahead may
not touch, it is not dispatched for: works with penalties (their count tables would
count the lookahead's token twice), snapshot save / restore, replays, fresh works.

Host-only (no jax): the runner holds the device results.
"""

from __future__ import annotations

import dataclasses

from dsv4_jax.engine.runner_api import SeqWork

_UNKNOWN = -1  # a continuation's input token until the step before it has been read back


@dataclasses.dataclass
class Lookahead:
    """A dispatched lookahead step: its works (inputs filled in by ``expect``), the row of each
    sequence in its batch, and its sampled results (device arrays, opaque here)."""

    works: list[SeqWork]
    rows: dict[int, int]  # seq_id -> row
    res: object

    def expect(self, sampled: dict[int, int]) -> None:
        """Fill in each work's input token: what the step before sampled for that sequence."""
        self.works = [dataclasses.replace(w, tokens=[sampled[w.seq_id]]) for w in self.works if w.seq_id in sampled]


def _plain(w: SeqWork) -> bool:
    sp = w.sampling
    return (len(w.tokens) == 1 and w.sample and w.restore_snapshot is None and w.save_snapshot is None
            and w.state_start == 0 and w.cached_until == 0 and not w.fresh and w.prior_tokens is None
            and sp.repetition_penalty == 1 and not sp.presence_penalty and not sp.frequency_penalty)  # fmt: skip


def continuation(w: SeqWork, block_tokens: int) -> SeqWork | None:
    """The decode work that follows ``w`` if it samples, or None where a lookahead may not run
    (see the module docstring), when position ``start + 1`` has no block yet, or when ``w``
    samples the request's last token (``max_tokens``)."""
    if (not _plain(w) or w.start + 1 >= len(w.block_ids) * block_tokens
            or w.sample_index + 1 >= w.sampling.max_tokens):  # fmt: skip
        return None
    return dataclasses.replace(w, tokens=[_UNKNOWN], start=w.start + 1, sample_index=w.sample_index + 1)


def _same(w: SeqWork, a: SeqWork) -> bool:
    n = len(a.block_ids)
    return (_plain(w) and w.slot == a.slot and w.start == a.start and w.tokens == a.tokens
            and w.sampling == a.sampling and w.sample_index == a.sample_index and w.seed == a.seed
            and w.prompt_len == a.prompt_len and w.block_ids[:n] == a.block_ids)  # fmt: skip


def match(ahead: Lookahead | None, works: list[SeqWork]) -> tuple[list[SeqWork], list[SeqWork]]:
    """(works the lookahead computed, the rest), each in plan order."""
    if ahead is None:
        return [], list(works)
    mine = {a.seq_id: a for a in ahead.works}
    used, rest = [], []
    for w in works:
        a = mine.get(w.seq_id)
        (used if a is not None and a.tokens[0] != _UNKNOWN and _same(w, a) else rest).append(w)
    return used, rest
