"""``/v1/completions`` and the steps both generation endpoints share (chat: ``chat.py``).

Both endpoints fan a call out to one engine request per (prompt, choice): OpenAI's
completions take a batch of prompts, and ``n`` asks for several choices of each (choice
``k`` draws with ``seed + k`` when a seed is given, so the choices differ but stay
reproducible). Streams of the choices are merged in arrival order; each chunk carries
its choice ``index``.

Usage: ``prompt_tokens`` counts each prompt once, ``completion_tokens`` every generated
token of every choice (including the EOS that ended it, as vLLM counts): the sum of the
choices' final ``RequestOutput.num_output_tokens``. Text, token ids and logprobs come from
the engine's outputs too; the handlers keep no count of their own. A stream always
reports usage: on the final chunk, or, with ``stream_options.include_usage``, in a separate
last chunk with no choices, as OpenAI sends it.

A request the server stopped (shutdown grace period over, engine error) ends its stream
with an error event (``data: {"error": {...}}``) before ``[DONE]``; non-streaming, the
call fails with that error's status.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from absl import logging
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from dsv4_jax.engine.output import RequestOutput
from dsv4_jax.server import protocol as P
from dsv4_jax.server.engine_thread import RequestStream


# ----------------------------------------------------------------------------- shared steps
def check_model(state, model: str) -> None:
    if model != state.model_name:
        raise P.APIError(
            404,
            f"The model `{model}` does not exist. This server serves `{state.model_name}`.",
            param="model",
            code="model_not_found",
        )


def check_context(state, n_prompt: int, max_tokens: int | None, what: str) -> None:
    """Prompt and completion must fit the context; OpenAI's wording and code."""
    limit = state.max_model_len
    if n_prompt >= limit:
        raise P.APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, your {what} has "
            f"{n_prompt} tokens, and the completion needs at least one more.",
            param=what,
            code="context_length_exceeded",
        )
    if max_tokens is not None and max_tokens >= 1 and n_prompt + max_tokens > limit:
        raise P.APIError(
            400,
            f"'max_tokens' is too large: {max_tokens}. This model's maximum context length is "
            f"{limit} tokens and your request has {n_prompt} input tokens ({max_tokens} > {limit} - "
            f"{n_prompt}).",
            param="max_tokens",
            code="context_length_exceeded",
        )


async def tokenize(state, text: str) -> list[int]:
    """Off the event loop: a long prompt takes a while to encode, and other streams must not wait."""
    if state.tokenizer is None:
        raise P.APIError(400, "This server has no tokenizer: send the prompt as token ids.", param="prompt")
    if len(text) < 4096:
        return state.tokenizer.encode(text).ids
    return (await asyncio.to_thread(state.tokenizer.encode, text)).ids


