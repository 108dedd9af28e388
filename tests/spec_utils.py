"""Drafts for speculative-decoding tests: the true continuation, corrupted where a pattern says."""

import dataclasses
import random


class OracleDrafts:
    """The runner, with each step's proposed drafts replaced by the sequence's true
    continuation (``truth[seq_id]``: prompt + the tokens it must emit), where draft j of a
    step is corrupted when ``bad(seq_id, position)`` says so. Records what it proposed."""

    def __init__(self, runner, truth: dict[int, list[int]], bad, **limits):
        self.runner, self.truth, self.bad = runner, truth, bad
        self.limits = dataclasses.replace(runner.limits, **limits)
        self.proposed = 0

    def execute(self, plan):
        out = self.runner.execute(plan)
        v = self.limits.vocab_size
        for w in plan.works:
            if w.seq_id not in out or not w.want_drafts:
                continue
            o = out[w.seq_id]
            first = w.start + w.num_known + len(o.accepted) + 1  # position of the next step's first draft
            true = self.truth[w.seq_id][first : first + w.want_drafts]
            o.drafts = [(t + 1) % v if self.bad(w.seq_id, first + j) else t for j, t in enumerate(true)]
            self.proposed += len(o.drafts)
        return out

    def forget(self, seq_id):
        self.runner.forget(seq_id)


def pattern(seed: int, p_bad: float = 0.35):
    """A deterministic draft-corruption pattern: position p of sequence s is wrong w.p. ``p_bad``."""
    return lambda s, p: random.Random(seed * 1_000_003 + s * 7919 + p).random() < p_bad
