"""A scripted worker for the router's proxy tests: the real `/kv_events` stream over a
`KVEventLog` the test publishes to, and completion endpoints whose bytes, chunking and failures
the test chooses (a real engine cannot be made to die at an exact point of a stream)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from server_fixtures import serve_app

from bisllm_server.kv_events import KVEventPublisher
from bisllm_server.openai.kv_event_stream import KVEventLog, kv_event_lines

BLOCK_SIZE = 4


def sse(payload: Any) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


def chunk(text: str | None, *, role: bool = False, finish: str | None = None) -> dict[str, Any]:
    delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {"content": text}
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "fake",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}

# A whole stream: role chunk, three tokens (one with non-ASCII bytes), a finish, usage, [DONE].
STREAM = [
    sse(chunk(None, role=True)),
    sse(chunk("Hel")),
    sse(chunk("lo ✓")),
    sse(chunk("!", finish="stop")),
    sse({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "choices": [], "usage": USAGE}),
    sse("[DONE]"),
]
BODY = json.dumps({"id": "cmpl-fake", "choices": [{"text": "Hello"}], "usage": USAGE}).encode()


@dataclass
class FakeWorker:
    name: str
    mode: str = "ok"  # ok | 503 | die_before_output | die_after_output | hold
    healthy: bool = True
    publisher: KVEventPublisher = field(default_factory=KVEventPublisher)
    requests: list[tuple[bytes, dict[str, str]]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)  # mode hold waits on it
    url: str = ""

    def __post_init__(self) -> None:
        self.log = KVEventLog(self.publisher, block_size=BLOCK_SIZE)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health() -> Response:
            return JSONResponse({"status": "ok"}, status_code=200 if self.healthy else 503)

        @app.get("/kv_events")
        async def kv_events(since: int | None = None, instance: str | None = None) -> Response:
            load = {"in_flight_tokens": 0, "prompt_tokens_total": 0, "cached_tokens_total": 0}
            lines = kv_event_lines(self.log, lambda: load, since, instance, load_interval=0.2)
            return StreamingResponse(lines, media_type="application/x-ndjson")

        async def complete(request: Request) -> Response:
            raw = await request.body()
            self.requests.append((raw, dict(request.headers)))
            if self.mode == "503":
                return JSONResponse({"error": {"message": "busy"}}, status_code=503)
            if not json.loads(raw).get("stream"):
                if self.mode == "hold":
                    await asyncio.to_thread(self.release.wait)
                return Response(BODY, media_type="application/json")
            return StreamingResponse(self._stream(), media_type="text/event-stream")

        app.post("/v1/chat/completions")(complete)
        app.post("/v1/completions")(complete)
        return app

    async def _stream(self) -> AsyncIterator[bytes]:
        if self.mode == "die_before_output":
            yield STREAM[0]
            raise RuntimeError("worker died")  # uvicorn aborts the response mid-body
        if self.mode == "die_after_output":
            yield b"".join(STREAM[:3])
            raise RuntimeError("worker died")
        sent = 0
        if self.mode == "hold":
            yield STREAM[0]
            await asyncio.to_thread(self.release.wait)
            sent = 1
        # Cut the bytes at awkward places: inside events, and two events in one chunk.
        whole = b"".join(STREAM[sent:])
        for start in range(0, len(whole), 37):
            yield whole[start : start + 37]


@contextmanager
def fake_workers(*names: str) -> Iterator[list[FakeWorker]]:
    workers = [FakeWorker(name) for name in names]
    with ExitStack() as stack:
        for worker in workers:
            worker.url = stack.enter_context(serve_app(worker.app()))
        yield workers
