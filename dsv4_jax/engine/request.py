"""Host-side request state: what the user asked for (``Request``) and where the engine is with it
(``Sequence``). Plain dataclasses, no device arrays (STYLE.md habit 10).

A ``Request`` lives from ``add_request`` to its finish and carries everything the user sees:
prompt, sampling parameters, sampled tokens, text, finish reason, timestamps, and the state
that turns its tokens into text (its incremental detokenizer and stop checker, and how much
of its output the engine has already handed out in ``RequestOutput``s). Only the engine
writes into it; callers read the outputs (``engine/output.py``). A ``Sequence``
is the scheduler's view of the same request while it holds (or waits for) device state: the
token history that must be in the state, how much of it is, the pool blocks and the state
slot. Preemption by recompute throws the ``Sequence``'s device state away and keeps the
``Request``: outputs already returned to the user stay returned.

Positions (ARCHITECTURE.md §5.5): ``tokens[p]`` sits at position ``p``; positions
``[0, num_computed)`` are in the state (their window/tail rows in ``slot``, their compressed
entries in ``block_ids``). A work feeds ``tokens[num_computed:end]``; when ``end ==
len(tokens)`` the runner samples the next token from the last of them.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import time

from dsv4_jax.engine.detokenizer import IncrementalDetokenizer, StopChecker
from dsv4_jax.engine.sampling_params import SamplingParams

__all__ = [
    "FinishReason",
    "Request",
    "RequestMetrics",
    "RequestRefused",
    "RequestStatus",
    "SamplingParams",
    "Sequence",
]


class RequestRefused(ValueError):
    """A request the engine can never serve (too long for the context, larger than the pools,
    malformed); the message names the limit. Requests that merely have to wait are queued."""


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued: not admitted yet, or preempted and waiting to resume
    RUNNING = "running"  # holds a slot and blocks
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # cancelled by the caller


@dataclasses.dataclass
class RequestMetrics:
    """Timestamps (``time.monotonic()`` seconds) for TTFT and per-token latency."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)  # one per sampled token
    # MTP speculative decoding: drafts verified and accepted for this request, and per draft
    # position (1st, 2nd, ... draft of a step) how many were verified and accepted.
    draft_tokens: int = 0
    accepted_tokens: int = 0
    drafts_per_position: list[int] = dataclasses.field(default_factory=list)
    accepted_per_position: list[int] = dataclasses.field(default_factory=list)

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted drafts / verified drafts (None before any draft)."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def mean_acceptance_length(self) -> float | None:
        """Tokens emitted per verify step (accepted drafts + 1), over the steps that verified drafts."""
        steps = self.drafts_per_position[0] if self.drafts_per_position else 0
        return 1 + self.accepted_tokens / steps if steps else None

    @property
    def ttft(self) -> float | None:
        """Time to first token."""
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def inter_token_latencies(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.token_times)]

    @property
    def e2e(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival


@dataclasses.dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    seed: int  # the user's seed, or one the engine drew: tokens are reproducible either way
    prompt: str | None = None
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    output_text: str = ""
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[tuple[float | None, list[tuple[int, float]] | None]] | None = None
    num_preemptions: int = 0
    num_cached_tokens: int | None = None  # prefix-cache hit tokens on its first admission
    error: Exception | None = None  # why the caller aborted it, if it said (reported, never raised)
    metrics: RequestMetrics = dataclasses.field(default_factory=lambda: RequestMetrics(time.monotonic()))
    # Text state: None without a tokenizer (token ids only). ``stop_checker`` holds the stop
    # strings; ``num_emitted_*`` are how many tokens / characters of ``output_token_ids`` /
    # ``output_text`` earlier outputs carried (the rest goes into the next one).
    detokenizer: IncrementalDetokenizer | None = dataclasses.field(default=None, repr=False)
    stop_checker: StopChecker = dataclasses.field(default_factory=lambda: StopChecker(()), repr=False)
    num_emitted_tokens: int = 0
    num_emitted_chars: int = 0
    # ``sampling.grammar`` compiled (engine/constraints.py): advanced by each emitted token
    constraint: object | None = dataclasses.field(default=None, repr=False)
    # ``sampling.prompt_logprobs``: entry p scores prompt token p (entry 0 is None: nothing
    # precedes it); filled as the prompt's chunks run, complete before the first token
    prompt_logprobs: list | None = None

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


@dataclasses.dataclass(eq=False)
class Sequence:
    """The scheduler's state of one request. ``seq_id`` orders FCFS (lower = earlier)."""

    seq_id: int
    request: Request
    tokens: list[int]  # prompt + outputs: the history the state must hold
    num_computed: int = 0  # positions [0, num_computed) are in the state
    block_ids: list[int] = dataclasses.field(default_factory=list)  # entry i: positions [i·bt, (i+1)·bt)
    slot: int | None = None
    # Prefix-cache bookkeeping (prefix_cache.py): chain keys of the full blocks computed so
    # far (content only, so they survive preemption), and how many leading blocks are
    # already cache entries (shared on admission, or registered once complete).
    block_keys: list[bytes] = dataclasses.field(default_factory=list)
    num_registered: int = 0
    # Resume point of the current residency (scheduler._admit): blocks below ``cached_until``
    # are shared cache entries, read-only; a fresh slot starts at ``state_start`` (recompute)
    # or from ``restore_snapshot`` (full / checkpoint).
    cached_until: int = 0
    state_start: int = 0
    restore_snapshot: int | None = None
    fresh: bool = True  # the next work is the first in this slot
    wait_reason: str = ""  # why it is not admitted yet (for stats and error messages)
    # MTP speculative decoding: the drafts proposed for the positions after ``tokens``, and how
    # many tokens the last sample appended (a verify step emits accepted drafts + 1; all of
    # them are then fed, and written to the state, by the next decode work).
    drafts: list[int] = dataclasses.field(default_factory=list)
    num_new: int = 1

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_remaining(self) -> int:
        """Tokens still to feed before the next sample (1 in the decode phase)."""
        return len(self.tokens) - self.num_computed

    @property
    def is_decoding(self) -> bool:
        return 1 <= self.num_remaining <= self.num_new and len(self.tokens) > self.prompt_len

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, len={len(self.tokens)}, computed={self.num_computed}, "
            f"blocks={len(self.block_ids)}, slot={self.slot})"
        )