async def submit(state, jobs) -> list[RequestStream]:
    """Admit every (ids, params) job, or none: a refusal aborts the ones already admitted."""
    streams: list[RequestStream] = []
    try:
        for ids, params in jobs:
            streams.append(await state.engine.add(ids, params))
    except BaseException:
        for s in streams:
            state.engine.abort(s.request_id)
        raise
    return streams


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, delta) from every stream, in arrival order, until all have finished."""
    if len(streams) == 1:
        async for d in streams[0]:
            yield 0, d
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i, s):
        async for d in s:
            q.put_nowait((i, d))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, d = await q.get()
            left -= d.finished
            yield i, d
    finally:
        for t in tasks:
            t.cancel()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(request: Request, state, streams: list[RequestStream]) -> list[list[RequestOutput]] | None:
    """Every stream's deltas; None if the client went away first (its requests are aborted)."""

    async def one(s):
        return [d async for d in s]

    work = asyncio.gather(*(one(s) for s in streams))
    gone = asyncio.create_task(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            return work.result()
        logging.info("client disconnected; aborting %d request(s)", len(streams))
        return None
    finally:
        gone.cancel()
        work.cancel()
        abort_unfinished(state, streams)


def abort_unfinished(state, streams) -> None:
    for s in streams:
        if not s.finished:
            state.engine.abort(s.request_id)


def first_error(deltas: list[list[RequestOutput]]) -> P.APIError | None:
    return next((ds[-1].error for ds in deltas if ds and ds[-1].error is not None), None)


async def finished(request: Request, state, streams: list[RequestStream]) -> list[list[RequestOutput]] | None:
    """``collect``, raising the first request's error (the server stopped it) as the response."""
    deltas = await collect(request, state, streams)
    if deltas is not None and (err := first_error(deltas)) is not None:
        raise err
    return deltas


def sse_response(gen) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ----------------------------------------------------------------------------- /v1/completions
async def completions(state, request: Request) -> Response:
    req = P.parse_body(await request.body(), P.CompletionRequest)
    check_model(state, req.model)
    P.check_common(req)
    if req.suffix:
        raise P.unsupported("suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise P.unsupported("best_of", "must equal n (or be omitted)")
    if req.logprobs is not None and not 0 <= req.logprobs <= P.MAX_TOP_LOGPROBS:
        raise P.APIError(
            400, f"Invalid value for 'logprobs': {req.logprobs} (must be in [0, {P.MAX_TOP_LOGPROBS}]).",
            param="logprobs", code="invalid_value",
        )  # fmt: skip
    p = req.prompt
    batch = p if isinstance(p, list) and p and not isinstance(p[0], int) else [p]
    if len(batch) > P.MAX_BATCH_PROMPTS:
        raise P.APIError(400, f"At most {P.MAX_BATCH_PROMPTS} prompts per request.", param="prompt")
    prompts = [await tokenize(state, x) if isinstance(x, str) else list(x) for x in batch]
    max_tokens = 16 if req.max_tokens is None else req.max_tokens  # OpenAI's default for completions
    # echo + logprobs: the prompt tokens' logprobs too (teacher forcing), as OpenAI returns them
    # (max_tokens 0 with echo: the engine only scores the prompt, which needs prompt logprobs)
    plp = req.prompt_logprobs
    if req.echo and (req.logprobs is not None or max_tokens == 0):
        plp = max(plp or 0, req.logprobs or 0)
    bias = P.logit_bias(req, state.vocab_size)
    jobs = []
    for ids in prompts:
        check_context(state, len(ids), max_tokens, "prompt")
        jobs += [
            (ids, P.sampling_params(req, max_tokens, req.logprobs, k, bias=bias, prompt_logprobs=plp))
            for k in range(req.n)
        ]
    streams = await submit(state, jobs)
    rid, model, n_prompt = P.new_id("cmpl"), state.model_name, sum(map(len, prompts))
    tok = state.tokenizer
    prompt_of = [prompts[i // req.n] for i in range(len(streams))]
    echo_text = [_decode(tok, ids) if req.echo else "" for ids in prompt_of]

    def choice(i, text, d_or_none, ids, lps, offset, finish, first=False, plps=None):
        c = {"index": i, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None}
        if first and req.echo:
            c["text"] = echo_text[i] + text
        if req.logprobs is not None and lps is not None:
            if first and req.echo:
                ids, lps = prompt_of[i] + list(ids), list(plps or [None] * len(prompt_of[i])) + list(lps)
            c["logprobs"] = P.completion_logprobs(tok, ids, lps, offset)
        if req.prompt_logprobs is not None and first:
            c["prompt_logprobs"] = P.prompt_logprobs_body(tok, prompt_of[i], plps)
        if finish is not None and d_or_none is not None:
            c["stop_reason"] = d_or_none.stop_reason
        return c

    if not req.stream:
        deltas = await finished(request, state, streams)
        if deltas is None:
            return Response(status_code=499)
        choices, n_out = [], 0
        for i, ds in enumerate(deltas):
            ids = [t for d in ds for t in d.token_ids]
            lps = [x for d in ds for x in (d.logprobs or [])]
            text = "".join(d.text for d in ds)
            plps = ds[-1].prompt_logprobs
            choices.append(choice(i, text, ds[-1], ids, lps, 0, ds[-1].finish_reason, True, plps))
            n_out += ds[-1].num_output_tokens
        return JSONResponse(P.completion_body(rid, model, choices, P.usage(n_prompt, n_out)))

    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    async def events():
        offsets, n_out, left = [0] * len(streams), 0, len(streams)
        first = [True] * len(streams)
        try:
            async for i, d in merged(streams):
                if d.error is not None:
                    yield P.sse(d.error.body())
                if not (d.token_ids or d.text or d.finished):
                    continue
                left -= d.finished
                n_out += d.num_output_tokens if d.finished else 0
                c = choice(
                    i, d.text, d, d.token_ids, d.logprobs, offsets[i], d.finish_reason if d.finished else None,
                    first[i], d.prompt_logprobs,
                )  # fmt: skip
                offsets[i] += len(c["text"])
                first[i] = False
                use = P.usage(n_prompt, n_out) if left == 0 and not include_usage else None
                yield P.sse(P.completion_body(rid, model, [c], use))
            if include_usage:
                yield P.sse(P.completion_body(rid, model, [], P.usage(n_prompt, n_out)))
            yield P.sse("[DONE]")
        finally:
            abort_unfinished(state, streams)

    return sse_response(events())


def _decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False) if tok is not None else ""
