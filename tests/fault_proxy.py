"""A TCP proxy that breaks connections on purpose, for the K/V transfer fault tests.

It runs its own asyncio loop on a thread and relays one upstream (a prefill worker). Per
connection it follows the current `Fault`: relay everything, flip one response byte, cut the
connection after N response bytes, or stop at N response bytes and wait for the test (which
kills the worker there) before cutting. `reached` is set when a connection gets to its
fault point, so a test waits on that event instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class Fault:
    kind: str = "none"  # none | flip | cut | hold
    at: int = 0  # response byte offset where it happens
    reached: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)  # for "hold"


class FaultProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.fault = Fault()
        self.connections = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        self._started.wait()
        return self

    def stop(self) -> None:
        self.fault.release.set()
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _shutdown(self) -> None:
        self._server.close()
        # Connections still open (a keep-alive one) end here.
        while tasks := [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._started.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        fault = self.fault
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        upload = asyncio.create_task(_pipe(reader, up_writer))
        try:
            await self._relay_response(up_reader, writer, fault)
        finally:
            upload.cancel()
            for w in (writer, up_writer):
                with contextlib.suppress(Exception):
                    w.transport.abort()  # a reset, as a dead peer or a broken link gives

    async def _relay_response(
        self, up: asyncio.StreamReader, down: asyncio.StreamWriter, fault: Fault
    ) -> None:
        sent = 0
        while True:
            chunk = await up.read(65536)
            if not chunk:
                return
            if fault.kind in ("cut", "hold") and sent + len(chunk) >= fault.at:
                down.write(chunk[: fault.at - sent])
                await down.drain()
                fault.reached.set()
                if fault.kind == "hold":
                    await asyncio.to_thread(fault.release.wait)
                return  # what the worker sent after this point never arrives
            if fault.kind == "flip" and sent <= fault.at < sent + len(chunk):
                data = bytearray(chunk)
                data[fault.at - sent] ^= 0x01
                chunk = bytes(data)
                fault.reached.set()
            down.write(chunk)
            await down.drain()
            sent += len(chunk)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()


@contextlib.contextmanager
def fault_proxy(upstream_port: int) -> Iterator[FaultProxy]:
    proxy = FaultProxy(upstream_port).start()
    try:
        yield proxy
    finally:
        proxy.stop()
