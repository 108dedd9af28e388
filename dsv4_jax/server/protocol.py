"""OpenAI request schemas, the error shape, and the response / SSE chunk builders.

Requests are validated strictly (pydantic strict mode, unknown fields forbidden), as the
OpenAI API itself does: ``"max_tokens": "5"`` or ``"stream": 1`` is a 400, not a silent
coercion, and ``"foo": 1`` is "Unrecognized request argument supplied: foo". Every error
leaves the server as ``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx
status (``APIError``), so the ``openai`` client raises its typed exceptions
(``BadRequestError``, ``AuthenticationError``, ``NotFoundError``...).

Responses are plain dicts built by the functions at the bottom: the fields OpenAI
returns, plus ``reasoning_content`` on chat messages (DeepSeek's and vLLM's name for the
thinking text) and ``stop_reason`` (vLLM's: the stop token id or string that ended a choice).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dsv4_jax.engine.sampling_params import SamplingParams

MAX_N = 128  # choices per prompt (OpenAI's own cap)
MAX_BATCH_PROMPTS = 1024  # prompts in one /v1/completions call
MAX_STOP = 4  # stop sequences (OpenAI: "up to 4 sequences")
MAX_JSON_DEPTH = 64  # nesting of a request body (a schema or a tool's parameters included)
MAX_TOP_LOGPROBS = 20  # chat top_logprobs and completions logprobs (SamplingParams.MAX_LOGPROBS)
# OpenAI's documented ranges, [low, high] (None: unbounded); exclusive lows listed apart
RANGES = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
    "min_p": (0.0, 1.0),
    "repetition_penalty": (0.0, None),
    "top_logprobs": (0, MAX_TOP_LOGPROBS),
    "prompt_logprobs": (0, MAX_TOP_LOGPROBS),
    "max_tokens": (1, None),
    "max_completion_tokens": (1, None),
    "top_k": (-1, None),
}
EXCLUSIVE_LOW = {"top_p", "repetition_penalty"}


class APIError(Exception):
    """An error returned to the client in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


# SGLang's request extensions that sglang-router writes, at these values, into every request it
# forwards (docs/SERVING.md "Replicas behind a router"). Each value describes what this server
# does anyway (stop strings trimmed, special tokens skipped, reasoning split out and streamed), so
# it is accepted; any other value asks for behaviour the server lacks and is a 400.
SGLANG_FIXED = {"no_stop_trim": False, "skip_special_tokens": True, "return_hidden_states": False}
SGLANG_FIXED_CHAT = {"continue_final_message": False, "separate_reasoning": True, "stream_reasoning": True}


