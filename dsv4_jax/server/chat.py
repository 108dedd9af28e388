"""``/v1/chat/completions``: tools, tool choice, structured outputs and the reply's parts.

A request's path: validate the body (``protocol``) → resolve what constrains the reply
(``constraint``: ``tool_choice`` "required" / a named function → a DSML call whose arguments
follow the schema; ``"auto"`` with ``strict`` functions → free text or a call, a strict
function's arguments constrained once its ``invoke`` opens; ``response_format`` json_object /
json_schema → JSON) → render the prompt with the tools and the response schema
(``encoding.render``) → one engine request per choice, the grammar in its
``SamplingParams`` → each choice's text through a ``ToolCallParser`` (tool_parser.py), which
splits reasoning, content and tool calls, streams call arguments as they are generated and
never lets DSML markup into content.

OpenAI's ``developer`` role is its name for the system prompt (newer OpenAI models and SDKs
send it); DeepSeek's own ``developer`` role is an internal agent turn its API refuses. So
``developer`` messages are rendered as system messages here. The legacy ``functions`` /
``function_call`` fields map onto ``tools`` / ``tool_choice``.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from dsv4_jax.server import encoding, tool_grammar, tool_parser
from dsv4_jax.server import protocol as P
from dsv4_jax.server.serving import (
    abort_unfinished,
    check_context,
    check_model,
    finished,
    merged,
    sse_response,
    submit,
    tokenize,
)


def _bad(param: str, message: str) -> P.APIError:
    return P.APIError(400, message, param=param, code="invalid_value")


def tools_and_choice(req: P.ChatCompletionRequest) -> tuple[list[dict] | None, Any]:
    """The request's tools (legacy ``functions`` as tools) and its tool choice, checked."""
    tools, choice = req.tools, req.tool_choice
    if req.functions is not None:
        if tools is not None:
            raise _bad("functions", "Pass either 'tools' or the legacy 'functions', not both.")
        tools = [{"type": "function", "function": f} for f in req.functions]
        fc = req.function_call
        choice = {"type": "function", "function": fc} if isinstance(fc, dict) else fc
    names = []
    for i, t in enumerate(tools or []):
        fn = t.get("function") if isinstance(t, dict) else None
        if t.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad("tools", f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}.")
        names.append(fn["name"])
    if len(set(names)) != len(names):
        raise _bad("tools", "Two tools have the same function name.")
    if choice is None:
        choice = "auto" if tools else "none"
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if choice.get("type") != "function" or not isinstance(name, str):
            raise _bad(
                "tool_choice", "A named tool_choice is {'type': 'function', 'function': {'name': ...}}."
            )
        if name not in names:
            raise _bad("tool_choice", f"tool_choice names function {name!r}, which is not among the tools.")
        return tools, name
    if choice not in ("none", "auto", "required"):
        raise _bad(
            "tool_choice",
            f"tool_choice must be 'none', 'auto', 'required' or a named function, got {choice!r}.",
        )
    if choice != "none" and not tools:
        raise _bad("tool_choice", f"tool_choice {choice!r} needs 'tools'.")
    return tools, choice


def constraint(req, tools, choice, thinking: bool) -> str | None:
    """The llguidance grammar the reply must follow, or None; a schema that cannot compile is
    a 400 naming it."""
    rf = req.response_format or {"type": "text"}
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise _bad("response_format", "response_format.type must be 'text', 'json_object' or 'json_schema'.")
    schema = None
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
            raise _bad("response_format", "response_format.json_schema must be an object with a 'schema'.")
        schema = js.get("schema", {"type": "object"})
    tool_g = None
    if tools and choice != "none":
        try:
            tool_g = tool_grammar.tool_call_grammar(
                tools, choice, thinking, parallel=req.parallel_tool_calls is not False
            )
        except tool_grammar.GrammarError as e:
            raise _bad("tools", f"Invalid tools: {e}") from None
    if kind != "text" and tool_g is not None:
        raise _bad(
            "response_format", f"response_format {kind!r} cannot be combined with tool_choice {choice!r}."
        )
    if tool_g is not None:
        return tool_g
    if kind == "text":
        return None
    try:
        return tool_grammar.json_grammar(schema, thinking=thinking)
    except tool_grammar.GrammarError as e:
        raise _bad("response_format", f"Invalid response_format schema: {e}") from None


def openai_deltas(events) -> list[dict]:
    """Parser events → OpenAI chat ``delta`` objects (the ``Outcome`` is the caller's)."""
    out = []
    for ev in events:
        if isinstance(ev, tool_parser.ReasoningDelta):
            out.append({"reasoning_content": ev.text})
        elif isinstance(ev, tool_parser.ContentDelta):
            out.append({"content": ev.text})
        elif isinstance(ev, tool_parser.ToolCallStart):
            call = {
                "index": ev.index,
                "id": ev.id,
                "type": "function",
                "function": {"name": ev.name, "arguments": ""},
            }
            out.append({"tool_calls": [call]})
        elif isinstance(ev, tool_parser.ToolCallArgs):
            out.append({"tool_calls": [{"index": ev.index, "function": {"arguments": ev.text}}]})
    return out


