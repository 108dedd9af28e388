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


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling controls (OpenAI / vLLM semantics).

    ``temperature == 0`` is greedy. ``top_k <= 0`` and ``top_p == 1`` disable those
    filters; ``min_p`` keeps tokens with p >= min_p · p_max. ``repetition_penalty``
    (> 1 discourages) applies to prompt and output tokens; ``presence_penalty`` /
    ``frequency_penalty`` to output tokens only. ``seed`` makes a request reproducible
    whatever else is in the batch. ``logprobs`` = n returns the chosen token's logprob
    and the top-n alternatives (from the model's raw distribution). Generation stops at
    ``max_tokens``, an EOS (unless ``ignore_eos``), a token in ``stop_token_ids`` or a
    string in ``stop`` (the stop string is not included in the text).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    MAX_LOGPROBS = 20

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"SamplingParams.{field}: {why} (got {getattr(self, field)!r})")

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", "must be an integer >= 1")
        if not self.temperature >= 0:
            bad("temperature", "must be >= 0")
        if not isinstance(self.top_k, int):
            bad("top_k", "must be an integer (<= 0 disables)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        if not self.repetition_penalty > 0:
            bad("repetition_penalty", "must be > 0")
        if not -2 <= self.presence_penalty <= 2:
            bad("presence_penalty", "must be in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            bad("frequency_penalty", "must be in [-2, 2]")
        if self.logprobs is not None and not 0 <= self.logprobs <= self.MAX_LOGPROBS:
            bad("logprobs", f"must be in [0, {self.MAX_LOGPROBS}]")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            bad("seed", "must be a non-negative integer")


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


@dataclasses.dataclass
class StepPlan:
    works: list[SeqWork]


@dataclasses.dataclass
class SampleOut:
    token: int
    logprob: float | None = None  # of the chosen token, raw model distribution
    top_logprobs: list[tuple[int, float]] | None = None


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

    def __post_init__(self):
        s = self.num_seq_shards
        if s < 1 or self.num_slots % s or self.num_blocks % s:
            raise ValueError(f"num_slots={self.num_slots} and num_blocks={self.num_blocks} must split evenly "
                             f"over num_seq_shards={s}")  # fmt: skip

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
        """Run one step; returns a sample for every work with ``sample=True``, keyed by seq_id."""
        ...
