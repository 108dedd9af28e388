"""Decode lookahead: which decode step the runner may dispatch before the engine asks for it.

Batch-1 decode on a fast device is short, and a step's host work (reading back the tokens,
detokenizing, stop checks, scheduling, building the next step's metadata, dispatch) would
otherwise sit between two device steps. So ``JaxModelRunner.execute`` dispatches, right
after a step and before reading its tokens back, the step that continues each of its
decode works by one position, fed by the tokens the step sampled, still on device. The
device runs it while the host does the rest; a later ``execute`` takes its row for the work
that is exactly that continuation (``Lookahead.take``).

A position must never be computed twice in a slot: the compressor tails are kept relative to
the sequence's current block (``compressor.compress_chunk``), so running position p again
after the lookahead ran it would read the tail one block off when p completes a block. Hence
a lookahead row stays pending until its sequence's next decode work takes it, even if that
sequence sits out some steps; a work that asks for a snapshot after that position takes it
too (the snapshot is saved after, in device order); a sequence that finishes or is aborted
drops it (``forget``), and one that is preempted drops it when it comes back fresh (its new
state treats every row before its start as absent). A plain decode of a position whose
lookahead it cannot use is an engine invariant broken, and raises.

Why a row nobody takes is harmless: it wrote, for its sequence, the KV of the token that
sequence really sampled, at the position it really has (``start + 1``), into the slot and
the pool block that sequence owns (``continuation`` requires the block to be allocated
already). A sequence that finished leaves rows that the next owner of the slot or block
overwrites before reading them, as after any sequence; device order is program order, so
the lookahead's writes land before those of any later step. What a lookahead may not touch,
it is not dispatched for: works with penalties (their count tables would count the
lookahead's token twice), replays and fresh works, a request's last token (``max_tokens``),
grammar-constrained works (the next mask needs the grammar advanced by the token being read back).

Host-only (no jax): the runner holds the device results, opaque here.
"""

from __future__ import annotations

import dataclasses

from dsv4_jax.engine.runner_api import SeqWork

_UNKNOWN = -1  # a continuation's input token until the step before it has been read back


def _plain(w: SeqWork) -> bool:
    """A decode work of a running sequence, without penalties (snapshot saving allowed)."""
    sp = w.sampling
    return (
        len(w.tokens) == 1
        and w.sample
        and w.restore_snapshot is None
        and w.state_start == 0
        and w.cached_until == 0
        and not w.fresh
        and w.prior_tokens is None
        and sp.repetition_penalty == 1
        and not sp.presence_penalty
        and not sp.frequency_penalty
        and w.constraint is None
    )


def continuation(w: SeqWork, block_tokens: int) -> SeqWork | None:
    """The decode work that follows ``w`` if it samples, or None where a lookahead may not run
    (see the module docstring), when position ``start + 1`` has no block yet, or when ``w``
    samples the request's last token (``max_tokens``)."""
    if (
        not _plain(w)
        or w.start + 1 >= len(w.block_ids) * block_tokens
        or w.sample_index + 1 >= w.sampling.max_tokens
    ):
        return None
    return dataclasses.replace(
        w, tokens=[_UNKNOWN], start=w.start + 1, sample_index=w.sample_index + 1, save_snapshot=None
    )


def _same(w: SeqWork, a: SeqWork) -> bool:
    n = len(a.block_ids)
    return (
        _plain(w)
        and w.slot == a.slot
        and w.start == a.start
        and w.tokens == a.tokens
        and w.sampling == a.sampling
        and w.sample_index == a.sample_index
        and w.seed == a.seed
        and w.prompt_len == a.prompt_len
        and w.block_ids[:n] == a.block_ids
    )


@dataclasses.dataclass
class Pending:
    work: SeqWork  # the continuation it computed (its input token filled in by ``expect``)
    res: object  # the lookahead step's sampled results (device arrays)
    row: int  # this sequence's row in them


class Lookahead:
    """The dispatched lookahead rows no work has taken yet, one per sequence at most."""

    def __init__(self):
        self.pending: dict[int, Pending] = {}
        self.used = 0  # works answered by a lookahead row
        self.dropped = 0  # rows no work took (the sequence finished, was aborted or preempted)

    def add(self, works: list[SeqWork], rows: list[int], res: object) -> None:
        for w, r in zip(works, rows):
            if w.seq_id in self.pending:
                raise RuntimeError(f"decode lookahead: sequence {w.seq_id} already has a pending row")
            self.pending[w.seq_id] = Pending(w, res, r)

    def expect(self, sampled: dict[int, int]) -> None:
        """Fill in each new row's input token: what the step before sampled for that sequence."""
        for sid, p in self.pending.items():
            if p.work.tokens[0] == _UNKNOWN and sid in sampled:
                p.work = dataclasses.replace(p.work, tokens=[sampled[sid]])

    def drop(self, seq_id: int) -> None:
        if self.pending.pop(seq_id, None) is not None:
            self.dropped += 1

    def take(self, works: list[SeqWork]) -> tuple[list[tuple[SeqWork, Pending]], list[SeqWork]]:
        """(each work a pending row answers, with that row; the works to run), in plan order."""
        used, rest = [], []
        for w in works:
            p = self.pending.get(w.seq_id)
            if p is not None and p.work.tokens[0] != _UNKNOWN and _same(w, p.work):
                used.append((w, self.pending.pop(w.seq_id)))
                continue
            if p is not None:
                if _plain(w) and w.start <= p.work.start:
                    raise RuntimeError(
                        f"decode lookahead: sequence {w.seq_id} would compute position {w.start} again "
                        f"(a lookahead already ran position {p.work.start} in slot {p.work.slot})"
                    )
                self.drop(w.seq_id)
            rest.append(w)
        self.used += len(used)
        return used, rest
