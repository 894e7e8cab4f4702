"""The router's HTTP front: the same OpenAI routes as a worker, plus the router's own state.

POST /v1/chat/completions, /v1/completions    placed by the router, proxied byte for byte
GET  /v1/models; POST /tokenize, /detokenize  answered by any ready worker
GET  /health                                  200 while at least one worker is ready
GET  /metrics                                 kv_cache_*, decision latency, per-worker load
GET  /router/workers, /router/stats           the index and load per worker; hit-rate totals
GET  /router/autoscaler                       the planner's last decision and the replicas
POST /router/workers/{address}/drain|undrain  take a worker out of rotation and back
POST /router/snapshot                         write the index snapshot now
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from bisllm_server.openai.app import refuse_without_key, unless_disconnected
from bisllm_server.openai.errors import APIError
from bisllm_server.openai.protocol import ChatCompletionRequest, CompletionRequest
from bisllm_server.router.service import RouterService


def _invalid(exc: ValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    message = first.get("msg", "invalid request")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return APIError(400, f"{param}: {message}{more}" if param else message + more, param=param)


def _parse(model: type[BaseModel], raw: bytes) -> Any:
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}") from None
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _invalid(exc) from None


def create_router_app(
    service: RouterService, *, on_stop: Callable[[], None] | None = None
) -> FastAPI:
    """`on_stop` runs (in a thread) after the router stops, still inside the graceful
    shutdown: uvicorn re-raises SIGTERM once it is done, which ends the process at once."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()
            if on_stop is not None:
                await asyncio.to_thread(on_stop)

    app = FastAPI(title="bisllm router", docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.middleware("http")
    async def _auth(request: Request, call_next: Callable[[Request], Awaitable[Response]]):
        refused = refuse_without_key(request, service.options.api_key)
        return refused if refused is not None else await call_next(request)

    async def _complete(request: Request, model: type[BaseModel]) -> Response:
        raw = await request.body()
        parsed = _parse(model, raw)
        headers = {k.lower(): v for k, v in request.headers.items()}
        result = await unless_disconnected(
            request, service.completion(request.url.path, parsed, raw, headers)
        )
        if result is None:  # the client left before a worker answered
            return Response(status_code=499)
        status, response_headers, body = result
        if isinstance(body, bytes):
            return Response(body, status_code=status, headers=response_headers)
        media_type = response_headers.pop("content-type", "text/event-stream")
        return StreamingResponse(
            _closing(body), status_code=status, headers=response_headers, media_type=media_type
        )

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _complete(request, ChatCompletionRequest)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _complete(request, CompletionRequest)

    async def _pass_post(request: Request) -> Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        status, body, media_type = await service.forward_stateless(
            "POST", request.url.path, await request.body(), headers
        )
        return Response(body, status_code=status, media_type=media_type)

    app.post("/v1/embeddings")(_pass_post)
    app.post("/tokenize")(_pass_post)
    app.post("/detokenize")(_pass_post)

    @app.get("/v1/models")
    async def models() -> Response:
        status, body, media_type = await service.forward_stateless("GET", "/v1/models")
        return Response(body, status_code=status, media_type=media_type)

    @app.get("/health")
    async def health() -> Response:
        ready = service.ready_workers()
        body = {"status": "ok" if ready else "no_worker_ready", "workers_ready": len(ready)}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/router/workers")
    async def workers() -> dict[str, Any]:
        return {"workers": service.worker_report()}

    @app.get("/router/stats")
    async def stats() -> dict[str, Any]:
        return {
            "totals": dict(service.metrics.totals),
            "rates": service.metrics.rates(),
            "queue_depth": service.router.queue_depth,
            "policy": service.config.policy,
        }

    @app.get("/router/autoscaler")
    async def autoscaler() -> dict[str, Any]:
        return {"pools": [companion.report() for companion in service.companions]}

    async def _drain(address: str, drained: bool) -> dict[str, Any]:
        if not service.drain(address, drained):
            raise APIError(404, f"no worker {address!r}; see GET /router/workers")
        return {"address": address, "drained": drained}

    @app.post("/router/workers/{address}/drain")
    async def drain(address: str) -> dict[str, Any]:
        return await _drain(address, True)

    @app.post("/router/workers/{address}/undrain")
    async def undrain(address: str) -> dict[str, Any]:
        return await _drain(address, False)

    @app.post("/router/snapshot")
    async def write_snapshot() -> dict[str, Any]:
        if service.options.snapshot_path is None:
            raise APIError(400, "the router runs without --router-snapshot")
        await service.write_snapshot()
        return {"path": str(service.options.snapshot_path)}

    return app


async def _closing(stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Relay the stream; a client that leaves closes it, which closes the worker's."""
    try:
        async for chunk in stream:
            yield chunk
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
