"""Loopback servers for the BDN store and hydrate tests: a Range-capable static file server with
a request log, a delay and a hold gate, and a moto S3 server.

The HTTP server serves a directory laid out like a LocalStore root, so one set of blobs can be read
through a LocalStore and an HttpStore alike. It runs in the test process, so requests made by
hydrator subprocesses land in its log too.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass(frozen=True)
class Request:
    """One logged request: method, URL path and the byte range served ([start, end))."""

    method: str
    path: str
    start: int | None
    end: int | None


class RangeServer:
    """A threaded HTTP server for `root` answering GET/HEAD with single-range support.

    * ``delay_s``: sleep before sending each response body (slows transfers without sleeping in
      the test itself).
    * ``hold_from``: responses whose range starts at or after this byte wait until ``release()``
      (or ``hold_timeout_s``), which lets a test stop a client mid-transfer deterministically.
    * ``fail_next``: that many GETs of existing blobs are answered 503 (a transient failure).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.requests: list[Request] = []
        self.delay_s = 0.0
        self.hold_from: int | None = None
        self.hold_timeout_s = 30.0
        self.fail_next = 0
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> RangeServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def hold(self, from_byte: int) -> None:
        """Make ranges starting at `from_byte` or later wait for `release()`."""
        self._released.clear()
        self.hold_from = from_byte

    def release(self) -> None:
        self.hold_from = None
        self._released.set()

    def gets(self) -> list[Request]:
        """The GET requests logged so far."""
        with self._lock:
            return [r for r in self.requests if r.method == "GET"]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def _take_failure(self) -> bool:
        with self._lock:
            if self.fail_next > 0:
                self.fail_next -= 1
                return True
            return False

    def _log(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # quiet test output
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _serve(self, *, body: bool) -> None:
                rel = self.path.split("?", 1)[0].lstrip("/")
                file = (server.root / rel).resolve()
                if server.root.resolve() not in file.parents or not file.is_file():
                    server._log(Request(self.command, self.path, None, None))
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                size = file.stat().st_size
                start, end, status = 0, size, 200
                match = _RANGE_RE.match(self.headers.get("Range", ""))
                if match:
                    start = int(match.group(1))
                    end = min(size, int(match.group(2)) + 1) if match.group(2) else size
                    status = 206
                    if start >= size or end <= start:
                        server._log(Request(self.command, self.path, start, None))
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{size}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                server._log(Request(self.command, self.path, start, end))
                if body and server._take_failure():
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if body:
                    hold_from = server.hold_from
                    if hold_from is not None and start >= hold_from:
                        server._released.wait(server.hold_timeout_s)
                    if server.delay_s:
                        time.sleep(server.delay_s)
                self.send_response(status)
                self.send_header("Content-Length", str(end - start))
                self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
                self.end_headers()
                if not body:
                    return
                try:
                    with open(file, "rb") as f:
                        f.seek(start)
                        left = end - start
                        while left:
                            data = f.read(min(left, 256 << 10))
                            if not data:
                                break
                            self.wfile.write(data)
                            left -= len(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client went away (e.g. a killed hydrator)

        return Handler


@contextmanager
def range_server(root: Path) -> Iterator[RangeServer]:
    """A started RangeServer for `root`, stopped on exit."""
    server = RangeServer(root).start()
    try:
        yield server
    finally:
        server.stop()


# Credentials moto accepts; never real ones.
MOTO_CREDENTIALS = {
    "aws_access_key_id": "testing-key-id",
    "aws_secret_access_key": "testing-secret-do-not-print",
    "aws_region": "us-east-1",
}


@contextmanager
def moto_s3() -> Iterator[str]:
    """A moto S3 server on a free loopback port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    # botocore may look for credentials in the environment before our explicit ones win; keep the
    # process from reaching for a real profile.
    saved = {k: os.environ.get(k) for k in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")}
    os.environ["AWS_CONFIG_FILE"] = os.devnull
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
