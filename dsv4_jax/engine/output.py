"""``RequestOutput``: what ``LLMEngine.step`` hands out for a request, the only output type.

Every consumer reads the same object: ``LLM.generate`` folds a request's outputs into an
``Output``, ``LLM.stream`` yields them as they come, and the server turns them into OpenAI
chunks or responses (its usage and logprobs come from here). Nobody outside the engine needs
the ``Request``, so nobody outside it writes into one.

An output is a delta: ``token_ids``, ``logprobs`` and ``text`` are what is new since the
request's previous output (a stream concatenates them; text held back because it could
still begin a stop string arrives later, or never when the stop string matched). The counts
are totals so far, so the last output alone gives the usage.
"""

from __future__ import annotations

import dataclasses

from dsv4_jax.engine.request import RequestMetrics

# One entry per token: the chosen token's logprob and the top alternatives [(id, logprob)]
# (None where the runner gave none; an empty list when the request asked for 0 alternatives).
TokenLogprobs = tuple[float | None, list[tuple[int, float]] | None]


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    text: str = ""  # new text: never an EOS / stop token's text, nor a matched stop string
    # new tokens, including a final EOS / stop token
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None  # one per token in token_ids; None unless params.logprobs
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort", on the final output
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # completion tokens so far (the usage's completion_tokens when finished)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache on its first admission
    error: Exception | None = None  # why the caller aborted it (``LLMEngine.abort(error=...)``), if it said
    metrics: RequestMetrics | None = None  # the request's timestamps (complete once finished)
    # ``SamplingParams.prompt_logprobs``: one entry per prompt token (the first None), on every
    # output from the first one that carries tokens or finishes
    prompt_logprobs: list[TokenLogprobs | None] | None = None