def _messages(req) -> list[dict]:
    out = []
    for m in req.messages:
        d = m.model_dump(exclude_none=True)
        if d["role"] == "developer":
            d["role"] = "system"
        out.append(d)
    return out


async def chat_completions(state, request: Request) -> Response:
    req = P.parse_body(await request.body(), P.ChatCompletionRequest)
    check_model(state, req.model)
    P.check_common(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise P.APIError(400, "'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs")
    tools, choice = tools_and_choice(req)
    try:
        thinking = encoding.thinking_requested(req.chat_template_kwargs, req.reasoning_effort)
        text = encoding.render(
            _messages(req),
            thinking=thinking,
            tools=tools if choice != "none" else None,
            reasoning_effort=req.reasoning_effort,
            response_format=req.response_format,
        )
    except encoding.EncodingError as e:
        raise P.APIError(400, str(e), param=getattr(e, "param", "messages"), code="invalid_value") from None
    grammar = constraint(req, tools, choice, thinking)
    ids = await tokenize(state, text)
    mt = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    check_context(state, len(ids), mt, "messages")
    max_tokens = state.max_model_len - len(ids) if mt is None else mt
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    bias = P.logit_bias(req, state.vocab_size)
    jobs = [
        (
            ids,
            P.sampling_params(
                req, max_tokens, logprobs, k, bias=bias, grammar=grammar, prompt_logprobs=req.prompt_logprobs
            ),
        )
        for k in range(req.n)
    ]
    streams = await submit(state, jobs)
    rid, model, tok = P.new_id("chatcmpl"), state.model_name, state.tokenizer
    call_tools = tools if choice != "none" else None

    def parser():
        return tool_parser.ToolCallParser(call_tools, thinking)

    if not req.stream:
        deltas = await finished(request, state, streams)
        if deltas is None:
            return Response(status_code=499)
        choices, n_out = [], 0
        for i, ds in enumerate(deltas):
            out = tool_parser.parse_output(
                "".join(d.text for d in ds), call_tools, thinking, ds[-1].finish_reason
            )
            msg = {"role": "assistant", "content": out.content, "reasoning_content": out.reasoning_content}
            if out.tool_calls:
                msg["tool_calls"] = out.tool_calls
            lp = None
            if logprobs is not None:
                lp = P.chat_logprobs(
                    tok, [t for d in ds for t in d.token_ids], [x for d in ds for x in (d.logprobs or [])]
                )
            c = {
                "index": i,
                "message": msg,
                "logprobs": lp,
                "finish_reason": out.finish_reason,
                "stop_reason": out.error or ds[-1].stop_reason,
            }
            if req.prompt_logprobs is not None:
                c["prompt_logprobs"] = P.prompt_logprobs_body(tok, ids, ds[-1].prompt_logprobs)
            choices.append(c)
            n_out += ds[-1].num_output_tokens
        return JSONResponse(P.chat_body(rid, model, choices, P.usage(len(ids), n_out)))

    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    async def events():
        parsers = [parser() for _ in streams]
        sent_prompt = [False] * len(streams)
        n_out, left = 0, len(streams)

        def chunk(i, delta, finish=None, lp=None, use=None, stop_reason=None, extra=None):
            c = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish, **(extra or {})}
            if finish is not None:
                c["stop_reason"] = stop_reason
            return P.sse(P.chat_body(rid, model, [c], use, chunk=True))

        try:
            for i in range(len(streams)):
                yield chunk(i, {"role": "assistant", "content": ""})
            async for i, d in merged(streams):
                if d.error is not None:
                    yield P.sse(d.error.body())
                evs = parsers[i].feed(d.text)
                if d.finished:
                    evs += parsers[i].finish(d.finish_reason)
                lp = P.chat_logprobs(tok, d.token_ids, d.logprobs) if logprobs is not None else None
                extra = None
                if (
                    req.prompt_logprobs is not None
                    and sent_prompt[i] is False
                    and d.prompt_logprobs is not None
                ):
                    extra = {"prompt_logprobs": P.prompt_logprobs_body(tok, ids, d.prompt_logprobs)}
                    sent_prompt[i] = True
                deltas = openai_deltas(evs)
                if not deltas and (lp or extra):  # held-back text: the tokens' logprobs still go out
                    deltas = [{"content": ""}]
                for j, delta in enumerate(deltas):
                    yield chunk(i, delta, lp=lp if j == 0 else None, extra=extra if j == 0 else None)
                if d.finished:
                    left -= 1
                    n_out += d.num_output_tokens
                    use = P.usage(len(ids), n_out) if left == 0 and not include_usage else None
                    fin = next(e for e in evs if isinstance(e, tool_parser.Outcome))
                    yield chunk(i, {}, fin.finish_reason, use=use, stop_reason=fin.error or d.stop_reason)
            if include_usage:
                yield P.sse(P.chat_body(rid, model, [], P.usage(len(ids), n_out), chunk=True))
            yield P.sse("[DONE]")
        finally:
            abort_unfinished(state, streams)

    return sse_response(events())