class _Sampling(_Strict):
    """Fields both endpoints share. Beyond OpenAI's own: vLLM's ``top_k``, ``min_p``,
    ``repetition_penalty``, ``stop_token_ids``, ``ignore_eos``; SGLang's ``SGLANG_FIXED``."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    prompt_logprobs: int | None = None  # vLLM's: logprobs of the prompt tokens (teacher forcing)
    no_stop_trim: bool = False
    skip_special_tokens: bool = True
    return_hidden_states: bool = False


class CompletionRequest(_Sampling):
    # A string, a list of token ids, or a batch of either (OpenAI's four forms).
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "latest_reminder"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    reasoning_content: str | None = None  # an earlier turn's thinking: accepted, dropped (ARCHITECTURE §9)
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    # Thinking mode: chat_template_kwargs={"thinking": true} (vLLM / SGLang for DeepSeek) or
    # OpenAI's reasoning_effort (anything but "none" turns thinking on).
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    continue_final_message: bool = False
    separate_reasoning: bool = True
    stream_reasoning: bool = True


# ----------------------------------------------------------------------------- parsing
def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _too_deep(obj: Any) -> str | None:
    """The top-level field under which ``obj`` nests deeper than ``MAX_JSON_DEPTH`` (iterative:
    the check itself must not recurse), or None."""
    stack = [(v, 1, k) for k, v in obj.items()]
    while stack:
        v, d, top = stack.pop()
        if d > MAX_JSON_DEPTH:
            return top
        if isinstance(v, dict):
            stack.extend((x, d + 1, top) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1, top) for x in v)
    return None


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """Raw request body → validated model, or ``APIError(400)`` naming the offending field."""
    try:
        obj = json.loads(raw, parse_constant=_reject_constant)  # NaN / Infinity are not JSON
    except RecursionError:
        raise APIError(
            400, f"The request body nests deeper than {MAX_JSON_DEPTH} levels.", code="invalid_json"
        ) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(
            400, f"We could not parse the JSON body of your request ({e}).", code="invalid_json"
        ) from None
    if not isinstance(obj, dict):
        raise APIError(
            400, f"The request body must be a JSON object, got {type(obj).__name__}.", code="invalid_json"
        )
    if (top := _too_deep(obj)) is not None:
        raise APIError(
            400,
            f"Invalid value for '{top}': nested deeper than {MAX_JSON_DEPTH} levels.",
            param=top,
            code="invalid_value",
        )
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        param = str(err["loc"][0]) if err["loc"] else None
        if err["type"] == "extra_forbidden":
            raise APIError(
                400,
                f"Unrecognized request argument supplied: {param}",
                param=param,
                code="unrecognized_argument",
            ) from None
        if err["type"] == "missing":
            raise APIError(
                400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
            ) from None
        where = ".".join(str(x) for x in err["loc"])
        code = "invalid_type" if err["type"].endswith("_type") else "invalid_value"
        raise APIError(400, f"Invalid value for '{where}': {err['msg']}.", param=param, code=code) from None


def unsupported(param: str, why: str = "is not supported by this server") -> APIError:
    return APIError(400, f"'{param}' {why}.", param=param, code="unsupported_parameter")


def _range_error(name: str, v) -> APIError:
    lo, hi = RANGES[name]
    if hi is None:
        want = f"> {lo}" if name in EXCLUSIVE_LOW else f">= {lo}"
    else:
        want = f"in ({lo}, {hi}]" if name in EXCLUSIVE_LOW else f"in [{lo}, {hi}]"
    return APIError(
        400, f"Invalid value for '{name}': {v} (must be {want}).", param=name, code="invalid_value"
    )


def check_ranges(req: BaseModel) -> None:
    """OpenAI's documented ranges (``RANGES``): a 400 naming the parameter, as OpenAI answers.
    ``max_tokens=0`` is allowed with ``echo`` (score the prompt only, as evaluation harnesses do)."""
    for name, (lo, hi) in RANGES.items():
        v = getattr(req, name, None)
        if v is None or (name == "max_tokens" and v == 0 and getattr(req, "echo", False)):
            continue
        low_ok = v > lo if name in EXCLUSIVE_LOW else v >= lo
        if not low_ok or (hi is not None and v > hi):
            raise _range_error(name, v)


def logit_bias(req: _Sampling, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias`` ({"token id": bias}) → ``SamplingParams.logit_bias``."""
    if not req.logit_bias:
        return ()
    if len(req.logit_bias) > SamplingParams.MAX_LOGIT_BIAS:
        raise APIError(
            400,
            f"Invalid value for 'logit_bias': {len(req.logit_bias)} entries; at most "
            f"{SamplingParams.MAX_LOGIT_BIAS}.",
            param="logit_bias",
            code="invalid_value",
        )
    out: dict[int, float] = {}
    for key, bias in req.logit_bias.items():
        try:
            tid = int(key)
        except ValueError:
            tid = -1
        if not (key.strip().isdigit() and 0 <= tid < vocab_size):
            raise APIError(
                400,
                f"Invalid key in 'logit_bias': {key!r} is not a token id in [0, {vocab_size}).",
                param="logit_bias",
                code="invalid_value",
            )
        if not (math.isfinite(bias) and -100 <= bias <= 100):
            raise APIError(
                400,
                f"Invalid value in 'logit_bias' for token {key}: {bias} (must be in [-100, 100]).",
                param="logit_bias",
                code="invalid_value",
            )
        if tid in out:
            raise APIError(
                400, f"'logit_bias' names token {tid} twice.", param="logit_bias", code="invalid_value"
            )
        out[tid] = float(bias)
    return tuple(out.items())


