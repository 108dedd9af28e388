"""The contract between the host-side engine (scheduler, block manager, requests) and the
device-side model runner. Plain Python: nothing here imports jax.

Each engine step the scheduler hands the runner a ``StepPlan``: one ``SeqWork`` per
sequence that runs this step (a prefill chunk or one decode token). The runner
restores SWA snapshots if asked, builds the device metadata, runs the jitted step,
takes SWA snapshots if asked, samples, and returns one ``SampleOut`` per sequence that
asked for a token.

Position bookkeeping (ARCHITECTURE.md §5.5): a sequence's tokens ``tokens`` sit at
positions ``start .. start+len(tokens)-1``. Its decode state lives in state slot
``slot`` (window ring + compressor tails) and in the pool blocks ``block_ids`` (one
logical block = ``block_tokens`` native positions in every layer's pools; entry
block i covers positions ``[i·block_tokens, (i+1)·block_tokens)``).

Prefix reuse (SERVING.md §1.6) needs three more fields:

* ``restore_snapshot``: before running, copy SWA snapshot #n (a saved slot: windows +
  tails at a block boundary) into ``slot``. Used by the ``full`` and ``checkpoint`` SWA
  strategies on a prefix hit.
* ``save_snapshot``: after running, copy ``slot`` into SWA snapshot #n. The chunk must
  end exactly on the boundary the snapshot stands for.
* ``state_start`` / ``cached_until``: the ``recompute`` strategy replays the tokens
  ``[state_start, hit)`` into a fresh slot. Ring rows and tail rows at positions
  ``< state_start`` do not exist for this replay; compressed entries at positions
  ``< cached_until`` come from the (shared, content-addressed) cache and are never
  rewritten. For an ordinary sequence both are 0.

How the engine sets them (``dsv4_jax/engine/scheduler.py``): a replay chunk never straddles
the hit point, so every work with ``start < cached_until`` lies wholly below it and carries
both fields; works from the hit point on carry ``state_start = cached_until = 0``. The
``checkpoint`` strategy's replay (after ``restore_snapshot``) has ``state_start = 0``.
``prior_tokens`` gives the runner the tokens before ``start`` on a fresh work (penalties).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from dsv4_jax.engine.sampling_params import SamplingParams


@dataclasses.dataclass
class SeqWork:
    """One sequence's share of a step."""

    seq_id: int
    slot: int
    block_ids: list[int]
    tokens: list[int]
    start: int
    sample: bool  # sample a next token from the last of ``tokens``
    sampling: SamplingParams = SamplingParams()
    sample_index: int = 0  # how many tokens this request has sampled before (seeds the draw)
    seed: int = 0  # the request's seed (drawn by the engine when the user gave none)
    prompt_len: int = 0  # tokens of the prompt (penalties: repetition covers prompt + output)
    state_start: int = 0
    cached_until: int = 0
    restore_snapshot: int | None = None
    save_snapshot: int | None = None
    fresh: bool = False  # first work of this sequence in this slot: reset penalty counts
    # On a fresh work that starts past 0 (prefix hit, restored snapshot, recompute replay):
    # the tokens at positions [0, start) the runner will not see, so it can seed the penalty
    # tables (positions >= prompt_len are outputs). None on every other work.
    prior_tokens: list[int] | None = None
    # MTP speculative decoding (runner/speculative.py; a runner built with speculative_tokens):
    # the last ``num_drafts`` of ``tokens`` are drafts to verify, not the sequence's yet;
    # ``want_drafts``: drafts to propose for the next step (0: none); ``next_token``: on a work
    # that does not sample, the token after its last one (the MTP block's input there).
    num_drafts: int = 0
    want_drafts: int = 0
    next_token: int | None = None
    # Grammar-constrained sampling (engine/constraints.py): on a work that samples, the
    # request's ``Constraint``; the runner asks it for the token mask of this sample.
    constraint: object | None = None

    @property
    def num_known(self) -> int:
        """Tokens of this work that are the sequence's (written to the state)."""
        return len(self.tokens) - self.num_drafts


@dataclasses.dataclass
class StepPlan:
    works: list[SeqWork]


@dataclasses.dataclass
class SampleOut:
    token: int
    logprob: float | None = None  # of the chosen token, raw model distribution
    top_logprobs: list[tuple[int, float]] | None = None
    # Speculative decoding: the drafts this work verified and accepted, emitted before
    # ``token`` (each with its own logprobs), and the drafts proposed for the next step.
    accepted: list[SampleOut] = dataclasses.field(default_factory=list)
    drafts: list[int] = dataclasses.field(default_factory=list)
    # ``sampling.prompt_logprobs``: for the prompt positions ``start+1 .. start+len(tokens)``
    # of this work that exist, (first position, [(logprob, top)]): each prompt token's logprob
    # given the tokens before it. A work that does not sample gets a ``SampleOut`` only to
    # carry these; its ``token`` is then -1.
    prompt_logprobs: tuple[int, list] | None = None

    @property
    def emitted(self) -> list[SampleOut]:
        """Every token this work emitted, in order: the accepted drafts, then ``token``."""
        return [*self.accepted, self]


@dataclasses.dataclass(frozen=True)
class RunnerLimits:
    """What the runner was built with; the engine schedules within these."""

    num_slots: int
    num_blocks: int
    block_tokens: int
    max_blocks_per_seq: int
    num_snapshots: int  # SWA snapshot store entries (0: no full/checkpoint strategies)
    max_batch: int  # sequences per step
    max_tokens_per_step: int  # token budget per step (prefill chunks + decodes)
    window: int  # SWA window (128 in the shipped models)
    num_layers: int  # main layers (the recompute replay length is window · num_layers)
    vocab_size: int
    eos_token_id: int
    bytes_per_block: int  # all pools of all layers together, one logical block
    bytes_per_slot: int  # windows + tails of one sequence
    # Sequence shards of a data-parallel runner (``JaxModelRunner`` on a mesh): slots and blocks
    # are split into this many equal contiguous ranges, and a sequence may only use blocks from
    # its slot's range (its pools live on that shard's devices). 1 on a single device.
    num_seq_shards: int = 1
    max_draft_tokens: int = 0  # MTP drafts per step the runner verifies (0: no speculative decoding)

    def __post_init__(self):
        s = self.num_seq_shards
        if s < 1 or self.num_slots % s or self.num_blocks % s:
            raise ValueError(
                f"num_slots={self.num_slots} and num_blocks={self.num_blocks} must split evenly "
                f"over num_seq_shards={s}"
            )

    @property
    def slots_per_shard(self) -> int:
        return self.num_slots // self.num_seq_shards

    @property
    def blocks_per_shard(self) -> int:
        return self.num_blocks // self.num_seq_shards

    def slot_shard(self, slot: int) -> int:
        return slot // self.slots_per_shard

    def block_shard(self, block_id: int) -> int:
        return block_id // self.blocks_per_shard


class ModelRunner(Protocol):
    limits: RunnerLimits

    def execute(self, plan: StepPlan) -> dict[int, SampleOut]:
        """Run one step; returns a sample for every work with ``sample=True``, keyed by seq_id
        (and an entry carrying ``prompt_logprobs`` for a prompt chunk that asked for them)."""
        ...
