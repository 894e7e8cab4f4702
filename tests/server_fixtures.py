"""Real HTTP servers for the server tests: uvicorn on a pre-bound localhost socket, in a thread,
over the embedded default model.

The socket is bound and listening before the thread starts, so clients can connect at once
(the kernel queues them until uvicorn accepts): no readiness polling is needed.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from bisllm_server.engine.async_engine import AsyncEngine
from bisllm_server.openai.app import create_app
from bisllm_server.openai.launch import ServeOptions, build_server, resolve_model_dir
from bisllm_server.openai.metrics import ServerMetrics
from bisllm_server.openai.serving import OpenAIServing, ServerSettings
from bisllm_truss.validate import validate_file

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "examples" / "bisllm-tiny-moe" / "config.yaml"

# The tool the embedded model was trained to call, and the question it calls it for.
GCD_TOOL = {
    "type": "function",
    "function": {
        "name": "gcd",
        "description": "Greatest common divisor of two integers.",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "description": "First integer."},
                "b": {"type": "integer", "description": "Second integer."},
            },
            "required": ["a", "b"],
        },
    },
}
GCD_QUESTION = "What is the greatest common divisor of 84 and 36?"


@dataclass
class RunningServer:
    url: str
    engine: AsyncEngine
    serving: OpenAIServing | None = None

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"


def tiny_spec() -> Any:
    result = validate_file(TINY_CONFIG)
    assert result.ok and result.spec is not None, result.issues
    return result.spec


@contextmanager
def serve_app(app: Any) -> Iterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_keep_alive=30))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@contextmanager
def tiny_server(**options: Any) -> Iterator[RunningServer]:
    spec = tiny_spec()
    model_dir = resolve_model_dir(spec, [REPO])
    app, engine = build_server(spec, model_dir, ServeOptions(device="cpu", **options))
    try:
        with serve_app(app) as url:
            yield RunningServer(url, engine)
    finally:
        engine.shutdown()


@contextmanager
def second_front(engine: AsyncEngine, settings: ServerSettings) -> Iterator[RunningServer]:
    """Another server (own settings and metrics) over an already running engine."""
    serving = OpenAIServing(engine, settings, ServerMetrics(settings.served_model_name))
    with serve_app(create_app(serving)) as url:
        yield RunningServer(url, engine, serving)