def check_common(req: _Sampling) -> None:
    """Ranges, counts and combinations OpenAI rejects: a clear 400 instead of a surprise."""
    check_ranges(req)
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stops) > MAX_STOP:
        raise APIError(
            400, f"Invalid value for 'stop': {len(stops)} sequences; at most {MAX_STOP}.", param="stop",
            code="invalid_value",
        )  # fmt: skip
    if any(not x for x in stops):
        raise APIError(
            400, "Invalid value for 'stop': empty stop sequence.", param="stop", code="invalid_value"
        )
    if not 1 <= req.n <= MAX_N:
        raise APIError(
            400, f"'n' must be between 1 and {MAX_N}, got {req.n}.", param="n", code="invalid_value"
        )
    for name, want in (SGLANG_FIXED | SGLANG_FIXED_CHAT).items():
        if getattr(req, name, want) != want:
            raise unsupported(name, f"is supported only as {json.dumps(want)}")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "'stream_options' is only allowed when 'stream' is true.", param="stream_options")
    for name in (
        "temperature",
        "top_p",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
    ):
        v = getattr(req, name)
        if v is not None and not math.isfinite(v):
            raise APIError(400, f"'{name}' must be a finite number.", param=name, code="invalid_value")


def sampling_params(
    req: _Sampling,
    max_tokens: int,
    logprobs: int | None,
    seed_offset: int = 0,
    *,
    bias: tuple = (),
    grammar: str | None = None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """The engine's ``SamplingParams``; its validation errors (``SamplingParams.<field>: ...``)
    become a 400 naming the OpenAI parameter."""
    kw: dict[str, Any] = {
        "max_tokens": max_tokens,
        "ignore_eos": req.ignore_eos,
        "logprobs": logprobs,
        "logit_bias": bias,
        "grammar": grammar,
        "prompt_logprobs": prompt_logprobs,
    }
    for name in (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
    ):
        if getattr(req, name) is not None:
            kw[name] = getattr(req, name)
    if req.seed is not None:
        kw["seed"] = req.seed + seed_offset if req.seed >= 0 else req.seed
    if req.stop is not None:
        kw["stop"] = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
    if req.stop_token_ids:
        kw["stop_token_ids"] = tuple(req.stop_token_ids)
    try:
        return SamplingParams(**kw)
    except ValueError as e:
        msg = str(e)
        field = msg.split(":", 1)[0].removeprefix("SamplingParams.")
        param = field
        raise APIError(
            400, msg.replace("SamplingParams.", "", 1), param=param, code="invalid_value"
        ) from None


# ----------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(rid: str, model: str, choices: list[dict], use: dict | None) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": use,
    }


def chat_body(rid: str, model: str, choices: list[dict], use: dict | None, chunk: bool = False) -> dict:
    obj = "chat.completion.chunk" if chunk else "chat.completion"
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": use,
    }


def sse(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def completion_logprobs(tokenizer, token_ids: list[int], entries: list, offset: int) -> dict:
    """OpenAI's legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset.
    An entry None (the first prompt token under ``echo``: nothing precedes it) gives nulls."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tid, e in zip(token_ids, entries):
        s = tokenizer.decode([tid]) if tokenizer is not None else str(tid)
        out["tokens"].append(s)
        out["token_logprobs"].append(None if e is None else e[0])
        out["top_logprobs"].append(
            None
            if e is None
            else {(tokenizer.decode([t]) if tokenizer else str(t)): p for t, p in (e[1] or [])}
        )
        out["text_offset"].append(offset)
        offset += len(s)
    return out


def prompt_logprobs_body(tokenizer, prompt_ids: list[int], entries: list | None) -> list | None:
    """vLLM's ``prompt_logprobs`` shape: per prompt token None (the first) or
    ``{token id: {"logprob", "decoded_token"}}`` for the token itself and its top alternatives."""
    if entries is None:
        return None

    def one(t, p):
        return {"logprob": p, "decoded_token": tokenizer.decode([t]) if tokenizer is not None else str(t)}

    out: list = []
    for tid, e in zip(prompt_ids, entries):
        if e is None:
            out.append(None)
            continue
        d = {str(tid): one(tid, e[0])}
        for t, p in e[1] or []:
            d.setdefault(str(t), one(t, p))
        out.append(d)
    return out


def chat_logprobs(tokenizer, token_ids: list[int], entries: list) -> dict:
    """Chat shape: ``{"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}``."""

    def one(t, p):
        s = tokenizer.decode([t]) if tokenizer is not None else str(t)
        return {"token": s, "logprob": p, "bytes": list(s.encode())}

    content = []
    for tid, (lp, top) in zip(token_ids, entries):
        content.append({**one(tid, lp), "top_logprobs": [one(t, p) for t, p in (top or [])]})
    return {"content": content}
