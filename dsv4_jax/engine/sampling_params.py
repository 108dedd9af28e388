"""``SamplingParams``: the public per-request sampling controls (``from dsv4_jax import
SamplingParams``). Plain Python; the runner's sampler (``runner/sampling.py``) reads them."""

from __future__ import annotations

import dataclasses


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

    ``logit_bias``: ``(token_id, bias)`` pairs added to the logits before sampling (OpenAI:
    −100..100; ±100 bans or forces a token), at most ``MAX_LOGIT_BIAS``. ``grammar``: an
    llguidance grammar (``server/tool_grammar.py`` builds them from JSON schemas and tool
    definitions); each token is drawn from the tokens it allows (engine/constraints.py).
    ``prompt_logprobs`` = n returns, for every prompt token after the first, its logprob
    given the tokens before it and the top-n alternatives (vLLM's parameter; OpenAI's
    ``echo`` + ``logprobs``); such a request reads no prefix-cache hit, since the cached
    positions would have no logits. ``max_tokens=0`` only scores the prompt (with
    ``prompt_logprobs``): nothing is generated.
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
    logit_bias: tuple[tuple[int, float], ...] = ()
    grammar: str | None = None
    prompt_logprobs: int | None = None

    MAX_LOGPROBS = 20
    MAX_LOGIT_BIAS = 300

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"SamplingParams.{field}: {why} (got {getattr(self, field)!r})")

        if not isinstance(self.max_tokens, int) or self.max_tokens < (
            0 if self.prompt_logprobs is not None else 1
        ):
            bad("max_tokens", "must be an integer >= 1 (0 only with prompt_logprobs: score the prompt)")
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
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= self.MAX_LOGPROBS:
            bad("prompt_logprobs", f"must be in [0, {self.MAX_LOGPROBS}]")
        if len(self.logit_bias) > self.MAX_LOGIT_BIAS:
            bad("logit_bias", f"has {len(self.logit_bias)} entries; at most {self.MAX_LOGIT_BIAS}")
        ids = [t for t, _ in self.logit_bias]
        if len(set(ids)) != len(ids):
            bad("logit_bias", "names a token id twice")
        for t, b in self.logit_bias:
            if not (isinstance(t, int) and t >= 0):
                bad("logit_bias", f"token ids must be non-negative integers, got {t!r}")
            if not -100 <= b <= 100:
                bad("logit_bias", f"bias {b} for token {t} is outside [-100, 100]")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            bad("seed", "must be a non-negative integer")
