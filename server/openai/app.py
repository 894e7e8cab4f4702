"""The FastAPI application: routes, API-key check, OpenAI-shaped errors, disconnects.

A client that goes away aborts its engine requests: a streaming response's generator is
cancelled by Starlette, and a non-streaming handler races its work against the connection's
`http.disconnect` message.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from bisllm_server.disagg import PREFILL_PEERS_HEADER
from bisllm_server.disagg.transfer import parse_peers
from bisllm_server.openai.errors import APIError, error_body
from bisllm_server.openai.kv_event_stream import kv_event_lines, load_report
from bisllm_server.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
)
from bisllm_server.openai.serving import OpenAIServing

log = logging.getLogger("bisllm.server")

# Probes and scrapers never need a key.
OPEN_PATHS = frozenset({"/health", "/metrics", "/metrics/node", "/ping"})


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first validation error as 'field: problem', and the field's dotted path."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {message}", None
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return (f"{param}: {message}{more}" if param else f"{message}{more}"), param


def key_from(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() in ("bearer", "api-key") and value.strip():
        return value.strip()
    return request.headers.get("api-key")


def refuse_without_key(request: Request, key: str | None) -> JSONResponse | None:
    """The 401 for a request that lacks the server's API key (None: let it through)."""
    if not key or request.url.path in OPEN_PATHS:
        return None
    given = key_from(request)
    if given is not None and hmac.compare_digest(given.encode(), key.encode()):
        return None
    detail = "missing" if given is None else "invalid"
    return JSONResponse(
        error_body(
            401,
            f"API key {detail}: send it as 'Authorization: Bearer KEY' or 'Api-Key: KEY'",
            code="invalid_api_key",
        ),
        status_code=401,
    )


async def _until_disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """`work`'s result, or None after cancelling it if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        return None
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


def create_app(serving: OpenAIServing, *, is_ready: Callable[[], bool] = lambda: True) -> FastAPI:
    app = FastAPI(title="bisllm", docs_url=None, redoc_url=None)
    metrics = serving.metrics

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        metrics.request_failed(exc.status)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        metrics.request_failed(400)
        return JSONResponse(error_body(400, message, param=param), status_code=400)

    @app.middleware("http")
    async def _auth(request: Request, call_next: Callable[[Request], Awaitable[Response]]):
        refused = refuse_without_key(request, serving.settings.api_key)
        if refused is not None:
            metrics.request_failed(401)
            return refused
        return await call_next(request)

    async def _respond(request: Request, result: Awaitable[Any]) -> Response:
        body = await unless_disconnected(request, result)
        if body is None:  # the client is gone; nobody reads this
            return Response(status_code=499)
        if isinstance(body, dict):
            return JSONResponse(body)
        return StreamingResponse(
            _guarded(body), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        peers = parse_peers(request.headers.get(PREFILL_PEERS_HEADER))
        return await _respond(request, serving.chat(body, peers))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        peers = parse_peers(request.headers.get(PREFILL_PEERS_HEADER))
        return await _respond(request, serving.completion(body, peers))

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> Response:
        serving.check_model(body.model)
        raise APIError(
            400,
            f"`{serving.settings.served_model_name}` is a generative (causal LM) model and has "
            "no embedding head; /v1/embeddings needs a model served with a pooling method "
            "(mean or last-token over an embedding checkpoint), which this server does not run",
            param="model",
            code="model_not_embedding",
        )

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return serving.models()

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        return serving.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        return serving.detokenize(body)

    @app.get("/kv_events")
    async def kv_events(since: int | None = None, instance: str | None = None) -> Response:
        """NDJSON stream of KV-cache events and load for a KV-aware router (see
        kv_event_stream); `since` + `instance` from a previous stream resume it."""
        event_log = serving.kv_event_log
        if event_log is None:
            raise APIError(404, "this server does not publish KV events")
        lines = kv_event_lines(
            event_log, lambda: load_report(serving.engine.engine), since, instance
        )
        return StreamingResponse(
            lines, media_type="application/x-ndjson", headers={"Cache-Control": "no-cache"}
        )

    @app.get("/health")
    async def health() -> Response:
        engine = serving.engine
        if engine.error is not None:
            return JSONResponse({"status": "error", "error": repr(engine.error)}, status_code=503)
        if not is_ready() or not engine.running:
            return JSONResponse({"status": "starting"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.update_engine(serving.engine.engine.stats)
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app


async def _guarded(stream: AsyncIterator[str]) -> AsyncIterator[str]:
    """The SSE stream; closing it (client disconnect) closes the serving generator, whose
    cleanup aborts the engine requests."""
    try:
        async for chunk in stream:
            yield chunk
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
