"""The two generation endpoints: request → engine requests → OpenAI response or SSE stream.

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
from dsv4_jax.server import encoding
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


def sse_response(gen) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ----------------------------------------------------------------------------- /v1/completions
async def completions(state, request: Request) -> Response:
    req = P.parse_body(await request.body(), P.CompletionRequest)
    check_model(state, req.model)
    P.check_common(req)
    if req.echo:
        raise P.unsupported("echo")
    if req.suffix:
        raise P.unsupported("suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise P.unsupported("best_of", "must equal n (or be omitted)")
    p = req.prompt
    batch = p if isinstance(p, list) and p and not isinstance(p[0], int) else [p]
    if len(batch) > P.MAX_BATCH_PROMPTS:
        raise P.APIError(400, f"At most {P.MAX_BATCH_PROMPTS} prompts per request.", param="prompt")
    prompts = [await tokenize(state, x) if isinstance(x, str) else list(x) for x in batch]
    max_tokens = 16 if req.max_tokens is None else req.max_tokens  # OpenAI's default for completions
    jobs = []
    for ids in prompts:
        check_context(state, len(ids), max_tokens, "prompt")
        jobs += [(ids, P.sampling_params(req, max_tokens, req.logprobs, k)) for k in range(req.n)]
    streams = await submit(state, jobs)
    rid, model, n_prompt = P.new_id("cmpl"), state.model_name, sum(map(len, prompts))
    tok = state.tokenizer

    def choice(i, text, d_or_none, ids, lps, offset, finish):
        c = {"index": i, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None}
        if req.logprobs is not None and lps is not None:
            c["logprobs"] = P.completion_logprobs(tok, ids, lps, offset)
        if finish is not None and d_or_none is not None:
            c["stop_reason"] = d_or_none.stop_reason
        return c

    if not req.stream:
        deltas = await collect(request, state, streams)
        if deltas is None:
            return Response(status_code=499)
        if (err := first_error(deltas)) is not None:
            raise err
        choices, n_out = [], 0
        for i, ds in enumerate(deltas):
            ids = [t for d in ds for t in d.token_ids]
            lps = [x for d in ds for x in (d.logprobs or [])]
            choices.append(choice(i, "".join(d.text for d in ds), ds[-1], ids, lps, 0, ds[-1].finish_reason))
            n_out += ds[-1].num_output_tokens
        return JSONResponse(P.completion_body(rid, model, choices, P.usage(n_prompt, n_out)))

    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    async def events():
        offsets, n_out, left = [0] * len(streams), 0, len(streams)
        try:
            async for i, d in merged(streams):
                if d.error is not None:
                    yield P.sse(d.error.body())
                if not (d.token_ids or d.text or d.finished):
                    continue
                left -= d.finished
                n_out += d.num_output_tokens if d.finished else 0
                c = choice(
                    i, d.text, d, d.token_ids, d.logprobs, offsets[i], d.finish_reason if d.finished else None
                )
                offsets[i] += len(d.text)
                use = P.usage(n_prompt, n_out) if left == 0 and not include_usage else None
                yield P.sse(P.completion_body(rid, model, [c], use))
            if include_usage:
                yield P.sse(P.completion_body(rid, model, [], P.usage(n_prompt, n_out)))
            yield P.sse("[DONE]")
        finally:
            abort_unfinished(state, streams)

    return sse_response(events())


# ----------------------------------------------------------------------------- /v1/chat/completions
async def chat_completions(state, request: Request) -> Response:
    req = P.parse_body(await request.body(), P.ChatCompletionRequest)
    check_model(state, req.model)
    P.check_common(req)
    if req.tools or req.functions:
        raise P.unsupported(
            "tools" if req.tools else "functions", "(tool calling) is not supported by this server"
        )
    for name in ("tool_choice", "function_call"):
        if getattr(req, name) not in (None, "none"):
            raise P.unsupported(name)
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise P.unsupported("response_format", "other than {'type': 'text'} is not supported by this server")
    if req.top_logprobs is not None and not req.logprobs:
        raise P.APIError(400, "'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs")
    try:
        thinking = encoding.thinking_requested(req.chat_template_kwargs, req.reasoning_effort)
    except encoding.EncodingError as e:
        raise P.APIError(400, str(e), param="chat_template_kwargs") from None
    try:
        text = encoding.render([m.model_dump() for m in req.messages], thinking=thinking)
    except encoding.EncodingError as e:
        raise P.APIError(400, str(e), param="messages") from None
    ids = await tokenize(state, text)
    mt = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    check_context(state, len(ids), mt, "messages")
    max_tokens = state.max_model_len - len(ids) if mt is None else mt
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    streams = await submit(
        state, [(ids, P.sampling_params(req, max_tokens, logprobs, k)) for k in range(req.n)]
    )
    rid, model, tok = P.new_id("chatcmpl"), state.model_name, state.tokenizer

    if not req.stream:
        deltas = await collect(request, state, streams)
        if deltas is None:
            return Response(status_code=499)
        if (err := first_error(deltas)) is not None:
            raise err
        choices, n_out = [], 0
        for i, ds in enumerate(deltas):
            out = "".join(d.text for d in ds)
            reasoning, content = encoding.split_reasoning(out) if thinking else (None, out)
            msg = {"role": "assistant", "content": content, "reasoning_content": reasoning}
            lp = None
            if logprobs is not None:
                lp = P.chat_logprobs(
                    tok, [t for d in ds for t in d.token_ids], [x for d in ds for x in (d.logprobs or [])]
                )
            choices.append(
                {
                    "index": i,
                    "message": msg,
                    "logprobs": lp,
                    "finish_reason": ds[-1].finish_reason,
                    "stop_reason": ds[-1].stop_reason,
                }
            )
            n_out += ds[-1].num_output_tokens
        return JSONResponse(P.chat_body(rid, model, choices, P.usage(len(ids), n_out)))

    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    async def events():
        splitters = [encoding.ReasoningSplitter() if thinking else None for _ in streams]
        n_out, left = 0, len(streams)

        def chunk(i, delta, finish=None, lp=None, use=None, stop_reason=None):
            c = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}
            if finish is not None:
                c["stop_reason"] = stop_reason
            return P.sse(P.chat_body(rid, model, [c], use, chunk=True))

        try:
            for i in range(len(streams)):
                yield chunk(i, {"role": "assistant", "content": ""})
            async for i, d in merged(streams):
                if d.error is not None:
                    yield P.sse(d.error.body())
                r, c = splitters[i].feed(d.text) if thinking else ("", d.text)
                if d.finished and thinking:
                    r2, c2 = splitters[i].flush()
                    r, c = r + r2, c + c2
                if d.token_ids or r or c:
                    delta = {"reasoning_content": r} if r else {}
                    if c or not r:
                        delta["content"] = c
                    lp = P.chat_logprobs(tok, d.token_ids, d.logprobs) if logprobs is not None else None
                    yield chunk(i, delta, lp=lp)
                if d.finished:
                    left -= 1
                    n_out += d.num_output_tokens
                    use = P.usage(len(ids), n_out) if left == 0 and not include_usage else None
                    yield chunk(i, {}, d.finish_reason, use=use, stop_reason=d.stop_reason)
            if include_usage:
                yield P.sse(P.chat_body(rid, model, [], P.usage(len(ids), n_out), chunk=True))
            yield P.sse("[DONE]")
        finally:
            abort_unfinished(state, streams)

    return sse_response(events())
