"""The OpenAI-compatible HTTP API (FastAPI), bridged to the engine thread.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both streaming as
server-sent events ending in ``data: [DONE]``), ``GET /v1/models``, ``GET /health`` (200 once
warm; 503 while draining or if the engine thread died), ``GET /metrics`` (Prometheus), and
for a router in front of replicas (``router_api.py``): ``GET /server_info`` (served model name,
``dp_size`` 1, slots, pool tokens), ``GET /model_info`` (model type), ``GET /get_load``
(running + waiting sequences and the positions they hold, SGLang's shape), plus the older
``/get_server_info`` / ``/get_model_info`` names. With an API key, ``/v1/*`` and the router
routes need ``Authorization: Bearer <key>`` (401 otherwise); health and metrics stay open for
probes and scrapers.

A request's path: parse and validate the body (``protocol.parse_body``: 400 naming the
field) → check the model name (404) → tokenize (the chat endpoint renders DeepSeek-V4's
encoding first, ``encoding.render``) → check prompt + ``max_tokens`` against the context
limit (400 ``context_length_exceeded``) → one engine request per prompt × ``n``
(``AsyncEngine.add``; the engine's own refusals become 400s) → stream or collect the
deltas. Handlers are async and never touch the engine: only queues cross the thread
boundary. A client that goes away (disconnect mid-stream, or while a non-streaming
request runs) aborts its engine requests, which frees their slots and blocks at once.

The endpoint logic lives in ``serving.py`` (completions, shared steps) and ``chat.py``; this module is the app: routes, auth, error
handlers.
"""

from __future__ import annotations

import dataclasses
import hmac
import time

from absl import logging
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsv4_jax.server import chat, router_api, serving
from dsv4_jax.server.engine_thread import AsyncEngine
from dsv4_jax.server.metrics import ServerMetrics
from dsv4_jax.server.protocol import APIError


@dataclasses.dataclass
class ServerState:
    engine: AsyncEngine
    model_name: str
    metrics: ServerMetrics
    api_key: str | None = None
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size


def build_app(state: ServerState, stop_engine_on_shutdown: bool = True) -> FastAPI:
    """The app over a (started or not) ``AsyncEngine``; the lifespan starts it and, unless
    told otherwise, stops it."""
    import contextlib

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.engine.start()
        yield
        if stop_engine_on_shutdown:
            state.engine.stop()

    app = FastAPI(title="dsv4-jax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state

    def error(e: APIError) -> JSONResponse:
        state.metrics.refused.labels(str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        msg = {404: f"Unknown route {request.url.path}", 405: f"Method {request.method} not allowed here"}
        return error(APIError(e.status_code, msg.get(e.status_code, str(e.detail)), code=None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        return error(APIError(400, str(e)))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        logging.exception("unhandled error on %s", request.url.path)
        return error(APIError(500, f"internal server error: {e!r}", type="server_error"))

    async def auth(request: Request):
        """``Authorization: Bearer <key>`` on /v1 routes (a dependency, not an HTTP middleware:
        Starlette's BaseHTTPMiddleware wraps ``receive`` and gets in the way of disconnect detection)."""
        if state.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), state.api_key.encode()
        ):
            raise APIError(
                401,
                "Incorrect API key provided. Pass it as 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
            )

    v1 = [Depends(auth)]

    @app.get("/health")
    async def health():
        if not state.engine.alive:
            return JSONResponse({"status": "engine not running"}, status_code=503)
        if state.engine.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=v1)
    async def models():
        card = {
            "id": state.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "dsv4-jax",
            "max_model_len": state.max_model_len,
        }
        return {"object": "list", "data": [card]}

    router_api.add_routes(app, state, v1)

    @app.post("/v1/completions", dependencies=v1)
    async def completions(request: Request):
        return await serving.completions(state, request)

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat_completions(request: Request):
        return await chat.chat_completions(state, request)

    return app
