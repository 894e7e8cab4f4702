"""Async streaming over `LLMEngine` for the HTTP server.

The engine steps on one background thread; each request's outputs are handed to its asyncio
queue with `call_soon_threadsafe`. A consumer that stops iterating (client disconnect, task
cancelled) aborts its request so its KV is freed at the next step.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator, Sequence

from bisllm_server.engine.engine import LLMEngine
from bisllm_server.engine.request import RequestOutput
from bisllm_server.engine.sampling import SamplingParams


class EngineDeadError(RuntimeError):
    """The stepping thread failed; in-flight requests get this error instead of outputs."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self.error: BaseException | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="bisllm-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        detokenize: bool = True,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's deltas; the last one has `finished` set."""
        if self.error is not None:
            raise EngineDeadError(f"engine stopped after an error: {self.error!r}")
        rid = request_id if request_id is not None else f"async-{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._streams[rid] = (asyncio.get_running_loop(), queue)
        finished = False
        try:
            self.engine.add_request(prompt, params, request_id=rid, detokenize=detokenize)
            self._wakeup.set()
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            with self._lock:
                self._streams.pop(rid, None)
            if not finished:
                self.engine.abort(rid)
                self._wakeup.set()

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is not None:
            loop, queue = target
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def _run(self) -> None:
        while not self._stopping:
            self._wakeup.clear()
            if not self.engine.has_unfinished_requests():
                self._wakeup.wait()
                continue
            try:
                outputs = self.engine.step()
            except BaseException as exc:  # the thread must report, not vanish
                self.error = exc
                dead = EngineDeadError(f"engine step failed: {exc!r}")
                with self._lock:
                    ids = list(self._streams)
                for rid in ids:
                    self._deliver(rid, dead)
                return
            for out in outputs:
                self._deliver(out.request_id, out)
